"""`sdedit-batch bench`: FLOP counts, the reference loop's math, and a CPU run end to end."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.tools import reference_loop as reference
from pipeline.tools.bench import count_flops, cpu_share, peak_tflops, random_model
from sdedit import edit


@pytest.mark.parametrize(("arch", "gflop", "params_m"), [
    ("ddpm-256", 497.03, 113.67),   # google/ddpm-ema-bedroom-256, the paper's LSUN models
    ("ddpm-32", 12.44, 35.75),      # google/ddpm-cifar10-32
])
def test_flops_per_forward_match_the_published_architectures(arch, gflop, params_m):
    model = random_model(arch, torch.device("meta"))          # no memory, no compute
    assert sum(p.numel() for p in model.net.parameters()) / 1e6 == pytest.approx(params_m,
                                                                                  abs=0.01)
    assert count_flops(model) / 1e9 == pytest.approx(gflop, abs=0.01)


def test_reference_loop_is_the_paper_loop(tiny_vp):
    """Fed the same per-sample noise, the official-style loop equals edit(sampler="ddpm")."""
    seeds = list(range(10, 10 + reference.BATCH))
    generators = [torch.Generator().manual_seed(s) for s in seeds]

    def randn_like(x: torch.Tensor) -> torch.Tensor:   # the official loop also draws at i = 0
        return torch.stack([torch.randn(x.shape[1:], generator=g) for g in generators])

    guide = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    net = reference.official_network(tiny_vp.net, torch.device("cpu"))
    ref = reference.reference_edit(net, guide, 40, randn_like=randn_like).clamp(-1, 1)
    ours = edit(tiny_vp, guide.repeat(reference.BATCH, 1, 1, 1), t0=0.04, seeds=seeds)
    assert torch.allclose(ours, ref, atol=1e-4), float((ours - ref).abs().max())
    assert not torch.allclose(ours[0], ours[1], atol=1e-3)   # per-sample noise


def test_bench_cli_runs_on_the_cpu_and_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(main, [
        "bench", "--arch", "tiny", "--t0", "0.003", "--batch-sizes", "1,2", "--dtypes", "fp32",
        "--threads", "1", "--repeats", "1", "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "reference" in result.output and "GFLOP per image-forward" in result.output
    report = json.loads(out.read_text())
    rows = report["rows"]
    assert [(r["impl"], r["batch"]) for r in rows] == [("reference", 8), ("sdedit", 1),
                                                       ("sdedit", 2)]
    assert report["gflop_per_forward"] == pytest.approx(0.58, abs=0.01)
    for row in rows:
        assert row["evals"] == 3 and row["img_forwards_per_s"] > 0 and row["mfu"] is None
        assert row["tflops"] == pytest.approx(
            row["img_forwards_per_s"] * report["gflop_per_forward"] / 1e3, rel=1e-6)
    assert rows[1]["vs_reference_forwards"] == pytest.approx(
        rows[1]["img_forwards_per_s"] / rows[0]["img_forwards_per_s"], rel=1e-6)


def test_bench_rejects_bad_settings_cleanly():
    result = CliRunner().invoke(main, ["bench", "--arch", "tiny", "--dtypes", "fp64",
                                       "--no-reference"])
    assert result.exit_code != 0 and "dtype 'fp64' is unknown" in result.output


def test_cpu_has_no_peak_and_a_cpu_share():
    assert peak_tflops(torch.device("cpu"), "bf16") is None
    assert 1 <= cpu_share() <= (torch.get_num_threads() + 64)


def test_bench_runs_the_reference_from_an_installed_package(tmp_path):
    """Only the packages are copied (no checkout around them, no benchmarks/ folder), as pip
    installs them: the reference loop still runs."""
    site = tmp_path / "site"
    for package in ("pipeline", "sdedit"):
        shutil.copytree(Path(__file__).parents[3] / package, site / package,
                        ignore=shutil.ignore_patterns("__pycache__"))
    code = ("import pipeline, sys; site = sys.argv.pop(1); "
            "assert pipeline.__file__.startswith(site), pipeline.__file__; "
            "from pipeline.cli import main; main()")
    result = subprocess.run(
        [sys.executable, "-c", code, str(site), "bench", "--arch", "tiny", "--t0", "0.002",
         "--batch-sizes", "1", "--dtypes", "fp32", "--threads", "1", "--repeats", "1"],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(site)}, capture_output=True,
        text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "reference loop" in result.stderr and "not run" not in result.stdout
    assert result.stdout.count("reference") >= 1
