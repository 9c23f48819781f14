"""Fused or not? The UNet forward with a LoRA merged into its weights against peft's unfused
LoRA layers (and the plain UNet), side by side in one run.

The network is SDXL's UNet layout (DownBlock2D + two CrossAttn levels, transformer depths
1 / 2 / 10, text_time embedding, 2048-wide context of 77 tokens) with its widths divided by
`--width-div` (default 4: 80 / 160 / 320 channels) so that it runs on a CPU; random weights.
The LoRA has rank `--rank` on the attention projections (to_q, to_k, to_v, to_out.0), as
diffusers' SDXL LoRA training script targets, or with `--wide` also the feed-forward and
proj_in / proj_out layers (kohya's usual set). Each variant runs `--rounds` rounds of
`--reps` forwards, interleaved; the median time per forward is printed, with the ratios, the
one-time cost of fusing, and the max difference between fused and unfused outputs.

    python benchmarks/lora_fuse.py [--latent 64] [--batch 2] [--rank 16] [--wide]
        [--threads 2] [--device cpu]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sdedit.lora import _fuse  # noqa: E402


def sdxl_unet(div: int):
    """SDXL base's UNet config (stabilityai/stable-diffusion-xl-base-1.0) with widths / div."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320 // div, 640 // div, 1280 // div),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(5, 10, 20), use_linear_projection=True,
        transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048,
        addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816, norm_num_groups=32 // div,
    ).eval().requires_grad_(False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latent", type=int, default=64)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--wide", action="store_true")
    parser.add_argument("--width-div", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from peft import LoraConfig, inject_adapter_in_model

    device = torch.device(args.device)
    torch.manual_seed(0)
    base = sdxl_unet(args.width_div).to(device)
    unfused = sdxl_unet(args.width_div).to(device)
    unfused.load_state_dict(base.state_dict())
    targets = ["to_q", "to_k", "to_v", "to_out.0"]
    if args.wide:
        targets += ["ff.net.0.proj", "ff.net.2", "proj_in", "proj_out"]
    inject_adapter_in_model(LoraConfig(r=args.rank, lora_alpha=args.rank, target_modules=targets,
                                       init_lora_weights=False), unfused, adapter_name="a")
    unfused.eval().requires_grad_(False)
    fused = sdxl_unet(args.width_div).to(device)
    fused.load_state_dict(base.state_dict())
    inject_adapter_in_model(LoraConfig(r=args.rank, lora_alpha=args.rank, target_modules=targets,
                                       init_lora_weights=False), fused, adapter_name="a")
    fused.load_state_dict(unfused.state_dict())
    start = time.perf_counter()
    _fuse(fused, ["a"], [0.8])
    fuse_s = time.perf_counter() - start
    from diffusers.utils.peft_utils import set_weights_and_activate_adapters

    set_weights_and_activate_adapters(unfused, ["a"], [0.8])
    lora_params = sum(p.numel() for n, p in unfused.named_parameters() if "lora_" in n)
    print(f"UNet {sum(p.numel() for p in base.parameters()) / 1e6:.1f}M params (SDXL widths / "
          f"{args.width_div}); LoRA rank {args.rank} on {', '.join(targets)}: "
          f"{lora_params / 1e6:.2f}M params; latent {args.latent}x{args.latent}, batch "
          f"{args.batch}, {args.device}, {args.threads} threads")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, 4, args.latent, args.latent, generator=g).to(device)
    t = torch.full((args.batch,), 500.0, device=device)
    context = torch.randn(args.batch, 77, 2048, generator=g).to(device)
    added = {"text_embeds": torch.randn(args.batch, 1280, generator=g).to(device),
             "time_ids": torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024]] * args.batch,
                                      device=device)}

    def forward(net):
        return net(x, t, encoder_hidden_states=context, added_cond_kwargs=added).sample

    times: dict[str, list[float]] = {"plain UNet": [], "LoRA unfused (peft layers)": [],
                                     "LoRA fused": []}
    nets = dict(zip(times, (base, unfused, fused), strict=True))
    with torch.no_grad():
        diff = float((forward(fused) - forward(unfused)).abs().max())
        for _ in range(args.rounds):
            for name, net in nets.items():
                if device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                for _ in range(args.reps):
                    forward(net)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times[name].append((time.perf_counter() - start) / args.reps)
    plain = statistics.median(times["plain UNet"])
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:28s} {median * 1000:9.1f} ms per forward  ({median / plain:.3f} x plain)")
    ratio = statistics.median(times["LoRA unfused (peft layers)"]) / \
        statistics.median(times["LoRA fused"])
    print(f"unfused / fused: {ratio:.3f}; fusing took {fuse_s * 1000:.0f} ms once; "
          f"max |fused - unfused| output: {diff:.2e}")


if __name__ == "__main__":
    main()
