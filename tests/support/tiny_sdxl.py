"""Tiny seeded SDXL components (the StableDiffusionXL layout), built from configs, no download.

The UNet is the one diffusers' own SDXL tests use (addition_embed_type "text_time", linear
projections, two transformer layers in its second block), with norm groups and widths kept;
the VAE (factor 2) and the CLIP tokenizer (vocab / merges written here) are those of
`tests.support.tiny_latent`. Two CLIP text encoders: a CLIPTextModel and a
CLIPTextModelWithProjection (hidden 32 each: prompt embeddings are 64 wide, the pooled vector
32). Images of 16 x 16 pixels are 8 x 8 latents; sides must be multiples of 4.

The refiner layout (`refiner=True`): no text_encoder / tokenizer, `requires_aesthetics_score`,
5 time ids (projection_class_embeddings_input_dim 5 * 8 + 32 = 72), cross-attention 32.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import DDPMScheduler, StableDiffusionXLImg2ImgPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from tests.support.tiny_latent import (
    MAX_LENGTH,
    tiny_scheduler,
    tiny_tokenizer,
    tiny_vae,
    write_clip_vocab,
)


def _clip_config(vocab_size: int) -> CLIPTextConfig:
    return CLIPTextConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=37,
                          num_attention_heads=4, num_hidden_layers=3,
                          max_position_embeddings=MAX_LENGTH, bos_token_id=vocab_size - 2,
                          eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1,
                          projection_dim=32, hidden_act="gelu")


def tiny_sdxl_unet(seed: int = 0, refiner: bool = False) -> UNet2DConditionModel:
    """diffusers' tiny SDXL UNet (tests/pipelines/stable_diffusion_xl): 6 time ids x 8 + the
    32-wide pooled vector (base), or 5 x 8 + 32 with cross-attention 32 (refiner)."""
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(32, 64), norm_num_groups=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=72 if refiner else 80,
        cross_attention_dim=32 if refiner else 64,
    ).eval()


def tiny_sdxl_pipeline(folder: Path, seed: int = 0, refiner: bool = False,
                       scheduler: DDPMScheduler | None = None,
                       latents_mean_std: bool = False) -> StableDiffusionXLImg2ImgPipeline:
    """The tiny components as diffusers' SDXL img2img pipeline (no watermarker). Its scheduler
    is SD's DDPM schedule with steps_offset 0 unless `scheduler` is given. With
    `latents_mean_std` the VAE config carries per-channel latents_mean / latents_std (as
    SDXL-class VAEs of some repositories do)."""
    tokenizer = tiny_tokenizer(folder / "vocab")
    torch.manual_seed(seed + 1)
    encoder = CLIPTextModel(_clip_config(len(tokenizer))).eval()
    torch.manual_seed(seed + 2)
    encoder_2 = CLIPTextModelWithProjection(_clip_config(len(tokenizer))).eval()
    vae = tiny_vae(seed)
    if latents_mean_std:
        vae.register_to_config(latents_mean=[0.1, -0.2, 0.05, 0.0],
                               latents_std=[0.9, 1.2, 1.1, 0.8])
    vae.register_to_config(force_upcast=True)
    return StableDiffusionXLImg2ImgPipeline(
        vae=vae, text_encoder=None if refiner else encoder, text_encoder_2=encoder_2,
        tokenizer=None if refiner else tokenizer, tokenizer_2=tokenizer,
        unet=tiny_sdxl_unet(seed, refiner), scheduler=scheduler or tiny_scheduler(0),
        requires_aesthetics_score=refiner, force_zeros_for_empty_prompt=not refiner,
        add_watermarker=False,
    )


def save_sdxl_model(path: Path, seed: int = 0, refiner: bool = False,
                    latents_mean_std: bool = False) -> Path:
    """A tiny SDXL pipeline directory (model_index.json, unet/, vae/, text_encoder/,
    text_encoder_2/, tokenizer/, tokenizer_2/, scheduler/; the refiner without text_encoder/
    and tokenizer/), saved with save_pretrained (safetensors); tokenizer folders hold
    vocab.json, merges.txt and tokenizer_config.json as in the SDXL repositories."""
    tiny_sdxl_pipeline(path.parent / f"{path.name}-vocab", seed, refiner,
                       latents_mean_std=latents_mean_std).save_pretrained(path)
    for name in ("tokenizer", "tokenizer_2"):
        if (path / name).is_dir():
            for old in (path / name).iterdir():
                old.unlink()
            write_clip_vocab(path / name)
    return path
