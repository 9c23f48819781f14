"""Arithmetic, not a measurement: the FLOPs of one CLIP image forward from its config, and what
they cost per image at a stated device throughput.

The vision tower of openai/clip-vit-large-patch14 (its config.json: hidden 1024, 24 layers,
MLP 4096, 16 heads, 224 px, patch 14, projection 768) is built on the meta device (no weights)
to check the parameter count; FLOPs are counted per layer as 2 x multiply-adds: Q, K, V and out
projections 4 N d^2, MLP 2 N d m, attention N^2 d twice; plus the patch embedding and the
projection. The text tower runs once per distinct prompt (cached), not per image.

    python benchmarks/clip_flops.py [--tflops 67,495,989]
"""

from __future__ import annotations

import argparse

import torch
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

VIT_L14 = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
           "num_attention_heads": 16, "image_size": 224, "patch_size": 14,
           "projection_dim": 768}


def image_flops(config: CLIPVisionConfig) -> tuple[float, int]:
    """(FLOPs of one image forward, tokens)."""
    d, m, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    patches = (config.image_size // config.patch_size) ** 2
    n = patches + 1  # the class token
    per_layer = 4 * n * d * d + 2 * n * d * m + 2 * n * n * d
    embed = patches * 3 * config.patch_size ** 2 * d
    return 2.0 * (layers * per_layer + embed + d * config.projection_dim), n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tflops", default="67,495,989",
                        help="device throughputs (TFLOP/s) to state the cost at; H100 SXM "
                             "peaks: 67 fp32, 495 tf32, 989 bf16 (dense)")
    args = parser.parse_args()
    config = CLIPVisionConfig(**VIT_L14)
    with torch.device("meta"):
        params = sum(p.numel() for p in CLIPVisionModelWithProjection(config).parameters())
    flops, tokens = image_flops(config)
    print(f"CLIP ViT-L/14 image tower: {params / 1e6:.0f}M parameters, {tokens} tokens, "
          f"{flops / 1e9:.0f} GFLOPs per image (arithmetic)")
    for tflops in (float(x) for x in args.tflops.split(",")):
        print(f"  at {tflops:g} TFLOP/s: {flops / tflops / 1e9:.2f} ms per image "
              f"(at 50% of it: {2 * flops / tflops / 1e9:.2f} ms)")


if __name__ == "__main__":
    main()
