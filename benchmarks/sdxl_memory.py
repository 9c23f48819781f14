"""An estimate of the GPU memory one SDXL actor needs (jobs/sketch2image-sdxl.yaml), without a GPU.

Weights: SDXL base 1.0's UNet, CLIP-L, CLIP-G (OpenCLIP bigG text tower with projection) and VAE
built from their configs on the meta device (no download, no memory): exact parameter counts,
held in fp32 (this tool keeps fp32 weights; bf16 is autocast). Activations: the peak resident
memory a forward adds on the CPU, measured in a fresh process per case, at two small sizes, then
extrapolated linearly in pixels (and, for the UNet, run at a quarter of SDXL's widths, in width)
to 1024 px and the job's batch: the VAE decode of `--batch` images in fp32, and the UNet on
2 x `--batch` rows (guidance) in fp32 (autocast's bf16 activations would need about half). The
two measured sizes show whether the growth is linear. An estimate, not a GPU measurement.

    python benchmarks/sdxl_memory.py [--batch 4] [--pixels 1024]
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lora_fuse import sdxl_unet  # noqa: E402  (this folder: the same SDXL UNet config)

GB = 1e9


def unet(div: int = 1):
    """SDXL base 1.0's UNet config (widths / div): the one `lora_fuse.py` benchmarks."""
    return sdxl_unet(div)


def vae():
    """SDXL's AutoencoderKL config."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
        block_out_channels=(128, 256, 512, 512), norm_num_groups=32, sample_size=1024,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        scaling_factor=0.13025)


def text_encoders():
    """CLIP-L (CLIPTextModel) and CLIP-G (CLIPTextModelWithProjection) of SDXL base 1.0."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    large = CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                           num_attention_heads=12, projection_dim=768, hidden_act="quick_gelu")
    big = CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                         num_attention_heads=20, projection_dim=1280, hidden_act="gelu")
    return CLIPTextModel(large), CLIPTextModelWithProjection(big)


def _peak_kb() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _measure(case: str, size: int, batch: int, queue) -> None:
    """Peak RSS added by one forward (bytes), in this fresh process."""
    torch.set_num_threads(2)
    torch.manual_seed(0)
    with torch.no_grad():
        if case == "vae":
            net = vae().eval()
            z = torch.randn(batch, 4, size, size)
            net.decode(torch.randn(1, 4, 8, 8))            # allocator warm-up
            before = _peak_kb()
            net.decode(z)
        else:
            net = unet(4).eval()
            x = torch.randn(batch, 4, size, size)
            ctx = torch.randn(batch, 77, 2048)
            added = {"text_embeds": torch.randn(batch, 1280),
                     "time_ids": torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024]] * batch)}
            net(x[:1, :, :8, :8], torch.tensor([500.0]), encoder_hidden_states=ctx[:1],
                added_cond_kwargs={k: v[:1] for k, v in added.items()})
            before = _peak_kb()
            net(x, torch.full((batch,), 500.0), encoder_hidden_states=ctx,
                added_cond_kwargs=added)
    queue.put((_peak_kb() - before) * 1024)


def measure(case: str, size: int, batch: int) -> float:
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_measure, args=(case, size, batch, queue))
    process.start()
    value = queue.get()
    process.join()
    return float(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--pixels", type=int, default=1024)
    args = parser.parse_args()
    with torch.device("meta"):
        parts = {"unet": unet(), "vae": vae()}
        parts["text_encoder"], parts["text_encoder_2"] = text_encoders()
    counts = {name: sum(p.numel() for p in m.parameters()) for name, m in parts.items()}
    total = sum(counts.values())
    for name, count in counts.items():
        print(f"{name:15s} {count / 1e9:6.3f} G params  {count * 4 / GB:6.2f} GB fp32")
    print(f"{'weights':15s} {total / 1e9:6.3f} G params  {total * 4 / GB:6.2f} GB fp32")
    latent = args.pixels // 8
    vae_points = [(s, measure("vae", s, 1)) for s in (32, 64)]
    unet_points = [(s, measure("unet", s, 2)) for s in (32, 64)]
    for name, points, rows in (("VAE decode", vae_points, args.batch),
                               ("UNet (widths / 4)", unet_points, 2)):
        (s0, m0), (s1, m1) = points
        print(f"{name}: peak added {m0 / 1e6:.0f} MB at latent {s0}, {m1 / 1e6:.0f} MB at "
              f"{s1} ({m1 / max(m0, 1):.2f}x for 4x the cells), {rows} row(s)")
    s1, m1 = vae_points[1]
    vae_act = m1 * (latent / s1) ** 2 * args.batch
    s1, m1 = unet_points[1]
    unet_act = m1 / 2 * 4 * (latent / s1) ** 2 * 2 * args.batch
    print(f"extrapolated to {args.pixels} px, batch {args.batch}: VAE decode {vae_act / GB:.1f} "
          f"GB (fp32), UNet on {2 * args.batch} rows {unet_act / GB:.1f} GB (fp32 activations; "
          f"about half under bf16 autocast)")
    peak = total * 4 + max(vae_act, unet_act)
    print(f"estimate per actor: weights {total * 4 / GB:.1f} GB + the larger of the two "
          f"{max(vae_act, unet_act) / GB:.1f} GB = {peak / GB:.1f} GB (+ allocator slack)")


if __name__ == "__main__":
    main()
