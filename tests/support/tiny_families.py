"""Tiny seeded Qwen-Image, Z-Image and Chroma img2img pipelines, built offline from configs.

The transformer, VAE and text-encoder configs are those of diffusers' own pipeline tests
(tests/pipelines/qwenimage, z_image, chroma), with vocabularies cut to the tokenizers written
here: a byte-level BPE trained with the `tokenizers` library on the Qwen prompt template and a
few words (Qwen2Tokenizer, with a chat template for Z-Image), and the T5 Unigram tokenizer of
`tests.support.tiny_flow`. Qwen-Image gets Qwen/Qwen-Image's scheduler config (dynamic shift,
shift_terminal 0.02) and a VAE with non-trivial latents_mean / latents_std. Saved with
`save_pretrained`, so tests read them through the real loading path. Side multiples: Qwen-Image
8 (VAE factor 4 x packing 2), Z-Image 4 (factor 2 x patch 2), Chroma 4 (factor 2 x packing 2).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderKLQwenImage,
    ChromaImg2ImgPipeline,
    ChromaTransformer2DModel,
    FlowMatchEulerDiscreteScheduler,
    QwenImageImg2ImgPipeline,
    QwenImageTransformer2DModel,
    ZImageImg2ImgPipeline,
    ZImageTransformer2DModel,
)
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, trainers
from transformers import (
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Tokenizer,
    Qwen3Config,
    Qwen3Model,
)

from sdedit.families.qwen_image import TEMPLATE
from tests.support.tiny_flow import t5_tokenizer, tiny_t5
from tests.support.tiny_latent import WORDS

SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                 "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
                 "{% endif %}")


def qwen_tokenizer() -> Qwen2Tokenizer:
    """A byte-level BPE (about 400 tokens) trained on the Qwen-Image template around a few
    words, with <|im_start|> / <|im_end|> as single special tokens and a chat template."""
    corpus = [TEMPLATE.format(" ".join(WORDS[i:i + 3])) for i in range(len(WORDS))]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    model = json.loads(bpe.to_str())["model"]
    vocab = dict(model["vocab"])
    for token in SPECIALS:
        vocab[token] = len(vocab)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[tuple(m) for m in model["merges"]])
    tokenizer.add_tokens([AddedToken(t, special=True) for t in SPECIALS[1:]])
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def qwen_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """Qwen/Qwen-Image's scheduler config."""
    return FlowMatchEulerDiscreteScheduler(
        base_image_seq_len=256, base_shift=0.5, max_image_seq_len=8192, max_shift=0.9,
        shift=1.0, shift_terminal=0.02, use_dynamic_shifting=True, time_shift_type="exponential")


def tiny_qwen_pipeline(seed: int = 0) -> QwenImageImg2ImgPipeline:
    tokenizer = qwen_tokenizer()
    torch.manual_seed(seed)
    net = QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16,
        num_attention_heads=3, joint_attention_dim=16, guidance_embeds=False,
        axes_dims_rope=(8, 4, 4)).eval()
    torch.manual_seed(seed + 1)
    vae = AutoencoderKLQwenImage(
        base_dim=24, z_dim=4, dim_mult=[1, 2, 4], num_res_blocks=1,
        temperal_downsample=[False, True], latents_mean=[0.1, -0.2, 0.0, 0.3],
        latents_std=[1.5, 0.8, 1.0, 2.0]).eval()
    vocab = len(tokenizer)
    config = Qwen2_5_VLConfig(
        text_config={"hidden_size": 16, "intermediate_size": 16, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "num_key_value_heads": 2, "vocab_size": vocab,
                     "bos_token_id": None, "eos_token_id": tokenizer.eos_token_id,
                     "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default",
                                      "type": "default"}, "rope_theta": 1000000.0},
        vision_config={"depth": 2, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2,
                       "out_hidden_size": 16},
        hidden_size=16, vocab_size=vocab, vision_start_token_id=vocab, image_token_id=vocab + 3,
        video_token_id=vocab + 4,
        vision_end_token_id=vocab + 1, vision_token_id=vocab + 2)
    torch.manual_seed(seed + 2)
    encoder = Qwen2_5_VLForConditionalGeneration(config).eval()
    return QwenImageImg2ImgPipeline(scheduler=qwen_scheduler(), vae=vae, text_encoder=encoder,
                                    tokenizer=tokenizer, transformer=net)


def tiny_z_image_pipeline(seed: int = 0) -> ZImageImg2ImgPipeline:
    """Z-Image's tiny test config with Turbo's scheduler (static shift 3.0)."""
    tokenizer = qwen_tokenizer()
    torch.manual_seed(seed)
    net = ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=32, n_layers=2,
        n_refiner_layers=1, n_heads=2, n_kv_heads=2, norm_eps=1e-5, qk_norm=True,
        cap_feat_dim=16, rope_theta=256.0, t_scale=1000.0, axes_dims=[8, 4, 4],
        axes_lens=[256, 32, 32]).eval()
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[32, 64],
        layers_per_block=1, latent_channels=16, norm_num_groups=32, sample_size=32,
        scaling_factor=0.3611, shift_factor=0.1159).eval()
    torch.manual_seed(seed + 2)
    encoder = Qwen3Model(Qwen3Config(
        hidden_size=16, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=512,
        bos_token_id=None, eos_token_id=tokenizer.eos_token_id)).eval()
    return ZImageImg2ImgPipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                 vae=vae, text_encoder=encoder, tokenizer=tokenizer,
                                 transformer=net)


def tiny_chroma_pipeline(seed: int = 0) -> ChromaImg2ImgPipeline:
    """Chroma's tiny test config with Flux-dev's scheduler (dynamic shift) and a VAE of factor
    2 (that of `tests.support.tiny_flow`)."""
    from tests.support.tiny_flow import flux_scheduler, tiny_flow_vae

    torch.manual_seed(seed)
    net = ChromaTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=[4, 4, 8],
        approximator_hidden_dim=32, approximator_layers=1,
        approximator_num_channels=16).eval()
    return ChromaImg2ImgPipeline(
        scheduler=flux_scheduler(dev=True), vae=tiny_flow_vae(seed, 0.1159, 0.3611),
        text_encoder=tiny_t5(seed + 2), tokenizer=t5_tokenizer(), transformer=net)


def save_family_model(path: Path, family: str, seed: int = 0) -> Path:
    """A tiny pipeline directory of `family` ("qwen-image", "z-image" or "chroma")."""
    build = {"qwen-image": tiny_qwen_pipeline, "z-image": tiny_z_image_pipeline,
             "chroma": tiny_chroma_pipeline}[family]
    build(seed).save_pretrained(path)
    return path
