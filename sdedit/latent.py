"""Latent models: the VAE codec between guide pixels and the chain's latents, and latent masks.

Guides are encoded with the VAE's posterior mean, which draws no noise, so the reproducibility
contract holds on latents. The VAE takes batches in chunks and large images in tiles so that its
activations stay bounded (docs/performance.md#the-memory-plan).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["CHUNK_PIXELS", "LatentCodec", "chunk_size", "codec_from_vae", "latent_mask"]

CHUNK_PIXELS = 1024 * 1024
"""Pixels the VAE takes per call at most (a larger image goes whole)."""


def chunk_size(height: int, width: int) -> int:
    """Images of H x W the VAE takes per call: CHUNK_PIXELS // (H x W), at least 1."""
    return max(1, CHUNK_PIXELS // max(1, height * width))


@dataclass
class LatentCodec:
    """The VAE of a latent model: z = (mean - shift) * scale, with scalar or per-channel float32
    (1, C, 1, 1) factors; `factor` pixels per latent cell along a side."""

    vae: torch.nn.Module
    scaling_factor: float | torch.Tensor
    shift_factor: float | torch.Tensor
    factor: int
    channels: int

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the VAE computes in (its weights')."""
        return next(self.vae.parameters()).dtype

    def bound_memory(self) -> None:
        """Tile images above the VAE's sample size, where its class can."""
        switch = getattr(self.vae, "enable_tiling", None)
        if callable(switch):
            switch()

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """float32 (N, 3, H, W) in [-1, 1] -> float32 (N, C, H/f, W/f): the posterior mean
        (deterministic), shifted and scaled."""
        dtype, k = self.dtype, chunk_size(*images.shape[2:])
        mean = torch.cat([self.posterior_mean(part.to(dtype)).float()
                          for part in images.split(k)])
        shift, scale = _on(self.shift_factor, mean), _on(self.scaling_factor, mean)
        return (mean - shift) * scale

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """float32 (N, C, h, w) -> float32 (N, 3, h*f, w*f) clamped to [-1, 1]."""
        shift, scale = _on(self.shift_factor, latents), _on(self.scaling_factor, latents)
        z = latents / scale + shift
        k = chunk_size(z.shape[2] * self.factor, z.shape[3] * self.factor)
        x = torch.cat([self.pixels(part.to(self.dtype)).float() for part in z.split(k)])
        return x.clamp(-1.0, 1.0)

    def posterior_mean(self, images: torch.Tensor) -> torch.Tensor:
        """The VAE's own call: (n, 3, H, W) in its dtype -> posterior mean (n, C, h, w); a VAE
        of another shape overrides this and `pixels`."""
        return self.vae.encode(images).latent_dist.mean

    def pixels(self, z: torch.Tensor) -> torch.Tensor:
        """The VAE's own call: (n, C, h, w) unscaled latents in its dtype -> (n, 3, H, W)."""
        return self.vae.decode(z).sample


def _on(value: float | torch.Tensor, like: torch.Tensor) -> float | torch.Tensor:
    """A scalar as is; a per-channel tensor on `like`'s device."""
    return value.to(like.device) if isinstance(value, torch.Tensor) else value


def latent_mask(masks: torch.Tensor, factor: int) -> torch.Tensor:
    """(N, 1, H, W) pixel masks in {0, 1} -> (N, 1, H/f, W/f): a latent cell is regenerated
    (1) if any of its f x f pixels is (max-pooling)."""
    return torch.nn.functional.max_pool2d(masks, kernel_size=factor, stride=factor)


def codec_from_vae(vae: Any) -> LatentCodec:
    """The codec of a diffusers AutoencoderKL from its config (diffusers' defaults when unset)."""
    config = vae.config
    scale = float(config.get("scaling_factor", 0.18215))
    shift_value = config.get("shift_factor")
    shift: float | torch.Tensor = float(shift_value) if shift_value is not None else 0.0
    factor: float | torch.Tensor = scale
    mean, std = config.get("latents_mean"), config.get("latents_std")
    if mean is not None and std is not None:
        shift = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        factor = scale / torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return LatentCodec(vae=vae, scaling_factor=factor, shift_factor=shift,
                       factor=2 ** (len(config.block_out_channels) - 1),
                       channels=int(config.latent_channels))
