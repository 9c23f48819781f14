"""Tiny seeded latent text-to-image components (the Stable Diffusion layout), built from configs.

A UNet2DConditionModel of ~0.2M parameters, a tiny AutoencoderKL (factor 2), a tiny
CLIPTextModel and a CLIP tokenizer from a vocab / merges file written here; saved with
`save_pretrained` as a StableDiffusionPipeline directory, so tests read them through the real
loading path. Images of 16 x 16 pixels are 8 x 8 latents; sides must be multiples of 4.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    StableDiffusionImg2ImgPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

MAX_LENGTH = 12
WORDS = ("red", "blue", "cat", "dog", "room", "bed", "lamp", "sky")


def write_clip_vocab(folder: Path) -> Path:
    """vocab.json + merges.txt of a tiny CLIP BPE: letters, letters ending a word, a few whole
    words, and the two special tokens (ids 0..len-1)."""
    folder.mkdir(parents=True, exist_ok=True)
    tokens = list(string.ascii_lowercase) + [c + "</w>" for c in string.ascii_lowercase]
    merges = []
    for word in WORDS:  # merge left to right: r e -> re, re d</w> -> red</w>
        head = word[0]
        for i, c in enumerate(word[1:], start=1):
            piece = c + "</w>" if i == len(word) - 1 else c
            merges.append(f"{head} {piece}")
            head = head + piece
            if head not in tokens:
                tokens.append(head)
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"model_max_length": MAX_LENGTH, "tokenizer_class": "CLIPTokenizer"}))
    return folder


def tiny_tokenizer(folder: Path) -> CLIPTokenizer:
    return CLIPTokenizer.from_pretrained(write_clip_vocab(folder))


def tiny_text_encoder(vocab_size: int, seed: int = 0) -> CLIPTextModel:
    torch.manual_seed(seed)
    config = CLIPTextConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=37,
                            num_attention_heads=4, num_hidden_layers=2,
                            max_position_embeddings=MAX_LENGTH, bos_token_id=vocab_size - 2,
                            eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1,
                            projection_dim=32)
    return CLIPTextModel(config).eval()


def tiny_vae(seed: int = 0, shift_factor: float | None = None) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1, norm_num_groups=4, sample_size=16, scaling_factor=0.5,
        shift_factor=shift_factor,
    ).eval()


def tiny_cond_unet(seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(16, 32), norm_num_groups=8, cross_attention_dim=32,
        attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    ).eval()


def tiny_scheduler(steps_offset: int) -> DDPMScheduler:
    """SD's schedule (scaled_linear 0.00085..0.012 over 1000), fixed_small, no clipping."""
    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                         beta_schedule="scaled_linear", variance_type="fixed_small",
                         clip_sample=False, steps_offset=steps_offset)


def tiny_sd_pipeline(folder: Path, seed: int = 0, shift_factor: float | None = None
                     ) -> StableDiffusionImg2ImgPipeline:
    """The tiny components as a diffusers img2img pipeline (no safety checker). Its scheduler
    has steps_offset 1 (diffusers' pipelines insist on it at construction)."""
    tokenizer = tiny_tokenizer(folder / "vocab")
    return StableDiffusionImg2ImgPipeline(
        vae=tiny_vae(seed, shift_factor), text_encoder=tiny_text_encoder(len(tokenizer), seed),
        tokenizer=tokenizer, unet=tiny_cond_unet(seed), scheduler=tiny_scheduler(1),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def save_sd_model(path: Path, seed: int = 0, shift_factor: float | None = None) -> Path:
    """A tiny Stable Diffusion pipeline directory (model_index.json, unet/, vae/, text_encoder/,
    tokenizer/, scheduler/), saved with save_pretrained (safetensors). The tokenizer folder holds
    vocab.json, merges.txt and tokenizer_config.json, as in the SD 1.x repositories."""
    tiny_sd_pipeline(path.parent / f"{path.name}-vocab", seed, shift_factor).save_pretrained(path)
    for old in (path / "tokenizer").iterdir():
        old.unlink()
    write_clip_vocab(path / "tokenizer")
    return path
