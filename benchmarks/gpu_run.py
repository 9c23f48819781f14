"""One prepared GPU run: `sdedit-batch bench` against the reference loop, and the actor path.

Made for one call of under 5 minutes on a GPU machine with no network (benchmarks/gpu_run.sh
installs the carried wheels first). Whole 500-step chains are not run: each configuration is
timed over a fixed number of steps (t0 = 0.02: 20 DDPM steps) and the 500-step chain is
extrapolated from the time per step, which is the same at every step of the chain. Parts run
in order of importance and the JSON file is rewritten after each, so a run cut short keeps
what it measured; a part that does not fit the time budget is skipped and named in `skipped`.

Parts:
  1. bench, DDPM-256 random weights: the reference loop (fp32, batch 8) and `sdedit.edit` fp32
     and bf16 at batch 16 and 32 on the DDPM chain: ms per step, x reference, MFU, and the
     500-step chain extrapolated;
  2. the same with dpmpp2m, 20 evaluations (run whole);
  3. the three CUDA kernels that take the most time in a bf16 batch-32 forward (profiler);
  4. the actor path end to end at 256 px (ShardWorker, two shards at once as in an actor, no
     Ray): device-busy fraction and images/s, from two runs of different lengths against the
     edit-only time of the same work;
  5. bf16 with torch.compile + CUDA graphs, and CUDA graphs alone, at batch 16 and 32;
  latent_flux, latent_sdxl (first in order): a random-weights FLUX.1-dev-sized transformer
     (11.9 B parameters) / SDXL base's UNet with their VAEs at 1024 px through `sdedit.edit`
     (`sdedit-batch bench --family`, pipeline/tools/bench_latent.py), bf16 / fp16 and fp8,
     batch 1 and 4: s/step, fixed cost, edits/hour at t0 = 0.6, TFLOP/s and MFU, peak memory
     against the plan, weights per part, which fp8 path ran; diffusers' img2img pipeline with
     the same network side by side;
  latent_compile: Flux bf16 with regional torch.compile: compile seconds and s/step;
  fp8_quality: the same Flux edits in bf16 and fp8: SSIM of the fp8 outputs to the bf16 ones
     (random weights: a check of the fp8 path's numerics, not of image quality; LPIPS needs
     weights this machine cannot download).

    python benchmarks/gpu_run.py --json out.json [--budget 540] [--parts a,b] [--smoke]
--smoke runs every part tiny on the CPU (to check the script here, not to measure); --parts
runs only the named parts (latent_flux, latent_sdxl, latent_compile, fp8_quality, chain,
dpmpp2m_20, top_kernels, actor_path, chain_graphs, chain_compile_graphs).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.tools.bench import BenchConfig, format_table, random_model, run_bench
from pipeline.tools.bench_latent import compile_part, fp8_quality, run_latent


class Budget:
    """Seconds left of the run; parts check it before they start, and a part still running
    when the budget ends is interrupted (SIGALRM) so the call ends in time."""

    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds
        signal.signal(signal.SIGALRM, self._expired)

    def left(self) -> float:
        return self.end - time.monotonic()

    def arm(self) -> None:
        signal.alarm(max(1, int(self.left())))

    @staticmethod
    def _expired(signum: int, frame: Any) -> None:
        raise TimeoutError("the run's time budget ended during this part")


def bench_part(name: str, config: BenchConfig, result: dict[str, Any]) -> None:
    report = run_bench(config, progress=lambda m: print(f"# {name}: {m}", flush=True))
    print(format_table(report), flush=True)
    rows = report.to_dict()["rows"]
    for row in rows:
        row["chain_500_s"] = row["step_ms"] * 500 / 1000  # extrapolated 500-step edit
    result["parts"][name] = {"config": report.config, "env": report.env,
                             "gflop_per_forward": report.gflop_per_forward, "rows": rows,
                             "notes": report.notes}


def top_kernels(arch: str, device: torch.device, batch: int, result: dict[str, Any]) -> None:
    """The three kernels with the most device time in bf16 forwards (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    model = random_model(arch, device).accelerate(autocast=torch.bfloat16,
                                                  channels_last=device.type == "cuda")
    h, w = model.sample_size
    x = torch.randn(batch, 3, h, w, device=device)
    t = torch.full((batch,), 499, device=device)
    for _ in range(3):
        model.forward(x, t)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA]
                                           if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(3):
            model.forward(x, t)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key, 0), reverse=True)
    total = sum(getattr(e, key, 0) for e in events) or 1
    result["parts"]["top_kernels"] = [
        {"name": e.key, "ms_per_forward": getattr(e, key, 0) / 3 / 1000,
         "share": getattr(e, key, 0) / total} for e in events[:3]]
    print("# top kernels:", json.dumps(result["parts"]["top_kernels"], indent=1), flush=True)


def actor_part(arch: str, device: torch.device, smoke: bool, result: dict[str, Any]) -> None:
    """Busy fraction of the actor path: edit-only seconds of the work / pipeline seconds."""
    import webdataset as wds

    from pipeline.images import encode_image
    from pipeline.job.load import parse_spec
    from pipeline.worker.batching import output_seed
    from pipeline.worker.shard import SLOTS, ShardWorker
    from sdedit import edit

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from host_pipeline import painting

    model = random_model(arch, device).accelerate(
        autocast=None if smoke else torch.bfloat16, channels_last=device.type == "cuda")
    size = model.sample_size[0]
    per_shard, batch, steps = (8, 2, 2) if smoke else (64, 16, 20)
    lengths = (1, 2) if smoke else (2, 5)
    rng = np.random.default_rng(0)
    sd = {"t0": 0.5, "sampler": "dpmpp2m", "steps": steps}
    walls = []
    with tempfile.TemporaryDirectory(prefix="gpu-run-") as name:  # removed at the end
        tmp = Path(name)
        urls = []
        for s in range(lengths[1]):
            url = tmp / f"in-{s:06d}.tar"
            with wds.TarWriter(str(url)) as tar:
                for i in range(per_shard):
                    tar.write({"__key__": f"s{s}_{i:04d}",
                               "png": encode_image(painting(rng, size))})
            urls.append(str(url))
        for n in lengths:
            spec = parse_spec({"name": "gpu-run", "model": {"source": "random"},
                               "input": {"shards": urls[:n]},
                               "output": {"path": str(tmp / f"o{n}")},
                               "sdedit": {**sd, "seed": 0},
                               "compute": {"device": device.type, "batch_size": batch}})
            worker = ShardWorker(spec, model=model)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            with ThreadPoolExecutor(SLOTS) as slots:  # as the actor: two shards at once
                list(slots.map(worker.process, urls[:n]))
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            walls.append(time.perf_counter() - start)
    images = (lengths[1] - lengths[0]) * per_shard
    guides = torch.stack([torch.from_numpy(painting(rng, size)).permute(2, 0, 1)
                          for _ in range(batch)]).float() / 127.5 - 1
    seeds = [output_seed(0, f"k{i}", 0) for i in range(batch)]
    edit(model, guides, seeds=seeds, **sd)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(images // batch):
        edit(model, guides, seeds=seeds, **sd)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    device_s = time.perf_counter() - start
    pipeline_s = walls[1] - walls[0]
    result["parts"]["actor_path"] = {
        "images": images, "batch": batch, "sampler": "dpmpp2m", "steps": steps,
        "walls": walls, "pipeline_s": pipeline_s, "edit_only_s": device_s,
        "busy": device_s / pipeline_s, "images_per_s": images / pipeline_s,
        "edit_only_images_per_s": images / device_s}
    print("# actor path:", json.dumps(result["parts"]["actor_path"]), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", required=True)
    parser.add_argument("--budget", type=float, default=540.0, help="seconds for all parts")
    parser.add_argument("--parts", default=None, help="comma-separated part names (default all)")
    parser.add_argument("--smoke", action="store_true", help="tiny, on the CPU (a check)")
    args = parser.parse_args()
    budget = Budget(args.budget)
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    arch = "tiny" if args.smoke else "ddpm-256"
    batches = (1, 2) if args.smoke else (16, 32)
    result: dict[str, Any] = {"device": str(device), "torch": torch.__version__,
                              "name": torch.cuda.get_device_name(device)
                              if device.type == "cuda" else "cpu", "parts": {},
                              "skipped": []}
    common = dict(arch=arch, batch_sizes=batches, dtypes=("fp32", "bf16"), repeats=3,
                  device=device.type, threads=(1,) if args.smoke else ())
    latent = (1,) if args.smoke else (1, 4)

    def keep(name: str, value: Any) -> None:
        result["parts"][name] = value
        print(f"# {name}:", json.dumps(value), flush=True)

    parts: list[tuple[str, float, Any]] = [
        ("latent_flux", 150, lambda: keep("latent_flux", run_latent(
            "flux", device, args.smoke, ("bf16", "fp8"), latent))),
        ("latent_sdxl", 90, lambda: keep("latent_sdxl", run_latent(
            "sdxl", device, args.smoke, ("fp16", "fp8"), latent))),
        ("latent_compile", 120, lambda: keep("latent_compile", compile_part(
            device, args.smoke))),
        ("fp8_quality", 40, lambda: keep("fp8_quality", fp8_quality(device, args.smoke))),
        ("chain", 60, lambda: bench_part("chain", BenchConfig(
            **common, sampler="ddpm", t0=0.02 if not args.smoke else 0.003), result)),
        ("dpmpp2m_20", 40, lambda: bench_part("dpmpp2m_20", BenchConfig(
            **common, sampler="dpmpp2m", steps=20 if not args.smoke else 2, t0=0.5,
            reference=False), result)),
        ("top_kernels", 10, lambda: top_kernels(arch, device, batches[-1], result)),
        ("actor_path", 60, lambda: actor_part(arch, device, args.smoke, result)),
        ("chain_graphs", 40, lambda: bench_part("chain_graphs", BenchConfig(
            **{**common, "dtypes": ("bf16",)}, sampler="ddpm", cuda_graphs=True,
            t0=0.02 if not args.smoke else 0.003, reference=False), result)),
        ("chain_compile_graphs", 120, lambda: bench_part("chain_compile_graphs", BenchConfig(
            **{**common, "dtypes": ("bf16",)}, sampler="ddpm", compile=True, cuda_graphs=True,
            t0=0.02 if not args.smoke else 0.003, reference=False), result)),
    ]
    if args.parts:
        wanted = set(args.parts.split(","))
        unknown = wanted - {name for name, _, _ in parts}
        if unknown:
            parser.error(f"--parts: unknown {sorted(unknown)}; allowed: "
                         f"{', '.join(name for name, _, _ in parts)}")
        parts = [part for part in parts if part[0] in wanted]
    for name, needs, run in parts:
        if budget.left() < (1 if args.smoke else needs):
            result["skipped"].append(f"{name}: {budget.left():.0f} s left, needs ~{needs} s")
            continue
        started = time.monotonic()
        budget.arm()
        try:
            run()
        except Exception as exc:  # keep the other parts' figures (a timeout included)
            result["parts"][name] = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
            print(f"# {name} failed: {exc}", flush=True)
        finally:
            signal.alarm(0)
        result.setdefault("seconds", {})[name] = time.monotonic() - started
        Path(args.json).write_text(json.dumps(result, indent=1))
    Path(args.json).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.json}; skipped: {result['skipped']}")


if __name__ == "__main__":
    main()
