"""Reproducibility across batch sizes and torch thread counts (issue 11, item 7).

Runs the same shards through `ShardWorker` (no Ray) once per (batch size, threads) setting and
compares every decoded output with the one of a reference setting (the first of each list):
how many outputs differ, in how many pixel values, and by how many levels at most.

Two jobs: "tiny" (the tests' tiny 16 px DDPM, 3 shards x 8 random guides, ddpm at t0 0.04)
and "quickstart" (the bundled models/rooms-64 on jobs/data/quickstart, as jobs/quickstart.yaml:
32 guides, ddpm respaced to 100 steps at t0 0.5).

    python benchmarks/repro_batch_threads.py --job tiny --batch 1 3 8 --threads 1 2 \
        [--json docs/repro_tiny.json]
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tarfile
import tempfile
import time
from itertools import product
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.job.load import load_spec, parse_spec  # noqa: E402
from pipeline.worker.shard import ShardWorker  # noqa: E402
from sdedit import load_model  # noqa: E402
from tests.support.shards import job_data, write_shards  # noqa: E402
from tests.support.tiny_models import save_vp_model  # noqa: E402


def outputs(out: Path) -> dict[str, np.ndarray]:
    """output key -> decoded uint8 output pixels, over every output tar of a job folder."""
    found = {}
    for tar_path in sorted((out / "shards").glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".png") and member.name.count(".") == 1:
                    data = tar.extractfile(member).read()  # type: ignore[union-attr]
                    found[member.name[:-4]] = np.asarray(Image.open(io.BytesIO(data)))
    return found


def compare(ref: dict[str, np.ndarray], other: dict[str, np.ndarray]) -> dict[str, float]:
    """Outputs that differ, pixel values that differ and the largest difference in levels."""
    assert ref.keys() == other.keys()
    changed = values = 0
    worst = 0
    for key, a in ref.items():
        diff = np.abs(a.astype(np.int16) - other[key].astype(np.int16))
        if diff.any():
            changed += 1
            values += int((diff > 0).sum())
            worst = max(worst, int(diff.max()))
    return {"outputs": len(ref), "outputs_changed": changed, "values_changed": values,
            "values_total": int(sum(a.size for a in ref.values())), "max_levels": worst}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--job", choices=("tiny", "quickstart"), default="tiny")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 3, 8])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="repro-") as work:  # removed at the end
        compare_settings(args, Path(work))


def compare_settings(args: argparse.Namespace, work: Path) -> None:
    """Run the job once per batch size x thread count under `work`; print and save the
    pair-wise comparison of their outputs."""
    if args.job == "tiny":
        model_dir = save_vp_model(work / "tiny-vp")
        shards = write_shards(work / "in", n_shards=3, per_shard=8, bad=False, seed=5)
        base = job_data(model_dir, shards, work / "out")
    else:
        spec = load_spec(str(ROOT / "jobs" / "quickstart.yaml"))
        base = spec.to_dict()
        base["model"]["source"] = str(ROOT / "models" / "rooms-64")
        base["input"]["shards"] = [str(ROOT / "jobs" / "data" / "quickstart" /
                                       f"rooms-{i:06d}.tar") for i in range(4)]
    model = load_model(base["model"]["source"])
    results: dict[str, dict[str, np.ndarray]] = {}
    seconds: dict[str, float] = {}
    for batch, threads in product(args.batch, args.threads):
        torch.set_num_threads(threads)
        name = f"batch {batch}, threads {threads}"
        data = json.loads(json.dumps(base))
        data["output"]["path"] = str(work / f"out-b{batch}-t{threads}")
        data["compute"]["batch_size"] = batch
        spec = parse_spec(data, source=args.job)
        worker = ShardWorker(spec, model=model)
        started = time.perf_counter()
        for url in spec.input.shards:
            worker.process(url)
        seconds[name] = round(time.perf_counter() - started, 1)
        results[name] = outputs(Path(data["output"]["path"]))
        print(f"{args.job}: {name}: {len(results[name])} outputs in {seconds[name]} s",
              flush=True)
    names = list(results)
    report = {"job": args.job, "torch": torch.__version__, "seconds": seconds,
              "pairs": {f"{a} vs {b}": compare(results[a], results[b])
                        for i, a in enumerate(names) for b in names[i + 1:]}}
    for pair, figures in report["pairs"].items():
        print(f"{pair}: {figures['outputs_changed']}/{figures['outputs']} outputs changed, "
              f"{figures['values_changed']}/{figures['values_total']} values, "
              f"max {figures['max_levels']} levels")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
