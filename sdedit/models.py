"""Load a pretrained diffusion model of any supported family as one denoiser, `DiffusionModel`.

The engine never asks which family it runs: the family (`sdedit.families`) supplies the network
call, the codec and the prompt encoder, and the noise process (`sdedit.processes`) the time axis.
Sources, precision and offload: docs/models.md and docs/performance.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from sdedit.accel import Acceleration, NetRunner
from sdedit.conditioning import Conditioning, NetCall, PromptEncoder
from sdedit.families import ModelLayout, family_named, inspect_model_dir
from sdedit.families.base import unet_call
from sdedit.latent import LatentCodec
from sdedit.precision import Precision, apply_precision, loading, resolve_precision
from sdedit.processes import NoiseProcess
from sdedit.prompts import OFFLOADS, PromptCache, swapped
from sdedit.sources import ModelSourceError, files_identity, resolve

logger = logging.getLogger(__name__)

__all__ = ["DiffusionModel", "ModelLayout", "ModelSourceError", "inspect_model_dir",
           "load_model"]


@dataclass
class DiffusionModel:
    """A pretrained network, how to call it, and the noise process it was trained with.

    Attributes:
        sample_size: (H, W) pixels it was trained at; image sides are multiples of
            `downsample_factor`.
        dtype: the network's compute dtype: its weights', or bf16 / fp16 under autocast.
        codec, text: the VAE codec and prompt encoder; None for pixel / unconditional models.
        identity: "sha256:<hex>" of its files or "hf:<repo>@<commit>"; "" if built by hand.
        net_path: how the network runs ("fp32", "fp8 W8A8 (...)", ...), for logs and records.
        offload: "none", or "text": text encoders in host memory between encodes.
    """

    net: torch.nn.Module
    process: NoiseProcess
    sample_size: tuple[int, int]
    in_channels: int
    downsample_factor: int
    source: str
    device: torch.device
    dtype: torch.dtype
    call: NetCall = unet_call
    family: str = "pixel"
    accel: Acceleration = field(default_factory=Acceleration)
    codec: LatentCodec | None = None
    text: PromptEncoder | None = None
    identity: str = ""
    patch: int = 1
    precision: Precision = field(default_factory=Precision)
    net_path: str = "fp32"
    offload: str = "none"
    prompts: PromptCache = field(default_factory=PromptCache, repr=False, compare=False)
    _runner: NetRunner | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def conditional(self) -> bool:
        """True for text-conditioned models: `edit` then takes prompts and a guidance scale."""
        return self.text is not None

    @property
    def latent(self) -> bool:
        """True when the chain runs on VAE latents (`codec` is set)."""
        return self.codec is not None

    @property
    def kind(self) -> str:
        """The noise process's name ("vp", "ve", "flow"), for messages."""
        return self.process.name

    def state_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """(C, h, w) of the chain's state and of each noise draw for an H x W image."""
        if self.codec is None:
            return self.in_channels, height, width
        f = self.codec.factor
        return self.codec.channels, height // f, width // f

    def process_for(self, height: int, width: int) -> NoiseProcess:
        """The noise process for H x W images (a flow shift may depend on the token count)."""
        _, h, w = self.state_shape(height, width)
        return self.process.resolved((h // self.patch) * (w // self.patch))

    def accelerate(self, **options: Any) -> DiffusionModel:
        """Change `accel` in place (fields of `Acceleration`) and `dtype` with its autocast;
        returns self. Low-precision weights take no autocast."""
        accel = dataclasses.replace(self.accel, **options)
        if accel.cuda_graphs and "layerwise" in self.net_path:
            raise ValueError("cuda_graphs=True with fp8 layerwise casting (its hooks recast the "
                             "weights on every call); allowed: cuda_graphs=False, or fp8 W8A8 "
                             "on an FP8 GPU, or bf16 weights")
        if accel.autocast is not None and self.precision.low:
            raise ValueError(f"autocast={accel.autocast} with {self.precision.net} weights; "
                             "allowed: None (the network computes in its weights' dtype)")
        self.accel = accel
        self.dtype = self.accel.autocast or self.precision.compute
        self._runner = None
        return self

    def forward(self, x: torch.Tensor, t: torch.Tensor,
                cond: Conditioning | None = None) -> torch.Tensor:
        """The raw network output, float32 (B, C, H, W), at network times t (B,); `cond` (B
        rows) is required by conditional models and refused by the others."""
        if (cond is None) == self.conditional:
            raise ValueError(f"cond is {'missing' if cond is None else 'given'}; allowed: "
                             "a Conditioning for text-conditioned models, else None")
        if self._runner is None:
            self._runner = NetRunner(self.net, self.accel, self.device, self.call,
                                     self.precision.compute)
        return self._runner(x, t, cond)

    def encoding(self) -> contextlib.AbstractContextManager[Any]:
        """Around an encode of prompts: with offload "text" the text encoders swap places with
        the network on the device (so captured CUDA graphs are dropped)."""
        if self.offload != "text" or self.text is None or self.device.type == "cpu":
            return contextlib.nullcontext()
        if self._runner is not None and self._runner.graphs:
            self._runner = None
        return swapped(self.net, self.text.modules(), self.device)

    def encode_prompts(self, prompts: list[str], negatives: list[str] | None,
                       size: tuple[int, int], guidance: float | None
                       ) -> tuple[Conditioning, Conditioning | None]:
        """The conditioning rows of a batch's prompts, through the prompt cache and offload."""
        assert self.text is not None, "an unconditional model takes no prompts"
        return self.prompts.encode(self.text, prompts, negatives, size, guidance,
                                   self.encoding)

    @torch.no_grad()
    def denoise(self, x: torch.Tensor, t: torch.Tensor,
                cond: Conditioning | None = None) -> torch.Tensor:
        """The sampler's quantity (eps for VP, score for VE, velocity for flow) at step values
        t (B,): x float32 (B, C, H, W) -> float32 (B, C, H, W)."""
        out = self.forward(x, self.process.network_time(t), cond)
        return self.process.target(out, x, t)


def load_model(
    source: str | os.PathLike[str],
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    *,
    weights_dtype: str | Precision = "fp32",
    offload: str = "none",
    cache_dir: str | os.PathLike[str] | None = None,
    storage_options: dict[str, Any] | None = None,
    accel: Acceleration | None = None,
) -> DiffusionModel:
    """Load a diffusers model directory of a supported family as a `DiffusionModel`.

    Args:
        source: a local directory, a hub id or an fsspec URL to a directory.
        device, dtype: where the network runs and, with fp32 weights, its autocast dtype;
            low-precision weights take float32 or their own dtype.
        weights_dtype: "fp32", "bf16", "fp16", "fp8", "auto" (the family's published
            precision) or a resolved `Precision`.
        cache_dir: where URL sources are copied (None = ~/.cache/sdedit-batch/models).
        accel: None = `Acceleration.default(device, dtype)`.
    Raises:
        ModelSourceError (a ValueError) naming the source and what is wrong.
    """
    text = os.fspath(source)
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"dtype={dtype!r} is not allowed; allowed: torch.float32, "
                         "torch.bfloat16, torch.float16")
    if offload not in OFFLOADS:
        raise ValueError(f"offload={offload!r} is unknown; allowed: {', '.join(OFFLOADS)}")
    resolved = resolve(text, cache_dir, storage_options)
    directory = resolved.directory
    layout = inspect_model_dir(directory, text)
    family = family_named(layout.family)
    precision = weights_dtype if isinstance(weights_dtype, Precision) else resolve_precision(
        weights_dtype, family=family, process=layout.process, vae_config=layout.configs.get("vae"))
    if precision.low and dtype not in (torch.float32, precision.compute):
        raise ValueError(f"dtype={dtype} with {precision.net} weights; allowed: torch.float32 "
                         f"or {precision.compute} (the network computes in its weights' dtype)")
    with loading(precision):
        parts = family.load(layout, text)
    dev = torch.device(device)
    encoders = parts.text.modules() if parts.text is not None else []
    vae = parts.codec.vae if parts.codec is not None else None
    net_path = apply_precision(parts.net, vae, encoders, precision, dev)
    net = parts.net.to(device=dev).eval().requires_grad_(False)
    if parts.codec is not None:
        parts.codec.bound_memory()
        parts.codec.vae.to(dev)
    host = offload == "text" and dev.type != "cpu"
    for module in encoders:
        module.to("cpu" if host else dev)
    half = dtype if dtype != torch.float32 and not precision.low else None
    accel = dataclasses.replace(accel or Acceleration.default(device, half or torch.float32),
                                autocast=half)
    identity = f"hf:{text}@{resolved.revision}" if resolved.revision else \
        files_identity(directory, parts.files)
    record = precision.parts(layout.part_names()) or {"net": precision.net}
    if set(record.values()) != {"fp32"}:  # fp32: no suffix, the identity older records hold
        identity += " @ " + ", ".join(f"{name} {value}" for name, value in record.items())
    model = DiffusionModel(
        net=net, process=layout.process, sample_size=layout.sample_size,
        in_channels=layout.in_channels, downsample_factor=layout.downsample_factor, source=text,
        device=dev, dtype=half or precision.compute, call=parts.call, family=layout.family,
        accel=accel, codec=parts.codec, text=parts.text, identity=identity, patch=layout.patch,
        precision=precision, net_path=net_path, offload=offload)
    logger.info("loaded %s model %s (%s, %s, weights %s, network %s) on %s", layout.family, text,
                layout.process.name, f"{sum(p.numel() for p in net.parameters()) / 1e6:.2f}M "
                "params", precision.label(), net_path, device)
    return model
