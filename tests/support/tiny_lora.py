"""Tiny LoRAs made with peft on the tiny pipelines' modules and saved in diffusers' format.

`add_lora` injects random (non-zero) LoRA layers into a module in place, so the pipeline that
holds it is the reference the saved file must reproduce; `save_lora` writes the layers with the
pipeline class's `save_lora_weights` (pytorch_lora_weights.safetensors, keys "unet.",
"text_encoder.", "text_encoder_2.", with each part's LoraConfig as adapter metadata), as
diffusers' LoRA training scripts do. Layers are injected with peft directly: transformers'
own `add_adapter` demands peft >= 0.22, which the package registry does not offer.
"""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.utils import get_peft_model_state_dict

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def add_lora(module: torch.nn.Module, targets: list[str], rank: int, alpha: float,
             seed: int) -> LoraConfig:
    """Random LoRA layers (lora_B non-zero) on the `targets` layers of `module`, in place."""
    torch.manual_seed(seed)
    config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=False,
                        target_modules=targets)
    inject_adapter_in_model(config, module)
    module.eval()
    return config


def save_lora(folder: Path, pipeline_cls: type, **parts: tuple[torch.nn.Module, LoraConfig]
              ) -> Path:
    """`pipeline_cls.save_lora_weights(folder, ...)` of the parts ("unet", "text_encoder",
    "text_encoder_2") given as (module with peft layers, its config); returns the file."""
    layers = {f"{name}_lora_layers": get_peft_model_state_dict(module)
              for name, (module, _) in parts.items()}
    metadata = {f"{name}_lora_adapter_metadata": config.to_dict()
                for name, (_, config) in parts.items()}
    pipeline_cls.save_lora_weights(folder, **layers, **metadata)
    return folder / "pytorch_lora_weights.safetensors"
