"""Latent, text-conditioned models: the VAE codec, prompt embeddings and classifier-free guidance.

The StableDiffusionPipeline layout (SD 1.x / 2.x):

    model_index.json  unet/ (UNet2DConditionModel)  vae/ (AutoencoderKL)
    text_encoder/ (CLIPTextModel)  tokenizer/ (CLIPTokenizer)  scheduler/scheduler_config.json

Components are built with diffusers' / transformers' `from_pretrained` (safetensors, or
`torch.load(weights_only=True)` for .bin), in float32, full-precision weights only. The safety
checker and feature extractor are never loaded. The SDXL layout (two text encoders, pooled
embeddings and size/crop time ids) is refused with a clear error.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sdedit.sources import ModelSourceError

logger = logging.getLogger(__name__)

__all__ = ["GuidedEps", "LatentCodec", "TextEncoder", "latent_mask", "load_latent_parts"]

SUPPORTED = ("the StableDiffusionPipeline layout (SD 1.x / 2.x): unet UNet2DConditionModel, vae "
             "AutoencoderKL, text_encoder CLIPTextModel, tokenizer CLIPTokenizer, scheduler")


@dataclass
class LatentCodec:
    """The VAE of a latent model: guides to latents and back.

    Attributes:
        vae: a diffusers AutoencoderKL in eval mode, float32 weights, on the model's device.
        scaling_factor, shift_factor: z = (mean - shift) * scale; shift is 0 when the config
            has none (SD 1.x / 2.x).
        factor: pixels per latent cell along each side (8 for SD).
        channels: latent channels C (4 for SD).
    """

    vae: torch.nn.Module
    scaling_factor: float
    shift_factor: float
    factor: int
    channels: int

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """float32 (N, 3, H, W) in [-1, 1] -> float32 (N, C, H/f, W/f): the posterior mean
        (deterministic), shifted and scaled."""
        mean = self.vae.encode(images).latent_dist.mean
        return ((mean - self.shift_factor) * self.scaling_factor).float()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """float32 (N, C, h, w) -> float32 (N, 3, h*f, w*f) clamped to [-1, 1]."""
        x = self.vae.decode(latents / self.scaling_factor + self.shift_factor).sample
        return x.float().clamp(-1.0, 1.0)


@dataclass
class TextEncoder:
    """Prompt embeddings: a CLIP tokenizer and text encoder (float32, eval, on the device).

    Attributes:
        tokenizer: a transformers CLIPTokenizer; prompts are padded ("max_length") and truncated
            to its `model_max_length` L.
        encoder: a transformers CLIPTextModel; its last hidden state (L, D) is the embedding.
    """

    tokenizer: Any
    encoder: torch.nn.Module

    @property
    def max_length(self) -> int:
        return int(self.tokenizer.model_max_length)

    @torch.no_grad()
    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        """float32 (len(texts), L, D): each distinct text is tokenised and encoded once."""
        distinct = list(dict.fromkeys(texts))
        tokens = self.tokenizer(distinct, padding="max_length", max_length=self.max_length,
                                truncation=True, return_tensors="pt")
        long = [t for t, ids in zip(distinct, self.tokenizer(distinct).input_ids, strict=True)
                if len(ids) > self.max_length]
        if long:
            logger.warning("%d prompt(s) truncated to %d tokens, e.g. %r", len(long),
                           self.max_length, long[0][:80])
        device = next(self.encoder.parameters()).device
        mask = None
        if getattr(self.encoder.config, "use_attention_mask", False):
            mask = tokens.attention_mask.to(device)
        out = self.encoder(tokens.input_ids.to(device), attention_mask=mask)[0].float()
        where = {text: i for i, text in enumerate(distinct)}
        return out[torch.tensor([where[t] for t in texts], device=device)]


def latent_mask(masks: torch.Tensor, factor: int) -> torch.Tensor:
    """(N, 1, H, W) pixel masks in {0, 1} -> (N, 1, H/f, W/f): a latent cell is regenerated
    (1) if any of its f x f pixels is (max-pooling)."""
    return torch.nn.functional.max_pool2d(masks, kernel_size=factor, stride=factor)


class GuidedEps:
    """Classifier-free guidance over one batch: eps = eps_u + g (eps_c - eps_u) (Ho & Salimans,
    2022), eps_u from the negative prompt; only the conditional pass when g == 1. The two passes
    run as one network call on [uncond rows; cond rows], as diffusers does.

    The samplers may call a denoiser with a subset of the batch: the samples whose (end-aligned)
    step lists still have a step to take, i.e. at any call, the samples with the most remaining
    steps. Such a subset is fixed by its size, so the rows' embeddings are found from the batch
    size alone (no device sync); a size no such subset has raises RuntimeError.

    Args:
        eps: (x (B, C, h, w), t (B,), context (B, L, D)) -> eps, float32 (B, C, h, w).
        cond, uncond: float32 (N, L, D) embeddings of each sample's prompt / negative prompt.
        scale: the guidance scale g.
        lengths: each sample's number of reverse steps (network evaluations) per round.
    """

    def __init__(self, eps: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
                 cond: torch.Tensor, uncond: torch.Tensor, scale: float,
                 lengths: Sequence[int]) -> None:
        self.eps = eps
        self.scale = scale
        self.guided = scale != 1.0
        self.cond = cond
        self.both = torch.cat([uncond, cond]) if self.guided else cond
        self.n = len(lengths)
        order = sorted(range(self.n), key=lambda i: -lengths[i])
        self.subsets: dict[int, torch.Tensor] = {}
        for size in range(1, self.n):
            if lengths[order[size - 1]] != lengths[order[size]]:
                rows = sorted(order[:size])
                both = rows + [self.n + i for i in rows] if self.guided else rows
                self.subsets[size] = torch.tensor(both, device=cond.device)

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x: float32 (B, C, h, w); t: (B,) int64 -> guided eps, float32 (B, C, h, w)."""
        size = x.shape[0]
        if size == self.n:
            context = self.both
        elif size in self.subsets:
            context = self.both[self.subsets[size]]
        else:
            raise RuntimeError(f"the sampler asked for {size} of {self.n} samples; no set of "
                               "samples with the most remaining steps has that size")
        if not self.guided:
            return self.eps(x, t, context)
        eps_u, eps_c = self.eps(torch.cat([x, x]), torch.cat([t, t]), context).chunk(2)
        return eps_u + self.scale * (eps_c - eps_u)


def load_latent_parts(directory: Path, source: str, index: dict[str, Any],
                      unet_config: dict[str, Any], vae_config: dict[str, Any]
                      ) -> tuple[torch.nn.Module, LatentCodec, TextEncoder, list[Path]]:
    """(unet, codec, text encoder, files read) of a StableDiffusionPipeline directory, on CPU.

    Args:
        index, unet_config, vae_config: model_index.json, unet/ and vae/config.json, checked
            before any weights are read.
    Raises:
        ModelSourceError naming the source, the component and what is supported.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    check_latent_layout(directory, source, index, unet_config, vae_config)
    unet = _component(UNet2DConditionModel, directory, "unet", source)
    vae = _component(AutoencoderKL, directory, "vae", source)
    encoder = _component(CLIPTextModel, directory, "text_encoder", source)
    tokenizer = _component(CLIPTokenizer, directory, "tokenizer", source)
    shift = vae.config.get("shift_factor")
    codec = LatentCodec(vae=vae, scaling_factor=float(vae.config.get("scaling_factor", 0.18215)),
                        shift_factor=float(shift) if shift is not None else 0.0,
                        factor=2 ** (len(vae.config.block_out_channels) - 1),
                        channels=int(vae.config.latent_channels))
    files = [directory / "unet" / "config.json", directory / "vae" / "config.json",
             directory / "text_encoder" / "config.json"]
    files += [f for name in ("unet", "vae", "text_encoder") for f in _weights(directory / name)]
    files += [f for f in (directory / "tokenizer").iterdir() if f.is_file()]
    return unet, codec, TextEncoder(tokenizer=tokenizer, encoder=encoder), files


def check_latent_layout(directory: Path, source: str, index: dict[str, Any],
                        unet_config: dict[str, Any], vae_config: dict[str, Any]) -> None:
    """Check a StableDiffusionPipeline directory without reading any weights: the layout is
    supported, the UNet and VAE configs fit, and unet/, vae/ and text_encoder/ hold weights.

    Raises:
        ModelSourceError naming the source, the component and what is supported.
    """
    _refuse_unsupported(directory, source, index)
    _check_unet(unet_config, vae_config, source)
    for name in ("unet", "vae", "text_encoder"):
        if not _weights(directory / name):
            raise ModelSourceError(f"model source {source!r}: no weights in {name}/ "
                                   f"({directory / name}); supported: {SUPPORTED}")


def _refuse_unsupported(directory: Path, source: str, index: dict[str, Any]) -> None:
    name = str(index.get("_class_name", ""))
    if "XL" in name or "text_encoder_2" in index or (directory / "text_encoder_2").exists():
        raise ModelSourceError(
            f"model source {source!r}: the SDXL layout ({name or 'text_encoder_2'}: two text "
            f"encoders, pooled embeddings, size/crop time ids) is not supported; supported: "
            f"{SUPPORTED}")
    for part in ("unet", "vae", "text_encoder", "tokenizer"):
        if not (directory / part).is_dir():
            raise ModelSourceError(f"model source {source!r}: no {part}/ folder in {directory};"
                                   f" supported: {SUPPORTED}")


def _component(cls: Any, directory: Path, name: str, source: str) -> Any:
    options = {}
    if isinstance(cls, type) and issubclass(cls, torch.nn.Module):
        # meta-device initialisation needs accelerate; without it, say so once (not per part)
        options["low_cpu_mem_usage"] = importlib.util.find_spec("accelerate") is not None
    try:
        part = cls.from_pretrained(directory / name, **options)
    except Exception as exc:
        raise ModelSourceError(
            f"model source {source!r}: cannot load {name}/ as {cls.__name__}: "
            f"{type(exc).__name__}: {str(exc)[:300]}") from exc
    if isinstance(part, torch.nn.Module):
        part = part.float().eval().requires_grad_(False)
    return part


def _check_unet(unet: dict[str, Any], vae: dict[str, Any], source: str) -> None:
    for key in ("addition_embed_type", "class_embed_type", "time_cond_proj_dim",
                "encoder_hid_dim_type"):
        if unet.get(key) is not None:
            raise ModelSourceError(
                f"model source {source!r}: unet config {key}={unet.get(key)!r} is not supported"
                f" (extra conditioning); supported: {SUPPORTED}")
    if vae.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
        raise ModelSourceError(f"model source {source!r}: vae class {vae.get('_class_name')!r}"
                               f" is not supported; supported: {SUPPORTED}")
    latent = vae.get("latent_channels", 4)
    unet_in, unet_out = unet.get("in_channels", 4), unet.get("out_channels", 4)
    if unet_in != latent or unet_out != latent:
        raise ModelSourceError(
            f"model source {source!r}: unet in/out channels {unet_in}/{unet_out} do not match "
            f"the VAE's {latent} latent channels (inpainting and depth UNets are not "
            f"supported); supported: {SUPPORTED}")


def _weights(folder: Path) -> list[Path]:
    """The full-precision weight files from_pretrained reads in `folder` (safetensors first)."""
    for ext in ("safetensors", "bin"):
        for stem in ("diffusion_pytorch_model", "model", "pytorch_model"):
            single = folder / f"{stem}.{ext}"
            if single.exists():
                return [single]
            if (folder / f"{stem}.{ext}.index.json").exists():
                index = folder / f"{stem}.{ext}.index.json"
                return [*sorted(folder.glob(f"{stem}-*-of-*.{ext}")), index]
    return []
