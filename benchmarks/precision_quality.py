"""How far low-precision weights and VAE tiling move outputs, on the tests' tiny models (CPU).

Part 1: each latent family's tiny seeded pipeline (tests/support: Flux-dev, SDXL, SD3, SD 1.x)
loaded with model.weights_dtype fp32, bf16, fp16 and fp8 edits the same 4 guides (16 px, t0
0.6, 4 steps, two prompts); the largest difference of each from fp32, in levels of 255.
Part 2: the VAE's tiling (above its sample size; `sdedit.latent`): the tiny Flux VAE (sample
size 16) and SDXL's VAE architecture with random weights and a sample size of 128 decode the
same latents tiled and untiled (64 and 256 px images); largest and mean difference in levels.
Random weights: these say how much the arithmetic moves, not how a trained model looks.

    python benchmarks/precision_quality.py [--json docs/precision_quality.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sdedit import edit, load_model


def precision_part(root: Path) -> list[dict]:
    from tests.support.tiny_flow import save_flux_model, save_sd3_model
    from tests.support.tiny_latent import save_sd_model
    from tests.support.tiny_sdxl import save_sdxl_model

    models = {"flux": save_flux_model(root / "flux", dev=True),
              "sdxl": save_sdxl_model(root / "sdxl"), "sd3": save_sd3_model(root / "sd3"),
              "sd": save_sd_model(root / "sd")}
    guides = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    rows = []
    for family, directory in models.items():
        sampler = "euler" if family in ("flux", "sd3") else "ddim"
        outputs = {}
        for weights in ("fp32", "bf16", "fp16", "fp8"):
            model = load_model(directory, weights_dtype=weights)
            outputs[weights] = edit(model, guides, t0=0.6, seeds=[1, 2, 3, 4], sampler=sampler,
                                    steps=4, prompts=["red cat", "blue dog"] * 2)
            diff = (outputs[weights] - outputs["fp32"]).abs() * 127.5
            rows.append({"family": family, "weights": weights, "parts": model.precision.label(),
                         "max_levels": float(diff.max()), "mean_levels": float(diff.mean())})
            print(f"{family:5s} {weights}: max {rows[-1]['max_levels']:.2f}, mean "
                  f"{rows[-1]['mean_levels']:.3f} levels ({rows[-1]['parts']})", flush=True)
    return rows


def tiling_part() -> list[dict]:
    from diffusers import AutoencoderKL

    from tests.support.tiny_flow import tiny_flow_vae

    torch.manual_seed(0)
    sdxl = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                         down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4,
                         sample_size=128).eval()
    rows = []
    for name, vae, size in (("tiny flux VAE, tiles of 16 px", tiny_flow_vae(0, 0.1159, 0.3611),
                             64), ("SDXL VAE architecture, tiles of 128 px", sdxl, 256)):
        factor = 2 ** (len(vae.config.block_out_channels) - 1)
        z = torch.randn(1, vae.config.latent_channels, size // factor, size // factor,
                        generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            whole = vae.decode(z).sample.clamp(-1, 1)
            vae.enable_tiling()
            tiled = vae.decode(z).sample.clamp(-1, 1)
        diff = (whole - tiled).abs() * 127.5
        rows.append({"vae": name, "size": size, "max_levels": float(diff.max()),
                     "mean_levels": float(diff.mean())})
        print(f"{name} at {size} px: tiled vs whole max {rows[-1]['max_levels']:.2f}, mean "
              f"{rows[-1]['mean_levels']:.3f} levels", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        result = {"precision": precision_part(Path(tmp)), "tiling": tiling_part()}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
