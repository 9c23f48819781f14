"""Tiny seeded flow-matching pipelines (SD3 and Flux layouts), built offline from configs.

The configs are those of diffusers' own SD3 / Flux pipeline tests (MODEL_FAMILIES.md), with a
VAE of factor 2 and, for SD3, patch size 2 (so sides must be multiples of 4 for both). The CLIP
tokenizers are the vocab / merges files of `tests.support.tiny_latent`; the T5 tokenizer is a
Unigram vocabulary built here with the `tokenizers` backend of transformers' T5TokenizerFast.
Saved with `save_pretrained`, so tests read them through the real loading path. 16 x 16 images
are 8 x 8 x 4 latents (SD3: 16 tokens of patch 2; Flux: 16 packed tokens of 16 channels).
"""

from __future__ import annotations

import string
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxImg2ImgPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Img2ImgPipeline,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

from tests.support.tiny_latent import MAX_LENGTH, WORDS, tiny_tokenizer, write_clip_vocab


def t5_tokenizer() -> T5TokenizerFast:
    """A T5 Unigram tokenizer of a few whole words and single letters (ids: <pad> 0, </s> 1,
    <unk> 2), closing each text with </s> as T5's does."""
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [("\u2581" + w, -1.0) for w in WORDS]
    vocab += [(c, -3.0) for c in string.ascii_lowercase]
    vocab += [("\u2581" + c, -3.5) for c in string.ascii_lowercase]
    return T5TokenizerFast(vocab=vocab, extra_ids=0)


def tiny_t5(seed: int) -> T5EncoderModel:
    """diffusers' "tiny-random-t5" encoder config (d_model 32), seeded."""
    torch.manual_seed(seed)
    return T5EncoderModel(T5Config(
        d_model=32, d_ff=37, d_kv=8, num_heads=4, num_layers=5, vocab_size=1103,
        feed_forward_proj="relu", relative_attention_num_buckets=8, decoder_start_token_id=0,
        pad_token_id=0, eos_token_id=1)).eval()


def _clip_config(vocab_size: int) -> CLIPTextConfig:
    return CLIPTextConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=37,
                          num_attention_heads=4, num_hidden_layers=5, layer_norm_eps=1e-5,
                          hidden_act="gelu", max_position_embeddings=MAX_LENGTH,
                          bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1,
                          pad_token_id=vocab_size - 1, projection_dim=32)


def tiny_flow_vae(seed: int, shift: float, scale: float) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(4, 8),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1, norm_num_groups=1, sample_size=16, use_quant_conv=False,
        use_post_quant_conv=False, shift_factor=shift, scaling_factor=scale).eval()


def tiny_sd3_pipeline(folder: Path, seed: int = 0, t5: bool = True
                      ) -> StableDiffusion3Img2ImgPipeline:
    """A tiny SD3 img2img pipeline (shift 3.0; without T5 when `t5` is False)."""
    tokenizer = tiny_tokenizer(folder / "vocab")
    torch.manual_seed(seed)
    net = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8,
        num_attention_heads=4, joint_attention_dim=32, caption_projection_dim=32,
        pooled_projection_dim=64, out_channels=4).eval()
    torch.manual_seed(seed + 1)
    clip_l = CLIPTextModelWithProjection(_clip_config(len(tokenizer))).eval()
    torch.manual_seed(seed + 2)
    clip_g = CLIPTextModelWithProjection(_clip_config(len(tokenizer))).eval()
    return StableDiffusion3Img2ImgPipeline(
        transformer=net, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=tiny_flow_vae(seed, 0.0609, 1.5035), text_encoder=clip_l, tokenizer=tokenizer,
        text_encoder_2=clip_g, tokenizer_2=tokenizer,
        text_encoder_3=tiny_t5(seed + 3) if t5 else None,
        tokenizer_3=t5_tokenizer() if t5 else None)


def flux_scheduler(dev: bool) -> FlowMatchEulerDiscreteScheduler:
    """Flux-dev's scheduler config (dynamic shifting) or Flux-schnell's (shift 1, static)."""
    if dev:
        return FlowMatchEulerDiscreteScheduler(
            shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
            base_image_seq_len=256, max_image_seq_len=4096)
    return FlowMatchEulerDiscreteScheduler(shift=1.0)


def tiny_flux_pipeline(folder: Path, seed: int = 0, dev: bool = True) -> FluxImg2ImgPipeline:
    """A tiny Flux img2img pipeline: dev (guidance input, dynamic shift) or schnell."""
    tokenizer = tiny_tokenizer(folder / "vocab")
    torch.manual_seed(seed)
    net = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
        axes_dims_rope=[4, 4, 8], guidance_embeds=dev).eval()
    torch.manual_seed(seed + 1)
    clip = CLIPTextModel(_clip_config(len(tokenizer))).eval()
    return FluxImg2ImgPipeline(
        scheduler=flux_scheduler(dev), vae=tiny_flow_vae(seed, 0.1159, 0.3611),
        text_encoder=clip, tokenizer=tokenizer, text_encoder_2=tiny_t5(seed + 2),
        tokenizer_2=t5_tokenizer(), transformer=net)


def save_pipeline(pipe: StableDiffusion3Img2ImgPipeline | FluxImg2ImgPipeline, path: Path,
                  clip_folders: tuple[str, ...]) -> Path:
    """`pipe` saved with save_pretrained (safetensors); its CLIP tokenizer folders hold
    vocab.json, merges.txt and tokenizer_config.json, as in the hub repositories."""
    pipe.save_pretrained(path)
    for name in clip_folders:
        for old in (path / name).iterdir():
            old.unlink()
        write_clip_vocab(path / name)
    return path


def save_sd3_model(path: Path, seed: int = 0, t5: bool = True) -> Path:
    """A tiny SD3 pipeline directory."""
    return save_pipeline(tiny_sd3_pipeline(path.parent / f"{path.name}-vocab", seed, t5), path,
                         ("tokenizer", "tokenizer_2"))


def save_flux_model(path: Path, seed: int = 0, dev: bool = True) -> Path:
    """A tiny Flux pipeline directory (dev or schnell)."""
    return save_pipeline(tiny_flux_pipeline(path.parent / f"{path.name}-vocab", seed, dev),
                         path, ("tokenizer",))
