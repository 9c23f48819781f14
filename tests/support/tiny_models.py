"""Tiny seeded diffusers models saved with save_pretrained: the real loading path, no download."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import DDPMScheduler, ScoreSdeVeScheduler, UNet2DModel


def tiny_unet(size: int = 16, seed: int = 0, fourier: bool = False,
              channels: tuple[int, ...] = (8, 16)) -> UNet2DModel:
    """A UNet2DModel of a few thousand parameters, deterministic for a seed."""
    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=size, in_channels=3, out_channels=3, layers_per_block=1,
        block_out_channels=channels, norm_num_groups=4,
        down_block_types=("DownBlock2D",) * len(channels),
        up_block_types=("UpBlock2D",) * len(channels),
        time_embedding_type="fourier" if fourier else "positional",
    ).eval()


def save_vp_model(path: Path, size: int = 16, seed: int = 0,
                  channels: tuple[int, ...] = (8, 16), safe: bool = True) -> Path:
    """A tiny DDPM (eps-prediction, linear betas 1e-4..0.02 over 1000) in the root layout."""
    tiny_unet(size, seed, channels=channels).save_pretrained(path, safe_serialization=safe)
    DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02,
                  beta_schedule="linear", variance_type="fixed_small",
                  clip_sample=False).save_config(path)
    return path


def save_ve_model(path: Path, size: int = 16, seed: int = 0) -> Path:
    """A tiny NCSN++-style score model (fourier embedding) with a ScoreSdeVeScheduler config."""
    tiny_unet(size, seed, fourier=True).save_pretrained(path)
    ScoreSdeVeScheduler(num_train_timesteps=200, sigma_min=0.01, sigma_max=50.0,
                        snr=0.15).save_config(path)
    return path
