"""Pixel-space unconditional models: a diffusers UNet2DModel with a VP or VE scheduler, in the
root layout (config.json, weights and scheduler_config.json side by side: google/ddpm-ema-*) or
a DDPMPipeline's (model_index.json, unet/, scheduler/). docs/models.md#the-families.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from sdedit.conditioning import NetCall, PromptEncoder
from sdedit.families.base import Loaded, ModelLayout, read_json, scheduler_process, unet_call
from sdedit.latent import LatentCodec
from sdedit.processes import FlowProcess, VEProcess
from sdedit.sources import ModelSourceError
from sdedit.weights import check_weights_file

__all__ = ["FAMILY", "PixelFamily"]

WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


def dirs(directory: Path, source: str) -> tuple[Path, Path]:
    """(network directory, scheduler config path) of the root or pipeline layout."""
    if (directory / "unet" / "config.json").exists():
        return directory / "unet", directory / "scheduler" / "scheduler_config.json"
    if (directory / "config.json").exists():
        return directory, directory / "scheduler_config.json"
    raise ModelSourceError(
        f"model source {source!r}: no config.json or unet/config.json in {directory}; expected a "
        "diffusers UNet2DModel directory (config.json, diffusion_pytorch_model.safetensors, "
        "scheduler_config.json), or a pipeline (model_index.json, unet/ or transformer/, "
        "scheduler/)"
    )


def check_net(unet_dir: Path, config: Mapping[str, Any], source: str) -> Path:
    """The weights file of a UNet2DModel directory; ModelSourceError for another class or none."""
    name = config.get("_class_name", "UNet2DModel")
    if name != "UNet2DModel":
        raise ModelSourceError(
            f"model source {source!r}: network class {name!r} is not supported here; allowed: "
            "UNet2DModel (unconditional pixel-space diffusion models); text-conditioned "
            "networks only in a pipeline directory (model_index.json) of a supported family"
        )
    weights = next((unet_dir / f for f in WEIGHT_FILES if (unet_dir / f).exists()), None)
    if weights is None:
        raise ModelSourceError(
            f"model source {source!r}: no weights in {unet_dir}; expected one of {WEIGHT_FILES}")
    check_weights_file(weights, source)
    return weights


class PixelFamily:
    """The pixel UNet2DModel family; it claims every directory, as the fallback."""

    name = "pixel"
    weights_precision = "fp32"
    lora_loader = None

    def claims(self, directory: Path, index: Mapping[str, Any]) -> bool:
        return True  # the fallback: its checks name what a directory lacks

    def inspect(self, directory: Path, source: str,
                index: Mapping[str, Any]) -> ModelLayout:
        unet_dir, scheduler_path = dirs(directory, source)
        config = read_json(unet_dir / "config.json", source)
        scheduler = read_json(scheduler_path, source)
        process = scheduler_process(scheduler, source)
        if isinstance(process, VEProcess) and config.get("time_embedding_type") != "fourier":
            raise ModelSourceError(
                f"model source {source!r}: a VE scheduler with time embedding "
                f"{config.get('time_embedding_type')!r}; VE score models need 'fourier'")
        if isinstance(process, FlowProcess):
            raise ModelSourceError(f"model source {source!r}: a flow-matching scheduler with a "
                                   "UNet2DModel; allowed: a VP or VE scheduler")
        check_net(unet_dir, config, source)
        size = config.get("sample_size", 256)
        sample_size = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
        return ModelLayout(
            family=self.name, directory=directory, process=process, sample_size=sample_size,
            in_channels=int(config.get("in_channels", 3)),
            downsample_factor=2 ** (len(config.get("down_block_types", ())) - 1),
            configs={"unet": config, "scheduler": scheduler},
            paths={"unet": unet_dir, "scheduler": scheduler_path})

    def load(self, layout: ModelLayout, source: str) -> Loaded:
        from diffusers import UNet2DModel

        unet_dir, config = layout.paths["unet"], layout.configs["unet"]
        weights = check_net(unet_dir, config, source)
        try:
            net = UNet2DModel.from_config(config)
            if weights.suffix == ".safetensors":
                from safetensors.torch import load_file

                state = load_file(str(weights))
            else:
                state = torch.load(weights, map_location="cpu", weights_only=True)
            net.load_state_dict(state, strict=True)
        except Exception as exc:
            raise ModelSourceError(
                f"model source {source!r}: cannot load {weights.name}: {type(exc).__name__}: "
                f"{str(exc)[:300]}") from exc
        files = [unet_dir / "config.json", weights, layout.paths["scheduler"]]
        return Loaded(net=net.eval().requires_grad_(False), call=unet_call, files=files)


    def codec(self, vae: torch.nn.Module) -> LatentCodec:
        raise ValueError("a pixel model has no VAE")

    def lora_modules(self, layout: ModelLayout | None, net: torch.nn.Module | None = None,
                     text: PromptEncoder | None = None) -> dict[str, torch.nn.Module]:
        """{}: this family takes no LoRA (`lora_loader` is None)."""
        return {}

    def plan_inputs(self, layout: ModelLayout, rows: int, size: tuple[int, int]
                    ) -> tuple[NetCall, None]:
        """The network call, without conditioning (`Family.plan_inputs`)."""
        return unet_call, None

FAMILY = PixelFamily()
