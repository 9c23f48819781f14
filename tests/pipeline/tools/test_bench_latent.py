"""The prepared GPU run's latent parts, run tiny on the CPU (`benchmarks/gpu_run.py --smoke`)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from pipeline.tools.bench_latent import ssim

ROOT = Path(__file__).resolve().parents[3]


def test_the_gpu_runs_latent_parts_run_tiny_on_the_cpu(tmp_path):
    out = tmp_path / "gpu_run.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_run.py"), "--smoke",
                    "--json", str(out), "--parts", "latent_flux"],
                   check=True, capture_output=True, timeout=600)
    parts = json.loads(out.read_text())["parts"]
    for family, weights in (("latent_flux", ("bf16", "fp8")),):
        rows = parts[family]["rows"]
        assert [r["weights"] for r in rows] == list(weights), parts[family]
        assert all(r["s_per_step"] > 0 and r["edits_per_hour_t0_0.6"] > 0 and r["plan_gb"] > 0
                   for r in rows)
        assert rows[1]["network"].startswith("fp8 storage, bf16 compute")
        assert parts[family]["reference"][0]["impl"].startswith("diffusers ")


def test_ssim_is_one_for_equal_images_and_drops_with_noise():
    x = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert abs(ssim(x, x) - 1) < 1e-6
    noisy = (x + 0.5 * torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(1)))
    assert ssim(x, noisy.clamp(0, 1)) < 0.6
