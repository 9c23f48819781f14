"""Load a pretrained diffusion model as a denoiser: pixel-space or latent and text-conditioned.

Sources (see `load_model` and `sdedit.sources`): a local diffusers model directory, a Hugging
Face hub id (through the hub cache), or an fsspec URL to such a directory (copied to a local
cache first; fsspec is imported only then). Layouts:

    root layout (google/ddpm-ema-bedroom-256, google/ncsnpp-church-256):
        config.json  diffusion_pytorch_model.{safetensors,bin}  scheduler_config.json
    pipeline layout, pixel (DDPMPipeline.save_pretrained):
        model_index.json  unet/{config.json, diffusion_pytorch_model.*}
        scheduler/scheduler_config.json
    pipeline layout, latent (StableDiffusionPipeline: SD 1.x / 2.x; see `sdedit.latent`):
        model_index.json  unet/ (UNet2DConditionModel)  vae/  text_encoder/  tokenizer/
        scheduler/scheduler_config.json

Weights are read with safetensors, or `torch.load(weights_only=True)`: no arbitrary unpickling.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from sdedit.accel import Acceleration, NetRunner
from sdedit.latent import LatentCodec, TextEncoder, check_latent_layout, load_latent_parts
from sdedit.schedules import VESchedule, VPSchedule
from sdedit.sources import ModelSourceError, files_identity, resolve

logger = logging.getLogger(__name__)

__all__ = ["DiffusionModel", "ModelLayout", "ModelSourceError", "inspect_model_dir",
           "load_model"]

VP_SCHEDULERS = {"DDPMScheduler", "DDIMScheduler", "GaussianDDPMScheduler", "PNDMScheduler",
                 "DPMSolverMultistepScheduler", "EulerDiscreteScheduler",
                 "EulerAncestralDiscreteScheduler", "LMSDiscreteScheduler",
                 "DPMSolverSinglestepScheduler", "UniPCMultistepScheduler",
                 "HeunDiscreteScheduler", "KDPM2DiscreteScheduler", "DEISMultistepScheduler"}
"""Scheduler classes whose config is a discrete VP schedule (betas); only the betas are used."""
VE_SCHEDULERS = {"ScoreSdeVeScheduler"}
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


@dataclass
class DiffusionModel:
    """A pretrained network plus the schedule it was trained with; pixel or latent.

    Attributes:
        net: a diffusers UNet2DModel (pixel) or UNet2DConditionModel (latent) in eval mode on
            `device`, float32 weights.
        kind: "vp" (DDPM-style, discrete timesteps) or "ve" (score SDE, continuous sigma).
        prediction_type: "epsilon", "sample" or "v_prediction" for VP; "score" for VE.
        vp / ve: the schedule of the kind (the other is None).
        sample_size: (H, W) in pixels the model was trained at (latent: latent size x factor).
        in_channels: C of the images `edit` takes (latent models: the VAE's, 3).
        downsample_factor: image H and W must be multiples of this (latent: VAE factor x UNet
            downsampling factor).
        source: the source string it was loaded from (no credentials).
        device: where the network runs.
        dtype: the network's compute precision: float32, or bfloat16 / float16 under autocast
            (the UNet only; the VAE and text encoder run in float32).
        accel: how the network runs (autocast, channels_last, compile, CUDA graphs, noise
            threads); see `sdedit.accel`. Change it with `accelerate`.
        codec: the VAE codec of a latent model (None for pixel models).
        text: the prompt encoder of a text-conditioned model (None for unconditional ones).
        identity: what the weights are: "sha256:<hex>" over the files the model was built from
            (`sdedit.sources.files_identity`), or "hf:<repo id>@<commit>" for a hub snapshot;
            "" when the model was assembled by hand.
    """

    net: torch.nn.Module
    kind: Literal["vp", "ve"]
    prediction_type: str
    vp: VPSchedule | None
    ve: VESchedule | None
    sample_size: tuple[int, int]
    in_channels: int
    downsample_factor: int
    source: str
    device: torch.device
    dtype: torch.dtype
    accel: Acceleration = field(default_factory=Acceleration)
    codec: LatentCodec | None = None
    text: TextEncoder | None = None
    identity: str = ""
    _runner: NetRunner | None = field(default=None, init=False, repr=False, compare=False)
    _abar: torch.Tensor | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def conditional(self) -> bool:
        """True for text-conditioned models: `edit` then takes prompts and a guidance scale."""
        return self.text is not None

    @property
    def latent(self) -> bool:
        """True when the chain runs on VAE latents (`codec` is set)."""
        return self.codec is not None

    def state_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """(C, h, w) of the chain's state and of each noise draw for an H x W image."""
        if self.codec is None:
            return self.in_channels, height, width
        f = self.codec.factor
        return self.codec.channels, height // f, width // f

    def accelerate(self, **options: Any) -> DiffusionModel:
        """Change `accel` in place (fields of `sdedit.accel.Acceleration`); returns self.

        `autocast` also sets `dtype` (None = float32)."""
        self.accel = dataclasses.replace(self.accel, **options)
        self.dtype = self.accel.autocast or torch.float32
        self._runner = None
        return self

    def forward(self, x: torch.Tensor, t: torch.Tensor,
                context: torch.Tensor | None = None) -> torch.Tensor:
        """The raw network output, float32 (B, C, H, W), run as `accel` says.

        context: float32 (B, L, D) text embeddings, required by (only) conditional models."""
        if (context is None) == self.conditional:
            raise ValueError(f"context is {'missing' if context is None else 'given'}; allowed: "
                             "(B, L, D) embeddings for text-conditioned models, else None")
        if self._runner is None:
            self._runner = NetRunner(self.net, self.accel, self.device)
        return self._runner(x, t, context)

    @torch.no_grad()
    def eps(self, x: torch.Tensor, t: torch.Tensor,
            context: torch.Tensor | None = None) -> torch.Tensor:
        """VP noise prediction. x: float32 (B, C, H, W); t: (B,) int64 in [0, T);
        context: (B, L, D) for conditional models -> float32 (B, C, H, W)."""
        out = self.forward(x, t, context)
        if self.prediction_type == "epsilon":
            return out
        assert self.vp is not None
        if self._abar is None or self._abar.device != x.device:
            self._abar = self.vp.alphas_cumprod.to(x.device, torch.float32)
        abar = self._abar[t].view(-1, 1, 1, 1)
        if self.prediction_type == "sample":
            return (x - abar.sqrt() * out) / (1 - abar).sqrt()
        return abar.sqrt() * out + (1 - abar).sqrt() * x  # v_prediction

    @torch.no_grad()
    def score(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """VE score s(x, sigma) = grad log p_sigma(x). x: float32 (B, C, H, W); sigma: (B,)."""
        return self.forward(x, sigma.float())

    @torch.no_grad()
    def warm_up(self, batch_size: int) -> None:
        """One network call of `edit`'s shape at `sample_size` (the allocator's first-call cost;
        conditional models: the doubled guidance batch with empty-prompt embeddings)."""
        shape = self.state_shape(*self.sample_size)
        x = torch.zeros(batch_size, *shape, device=self.device)
        if self.kind == "ve":
            self.score(x, torch.ones(batch_size, device=self.device))
            return
        t = torch.ones(batch_size, dtype=torch.long, device=self.device)
        if self.text is None:
            self.eps(x, t)
            return
        context = self.text.embed([""] * (2 * batch_size))
        self.eps(torch.cat([x, x]), torch.cat([t, t]), context)


def load_model(
    source: str | os.PathLike[str],
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    storage_options: dict[str, Any] | None = None,
    accel: Acceleration | None = None,
) -> DiffusionModel:
    """Load a diffusers model directory (pixel UNet2DModel or a latent StableDiffusionPipeline)
    and its scheduler config as a `DiffusionModel`.

    Args:
        source: a local directory, a hub id ("google/ddpm-ema-bedroom-256"), or an fsspec URL
            ("s3://bucket/models/bedroom", "memory://m") to a directory in one of the layouts.
        device, dtype: where and in what precision the network runs (sampling stays float32;
            bfloat16 / float16 run the UNet under autocast with float32 weights).
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
    resolved = resolve(text, cache_dir, storage_options)
    directory = resolved.directory
    layout = inspect_model_dir(directory, text)
    unet_dir, config = layout.unet_dir, layout.config
    kind, prediction, vp, ve = layout.kind, layout.prediction_type, layout.vp, layout.ve
    codec = encoder = None
    if layout.latent:
        net, codec, encoder, files = load_latent_parts(directory, text, layout.index, config,
                                                       layout.vae_config)
    else:
        net, weights = _build_net(unet_dir, config, text)
        files = [unet_dir / "config.json", weights]
    files.append(layout.scheduler_path)
    dev = torch.device(device)
    net = net.to(device=dev).eval().requires_grad_(False)
    if codec is not None and encoder is not None:
        codec.vae.to(dev)
        encoder.encoder.to(dev)
    half = dtype if dtype != torch.float32 else None
    accel = dataclasses.replace(accel or Acceleration.default(device, dtype), autocast=half)
    size = config.get("sample_size", 256)
    sample_size = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    factor = 2 ** (len(config.get("down_block_types", ())) - 1)
    channels = int(config.get("in_channels", 3))
    if codec is not None:
        sample_size = (sample_size[0] * codec.factor, sample_size[1] * codec.factor)
        factor *= codec.factor
        channels = int(codec.vae.config.in_channels)
    identity = f"hf:{text}@{resolved.revision}" if resolved.revision else \
        files_identity(directory, files)
    model = DiffusionModel(
        net=net, kind=kind, prediction_type=prediction, vp=vp, ve=ve, sample_size=sample_size,
        in_channels=channels, downsample_factor=factor, source=text, device=dev, dtype=dtype,
        accel=accel, codec=codec, text=encoder, identity=identity,
    )
    logger.info("loaded %s %s model %s (%s, %s) on %s", "latent" if codec else "pixel",
                kind.upper(), text, prediction,
                f"{sum(p.numel() for p in net.parameters()) / 1e6:.2f}M params", device)
    return model


@dataclass(frozen=True)
class ModelLayout:
    """What a model directory holds, read from its JSON files only (no weights)."""

    unet_dir: Path
    scheduler_path: Path
    config: dict[str, Any]
    """The network's config.json."""
    kind: Literal["vp", "ve"]
    prediction_type: str
    vp: VPSchedule | None
    ve: VESchedule | None
    latent: bool
    index: dict[str, Any] = field(default_factory=dict)
    """model_index.json of a latent pipeline ({} otherwise)."""
    vae_config: dict[str, Any] = field(default_factory=dict)


def inspect_model_dir(directory: Path, source: str) -> ModelLayout:
    """Check that `directory` looks loadable by `load_model`, without reading weights: a
    supported layout, config files that parse and name a supported network class and
    scheduler, and the weights files present.

    Args:
        directory: the local model directory (a hub snapshot or a URL copy included).
        source: the source string, for messages.
    Raises:
        ModelSourceError naming the source and what is wrong.
    """
    unet_dir, scheduler_path = _layout(directory, source)
    config = _read_json(unet_dir / "config.json", source)
    scheduler = _read_json(scheduler_path, source)
    kind, prediction, vp, ve = _schedule(scheduler, config, source)
    latent = unet_dir != directory and config.get("_class_name") == "UNet2DConditionModel"
    if not latent:
        _check_pixel_net(unet_dir, config, source)
        return ModelLayout(unet_dir, scheduler_path, config, kind, prediction, vp, ve, False)
    if kind != "vp":
        raise ModelSourceError(f"model source {source!r}: a latent model needs a VP scheduler")
    index = _read_json(directory / "model_index.json", source)
    vae = _read_json(directory / "vae" / "config.json", source) \
        if (directory / "vae").is_dir() else {}
    check_latent_layout(directory, source, index, config, vae)
    return ModelLayout(unet_dir, scheduler_path, config, kind, prediction, vp, ve, True,
                       index, vae)


def _layout(directory: Path, source: str) -> tuple[Path, Path]:
    """(unet directory, scheduler config path) for the root or pipeline layout."""
    if (directory / "unet" / "config.json").exists():
        return directory / "unet", directory / "scheduler" / "scheduler_config.json"
    if (directory / "config.json").exists():
        return directory, directory / "scheduler_config.json"
    raise ModelSourceError(
        f"model source {source!r}: no config.json or unet/config.json in {directory}; expected a "
        "diffusers UNet2DModel directory (config.json, diffusion_pytorch_model.safetensors, "
        "scheduler_config.json)"
    )


def _read_json(path: Path, source: str) -> dict[str, Any]:
    if not path.exists():
        raise ModelSourceError(f"model source {source!r}: missing {path.name} ({path})")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelSourceError(f"model source {source!r}: {path.name} is not valid JSON: {exc}") \
            from exc
    if not isinstance(data, dict):
        raise ModelSourceError(f"model source {source!r}: {path.name} is not a JSON object")
    return data


def _check_pixel_net(unet_dir: Path, config: dict[str, Any], source: str) -> Path:
    """The weights file of a pixel UNet2DModel directory; raises ModelSourceError for another
    network class or no weights."""
    name = config.get("_class_name", "UNet2DModel")
    if name != "UNet2DModel":
        raise ModelSourceError(
            f"model source {source!r}: network class {name!r} is not supported; allowed: "
            "UNet2DModel (unconditional pixel-space diffusion models); text-conditioned "
            "UNet2DConditionModel only in a StableDiffusionPipeline directory (model_index.json)"
        )
    weights = next((unet_dir / f for f in WEIGHT_FILES if (unet_dir / f).exists()), None)
    if weights is None:
        raise ModelSourceError(
            f"model source {source!r}: no weights in {unet_dir}; expected one of {WEIGHT_FILES}")
    return weights


def _build_net(unet_dir: Path, config: dict[str, Any], source: str
               ) -> tuple[torch.nn.Module, Path]:
    from diffusers import UNet2DModel

    weights = _check_pixel_net(unet_dir, config, source)
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
    return net, weights


def _schedule(
    scheduler: dict[str, Any], config: dict[str, Any], source: str
) -> tuple[Literal["vp", "ve"], str, VPSchedule | None, VESchedule | None]:
    name = scheduler.get("_class_name", "")
    fourier = config.get("time_embedding_type") == "fourier"
    if name in VE_SCHEDULERS or (not name and "sigma_max" in scheduler):
        if not fourier:
            raise ModelSourceError(
                f"model source {source!r}: a VE scheduler with time embedding "
                f"{config.get('time_embedding_type')!r}; VE score models need 'fourier'")
        return "ve", "score", None, VESchedule.from_config(scheduler)
    if name in VP_SCHEDULERS or (not name and "beta_start" in scheduler):
        prediction = scheduler.get("prediction_type", "epsilon")
        if prediction not in ("epsilon", "sample", "v_prediction"):
            raise ModelSourceError(
                f"model source {source!r}: prediction_type {prediction!r} is not supported; "
                "allowed: epsilon, sample, v_prediction")
        return "vp", prediction, VPSchedule.from_config(scheduler), None
    raise ModelSourceError(
        f"model source {source!r}: scheduler {name or '(no _class_name)'!r} is not supported; "
        f"allowed: VP ({', '.join(sorted(VP_SCHEDULERS))}) or VE (ScoreSdeVeScheduler)")
