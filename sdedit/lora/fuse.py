"""Fusing LoRAs into a loaded model: each part loaded as diffusers loads it, scaled as
`set_adapters`, merged into the base weights as `fuse_lora`, and the peft layers removed."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from sdedit.families import family_named
from sdedit.lora.check import SHOWN, Lora, checked_lora, lora_targets, part_keys
from sdedit.lora.files import lora_file
from sdedit.models import DiffusionModel
from sdedit.sources import ModelSourceError, file_sha256

logger = logging.getLogger(__name__)

__all__ = ["apply_loras"]


def _inject_text(module: torch.nn.Module, part: dict[str, torch.Tensor], prefix: str,
                 alphas: Mapping[str, float] | None, metadata: Mapping[str, Any] | None,
                 name: str) -> None:
    """A text encoder's LoRA layers with peft, configured as diffusers'
    `_load_lora_into_text_encoder` does."""
    from diffusers.utils import get_peft_kwargs
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

    if metadata:
        options = {k.removeprefix(f"{prefix}."): v for k, v in metadata.items()
                   if k.startswith(f"{prefix}.")}
    else:
        rank = {k: int(v.shape[1]) for k, v in part.items()
                if k.endswith("lora_B.weight") and v.ndim > 1}
        mine = {k.removeprefix(f"{prefix}."): v for k, v in (alphas or {}).items()
                if k.split(".")[0] == prefix}
        options = get_peft_kwargs(rank, mine or None, part, is_unet=False)
    inject_adapter_in_model(LoraConfig(**options), module, adapter_name=name, state_dict=part)
    result = set_peft_model_state_dict(module, part, adapter_name=name)
    unexpected = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
    if unexpected:
        raise ModelSourceError(f"LoRA keys not loaded into {prefix}: {unexpected[:SHOWN]}")


def _fuse(module: torch.nn.Module, names: list[str], scales: list[float]) -> None:
    """Scale each adapter as `set_adapters`, merge into the base weights as `fuse_lora`, and
    remove the peft layers as `unload_lora`."""
    from diffusers.utils import recurse_remove_peft_layers
    from diffusers.utils.peft_utils import set_weights_and_activate_adapters
    from peft.tuners.tuners_utils import BaseTunerLayer

    set_weights_and_activate_adapters(module, names, scales)
    for layer in module.modules():
        if isinstance(layer, BaseTunerLayer):
            layer.merge(adapter_names=names)
    recurse_remove_peft_layers(module)
    if hasattr(module, "peft_config"):
        del module.peft_config
    if hasattr(module, "_hf_peft_config_loaded"):
        module._hf_peft_config_loaded = None


@torch.no_grad()
def apply_loras(model: DiffusionModel, loras: Sequence[Lora], *,
                cache_dir: str | Path | None = None,
                storage_options: Mapping[str, Any] | None = None) -> DiffusionModel:
    """Fuse LoRAs into a loaded model in place, their updates added up; `identity` gains
    " + lora sha256:<hex>*<scale>" each. ModelSourceError names a LoRA that does not fit; fp8
    weights refuse LoRAs (the update would be lost to rounding)."""
    from diffusers import ModelMixin

    if not loras:
        return model
    if model.precision.net == "fp8":
        raise ModelSourceError("model.lora with fp8 weights: a LoRA update fused into float8 "
                               "weights is mostly lost to rounding; allowed: weights_dtype "
                               "fp32, bf16 or fp16 with LoRAs")
    targets = lora_targets(family_named(model.family), None, model.net, model.text)
    names: dict[str, list[tuple[str, float]]] = {prefix: [] for prefix in targets.modules}
    identities = []
    for i, lora in enumerate(loras):
        path = lora_file(lora.source, cache_dir, storage_options)
        state, alphas, metadata = checked_lora(path, targets, lora.source, model.family)
        name = f"lora_{i}"
        for prefix, module in targets.modules.items():
            part = part_keys(state, prefix, module)
            if not part:
                continue
            try:
                if isinstance(module, ModelMixin):
                    module.load_lora_adapter(state, prefix=prefix, network_alphas=alphas,
                                             adapter_name=name, metadata=metadata)
                else:
                    _inject_text(module, part, prefix, alphas, metadata, name)
            except ModelSourceError as exc:
                raise ModelSourceError(f"LoRA {lora.source!r}: {exc}") from exc
            except Exception as exc:
                raise ModelSourceError(f"LoRA {lora.source!r}: cannot load its {prefix} part: "
                                       f"{type(exc).__name__}: {str(exc)[:300]}") from exc
            names[prefix].append((name, float(lora.scale)))
        identities.append(f"sha256:{file_sha256(path)}*{lora.scale:g}")
        logger.info("LoRA %s (%s) applied at scale %g", lora.source, path.name, lora.scale)
    for prefix, module in targets.modules.items():
        if names[prefix]:
            _fuse(module, [n for n, _ in names[prefix]], [s for _, s in names[prefix]])
            module.requires_grad_(False).eval()
    model.identity = " + lora ".join([model.identity or "unidentified", *identities])
    model.prompts.clear()  # the text encoders may have changed
    return model.accelerate()  # a new runner: the network's layers changed
