"""The memory plan's activation figures against peaks measured on the CPU at small sizes.

`sdedit.memplan` traces a network's activation peak with fake tensors (no memory). Here the
same modules (random weights, reduced widths where the real ones would not fit a CPU) run for
real on the CPU, each case in a fresh process with glibc's mmap threshold at 64 KiB (so freed
tensors leave the resident set at once), and the peak resident memory a forward adds
(VmHWM after, reset through /proc/self/clear_refs, minus VmRSS before) is compared with the
traced peak of the same module, input and dtype. Cases: a Flux-architecture transformer (4 + 4
blocks at a quarter of its width: 768 wide, 6 heads of 128), SDXL's UNet at a quarter of its
widths, the SDXL / Flux VAE decoder and encoder (full size), at two sizes each, fp32 and bf16.

    python benchmarks/memory_plan.py [--json docs/memory_plan.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FLUX_SMALL = {"_class_name": "FluxTransformer2DModel", "attention_head_dim": 128,
              "guidance_embeds": True, "in_channels": 64, "joint_attention_dim": 1024,
              "num_attention_heads": 6, "num_layers": 4, "num_single_layers": 4, "patch_size": 1,
              "pooled_projection_dim": 768}
VAE = {"_class_name": "AutoencoderKL", "block_out_channels": [128, 256, 512, 512],
       "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
       "in_channels": 3, "out_channels": 3, "latent_channels": 16, "layers_per_block": 2,
       "norm_num_groups": 32, "sample_size": 1024}
CASES = [(part, size, dtype) for part, sizes in (("flux", (256, 512)), ("unet", (256, 512)),
                                                 ("decode", (256, 512)), ("encode", (256, 512)))
         for size in sizes for dtype in ("fp32", "bf16")]


def _unet_config() -> dict[str, Any]:
    """SDXL base 1.0's UNet at a quarter of its widths (heads of 16, text width 512)."""
    from pipeline.tools.bench_latent import CONFIGS

    return {**CONFIGS["sdxl"]["unet"], "block_out_channels": [80, 160, 320],
            "cross_attention_dim": 512, "norm_num_groups": 16}


def _case(part: str, size: int, dtype: torch.dtype) -> tuple[dict[str, Any], Any]:
    """(config, run(module) -> output) of one case, tensors on the default device."""
    from sdedit.conditioning import Conditioning
    from sdedit.families.flux import flux_call, image_ids
    from sdedit.families.sdxl import sdxl_call

    z = size // 8
    if part == "flux":
        cond = Conditioning({"encoder_hidden_states": torch.zeros(1, 512, 1024),
                             "pooled_projections": torch.zeros(1, 768),
                             "guidance": torch.zeros(1)},
                            {"txt_ids": torch.zeros(512, 3), "img_ids": image_ids(z, z)})
        x, t = torch.zeros(1, 16, z, z), torch.zeros(1)
        return FLUX_SMALL, lambda m: flux_call(m, x.to(dtype), t, cond.to(dtype)).float()
    if part == "unet":
        config = _unet_config()
        cond = Conditioning({"encoder_hidden_states": torch.zeros(2, 77, 512),
                             "text_embeds": torch.zeros(2, 1280),
                             "time_ids": torch.zeros(2, 6)})
        x, t = torch.zeros(2, 4, z, z), torch.zeros(2)
        return config, lambda m: sdxl_call(m, x.to(dtype), t, cond.to(dtype)).float()
    if part == "decode":
        latents = torch.zeros(1, 16, z, z)
        return VAE, lambda m: m.decode(latents.to(dtype)).sample.float()
    images = torch.zeros(1, 3, size, size)
    return VAE, lambda m: m.encode(images.to(dtype)).latent_dist.mean.float()


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def measure(part: str, size: int, dtype_name: str) -> int:
    """Peak resident bytes one forward adds, on the CPU, in this (fresh) process."""
    from sdedit.memplan import _build

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    torch.set_num_threads(1)
    config, run = _case(part, size, dtype)
    module = _build(config, dtype)
    with torch.no_grad():
        _, warm = _case(part, 64, dtype)
        warm(module)
        before = _status("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")   # VmHWM := VmRSS
        out = run(module)
        peak = _status("VmHWM")
    del out
    return peak - before


def planned(part: str, size: int, dtype_name: str) -> int:
    """The traced activation peak of the same case (fake tensors)."""
    from sdedit.memplan import _build, _fake, trace_peak

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    with _fake():
        config, run = _case(part, size, dtype)
        module = _build(config, dtype)
        return trace_peak(lambda: run(module), [*module.parameters(), *module.buffers()])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=None)
    parser.add_argument("--one", nargs=3, metavar=("PART", "SIZE", "DTYPE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(measure(args.one[0], int(args.one[1]), args.one[2]))
        return
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    rows = []
    for part, size, dtype in CASES:
        out = subprocess.run([sys.executable, __file__, "--one", part, str(size), dtype],
                             env=env, capture_output=True, text=True, check=True)
        real = int(out.stdout.strip().splitlines()[-1])
        plan = planned(part, size, dtype)
        rows.append({"part": part, "size": size, "dtype": dtype, "measured_mb": real / 2**20,
                     "planned_mb": plan / 2**20, "plan_error": plan / real - 1})
        print(f"{part:6s} {size:4d} px {dtype}: measured {real / 2**20:8.1f} MiB, planned "
              f"{plan / 2**20:8.1f} MiB, plan {100 * (plan / real - 1):+.0f}%", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
