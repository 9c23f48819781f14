"""A tiny random CLIP model with its processor (tokenizer written here) and a random LAION
aesthetic predictor state dict with the published key layout, saved for offline tests."""

from __future__ import annotations

import string
from pathlib import Path

import torch

CLIP_WIDTH = 16
"""The tiny CLIP's projection width (the aesthetic predictor's input)."""


def save_clip(path: Path, seed: int = 0, image_size: int = 32, patch_size: int = 8) -> Path:
    """CLIPModel (hidden 32, 2 layers, 32 px images, patch 8, projection 16) and a
    CLIPProcessor (a character-level BPE tokenizer, an `image_size` px image processor)."""
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPProcessor,
        CLIPTokenizer,
    )

    vocab: dict[str, int] = {}
    for ch in string.ascii_lowercase + string.digits:
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    bos, eos = len(vocab), len(vocab) + 1
    vocab.update({"<|startoftext|>": bos, "<|endoftext|>": eos})
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    layers = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4,
                  num_hidden_layers=2)
    config = CLIPConfig(
        text_config=dict(layers, vocab_size=len(vocab), max_position_embeddings=32,
                         bos_token_id=bos, eos_token_id=eos, pad_token_id=eos),
        vision_config=dict(layers, image_size=image_size, patch_size=patch_size),
        projection_dim=CLIP_WIDTH)
    torch.manual_seed(seed)
    CLIPModel(config).save_pretrained(path)
    images = CLIPImageProcessor(size={"shortest_edge": image_size},
                                crop_size={"height": image_size, "width": image_size})
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(path)
    return path


def save_aesthetic(path: Path, width: int = CLIP_WIDTH, seed: int = 0) -> Path:
    """A random improved-aesthetic-predictor state dict (keys layers.0/2/4/6/7) at `path`
    (.pth: torch.save; .safetensors: safetensors)."""
    from pipeline.score.models import aesthetic_mlp

    torch.manual_seed(seed)
    state = aesthetic_mlp(width).state_dict()
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save(state, path)
    return path
