"""Load a pretrained diffusion model as a denoiser: any supported family, pixel or latent.

Sources (see `load_model` and `sdedit.sources`): a local diffusers model directory, a Hugging
Face hub id (through the hub cache), or an fsspec URL to such a directory (copied to a local
cache first; fsspec is imported only then). Which layouts are read, and how each family's
network is called, is `sdedit.families`; how its time axis works is its noise process
(`sdedit.processes`).

Weights are read with safetensors, or `torch.load(weights_only=True)`: no arbitrary unpickling.
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
        net: the diffusers network (UNet2DModel, UNet2DConditionModel, a transformer) in eval
            mode on `device`, float32 weights.
        process: its noise process (VP, VE or flow; `sdedit.processes`): the samplers it runs,
            how t0 maps to a start level, what the network predicts.
        sample_size: (H, W) in pixels the model was trained at (latent: latent size x factor).
        in_channels: C of the images `edit` takes (latent models: the VAE's, 3).
        downsample_factor: image H and W must be multiples of this (latent: VAE factor x the
            network's own factor or patch size).
        source: the source string it was loaded from (no credentials).
        device: where the network runs.
        dtype: the network's compute precision: its weights' (`precision.compute`), or with
            float32 weights bfloat16 / float16 under autocast (the network only).
        call: how the network is called (`sdedit.conditioning.NetCall`).
        family: the model family's name ("pixel", "sd", ...; `sdedit.families`).
        accel: how the network runs (autocast, channels_last, compile, CUDA graphs, noise
            threads); see `sdedit.accel`. Change it with `accelerate`.
        codec: the VAE codec of a latent model (None for pixel models).
        text: the prompt encoder of a text-conditioned model (None for unconditional ones).
        identity: what the weights are: "sha256:<hex>" over the files the model was built from
            (`sdedit.sources.files_identity`), or "hf:<repo id>@<commit>" for a hub snapshot;
            "" when the model was assembled by hand.
        patch: state cells per network token along a side (a flow shift that depends on the
            resolution counts tokens).
        precision: the dtype of each part's weights (`sdedit.precision`); float32 by default.
        net_path: how the network runs ("fp32", "bf16", "fp8 W8A8 (...)", ...), for logs and
            records.
        offload: "none", or "text": the text encoders live in host memory and swap places with
            the network on the device only to encode prompts (`sdedit.prompts`).
        prompts: the cache of prompt embeddings across batches (`sdedit.prompts.PromptCache`).
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
        """Change `accel` in place (fields of `sdedit.accel.Acceleration`); returns self.

        `autocast` also sets `dtype` (None = the weights' compute dtype); low-precision weights
        take no autocast."""
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
        """The raw network output, float32 (B, C, H, W), run as `accel` says.

        t: (B,) network times (`process.network_time`); cond: the conditioning of B rows,
        required by (only) conditional models."""
        if (cond is None) == self.conditional:
            raise ValueError(f"cond is {'missing' if cond is None else 'given'}; allowed: "
                             "a Conditioning for text-conditioned models, else None")
        if self._runner is None:
            self._runner = NetRunner(self.net, self.accel, self.device, self.call,
                                     self.precision.compute)
        return self._runner(x, t, cond)

    def encoding(self) -> contextlib.AbstractContextManager[Any]:
        """Around an encode of prompts: with offload "text", the text encoders swap places
        with the network on the device (`sdedit.prompts.swapped`); CUDA graphs captured
        before are dropped after it (the network's weights moved)."""
        if self.offload != "text" or self.text is None or self.device.type == "cpu":
            return contextlib.nullcontext()
        if self._runner is not None and self._runner.graphs:
            self._runner = None
        return swapped(self.net, self.text.modules(), self.device)

    def encode_prompts(self, prompts: list[str], negatives: list[str] | None,
                       size: tuple[int, int], guidance: float | None
                       ) -> tuple[Conditioning, Conditioning | None]:
        """The conditioning rows of a batch's prompts, through the prompt cache (each distinct
        pair encoded once per model) and the offload swap."""
        assert self.text is not None, "an unconditional model takes no prompts"
        return self.prompts.encode(self.text, prompts, negatives, size, guidance,
                                   self.encoding)

    @torch.no_grad()
    def denoise(self, x: torch.Tensor, t: torch.Tensor,
                cond: Conditioning | None = None) -> torch.Tensor:
        """The sampler's quantity (eps for VP, the score for VE, the velocity for flow) at
        step values t (B,): x float32 (B, C, H, W) -> float32 (B, C, H, W)."""
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
    """Load a diffusers model directory of a supported family (`sdedit.families`) and its
    scheduler config as a `DiffusionModel`.

    Args:
        source: a local directory, a hub id ("google/ddpm-ema-bedroom-256"), or an fsspec URL
            ("s3://bucket/models/bedroom", "memory://m") to a directory in one of the layouts.
        device, dtype: where the network runs, and with float32 weights its autocast dtype
            (bfloat16 / float16; sampling stays float32). With low-precision weights `dtype`
            is float32 (= their own) or their compute dtype.
        weights_dtype: "fp32" (default), "bf16", "fp16", "fp8" or "auto" (the family's
            published precision), or a resolved `Precision` (`sdedit.precision`).
        offload: "none" or "text" (text encoders in host memory between encodes).
        cache_dir: where URL sources are copied (default ~/.cache/sdedit-batch/models).
        storage_options: fsspec options for URL sources (endpoint, credentials).
        accel: the fast-path options; default `Acceleration.default(device, dtype)`.
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
    if set(record.values()) != {"fp32"}:  # float32 models keep the identity they always had
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
