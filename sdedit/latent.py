"""Latent models: the VAE codec between guide pixels and the chain's latents, and latent masks.

Every latent family (SD 1.x/2.x, SDXL, SD3, Flux) encodes guides with the VAE's posterior mean
(deterministic: it draws no noise), shifted and scaled as its pipeline does, runs the samplers on
latents and decodes once at the end. The VAE runs in its weights' dtype (`sdedit.precision`:
float32, or bf16 / fp16): its input is cast to it and its output back to float32. Encode and
decode take the batch in chunks of at most `CHUNK_PIXELS` pixels (one image per call at
1024 x 1024 and above; a batch of small images in one call, as before) and, above the VAE's own
sample size, in overlapping tiles (diffusers' tiling), so their activations stay those of about
one 1024 px image whatever the batch and the image size; images up to the sample size are
never tiled.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["CHUNK_PIXELS", "LatentCodec", "chunk_size", "codec_from_vae", "latent_mask"]

CHUNK_PIXELS = 1024 * 1024
"""Pixels the VAE encodes or decodes in one call at most (a whole image when it is larger)."""


def chunk_size(height: int, width: int) -> int:
    """Images of H x W the VAE takes per call: CHUNK_PIXELS // (H x W), at least 1."""
    return max(1, CHUNK_PIXELS // max(1, height * width))


@dataclass
class LatentCodec:
    """The VAE of a latent model: guides to latents and back.

    Attributes:
        vae: a diffusers AutoencoderKL in eval mode, float32 weights, on the model's device.
        scaling_factor, shift_factor: z = (mean - shift) * scale; shift is 0 when the config
            has none (SD 1.x / 2.x); per-channel float32 (1, C, 1, 1) tensors when the VAE
            config has `latents_mean` / `latents_std` (shift = mean, scale = scaling_factor /
            std, as diffusers' SDXL pipelines do).
        factor: pixels per latent cell along each side (8 for SD).
        channels: latent channels C (4 for SD).
    """

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
        """Tiling on above the VAE's sample size (see the module docstring), where the VAE
        class has it."""
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
        """The VAE's own call: (n, 3, H, W) in its dtype -> the posterior mean (n, C, h, w)
        (a VAE of another shape overrides this and `pixels`)."""
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
    """The codec of a diffusers AutoencoderKL (eval, float32) from its config: scaling_factor
    (default 0.18215), shift_factor (default 0), latents_mean / latents_std when present."""
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
