"""Pipeline overhead: `sdedit-batch run` (one Ray actor) vs a bare loop over `sdedit.edit`.

Both edit the same samples with the same model, sampler, seeds and batch size:
  (a) the pipeline: run_job on WebDataset shards (stream tar, decode in a background thread,
      batch, edit, encode PNG, write tar + Parquet manifest + marker), one actor, local Ray;
  (b) a bare loop: `sdedit.edit` on pre-decoded tensors, nothing else.
Figures: images/s of each and their ratio, (1) steady state: the images of every shard but the
first committed, over the time from the first commit to the last (commit times from the
markers; excludes Ray start, model load and the first shard's pipeline fill; valid whether an
actor processes shards one at a time or overlaps them) and (2) end to end: wall time of
run_job including Ray start and model load.

    python benchmarks/pipeline_vs_loop.py [--shards 4 --per-shard 16 --size 32 --steps 20]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import DDPMScheduler, UNet2DModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.driver.runner import run_job
from pipeline.worker.batching import output_seed
from sdedit import edit, load_model
from tests.support.shards import make_spec, write_shards


def make_model(path: Path, size: int, channels: tuple[int, ...]) -> int:
    """A randomly initialised UNet2DModel of the given width; returns its parameter count."""
    torch.manual_seed(0)
    net = UNet2DModel(sample_size=size, in_channels=3, out_channels=3, layers_per_block=2,
                      block_out_channels=channels, norm_num_groups=16,
                      down_block_types=("DownBlock2D",) * len(channels),
                      up_block_types=("UpBlock2D",) * len(channels))
    net.save_pretrained(path)
    DDPMScheduler(beta_start=1e-4, beta_end=0.02).save_config(path)
    return sum(p.numel() for p in net.parameters())


def bare_loop(model_dir: Path, shards: list[str], seed: int, t0: float, steps: int,
              batch: int, threads: int) -> tuple[float, int]:
    """Seconds and images of sdedit.edit over pre-decoded guides, batch by batch."""
    import webdataset as wds

    torch.set_num_threads(threads)
    model = load_model(model_dir)
    samples = [(s["__key__"], s["png"]) for s in
               wds.WebDataset(shards, shardshuffle=False).decode("rgb8")]
    tensors = torch.from_numpy(np.stack([img for _, img in samples])).permute(0, 3, 1, 2)
    guides = tensors.float() / 127.5 - 1.0
    seeds = [output_seed(seed, key, 0) for key, _ in samples]
    edit(model, guides[:batch], t0=t0, seeds=seeds[:batch], sampler="ddim", steps=steps)
    start = time.perf_counter()
    for i in range(0, len(samples), batch):
        edit(model, guides[i:i + batch], t0=t0, seeds=seeds[i:i + batch], sampler="ddim",
             steps=steps)
    return time.perf_counter() - start, len(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--per-shard", type=int, default=16)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--channels", default="64,128,128")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--t0", type=float, default=0.5)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    channels = tuple(int(c) for c in args.channels.split(","))
    root = Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    try:
        params = make_model(root / "model", args.size, channels)
        shards = write_shards(root / "in", n_shards=args.shards, per_shard=args.per_shard,
                              size=args.size, bad=False)
        spec = make_spec(root / "model", shards, root / "out",
                         sdedit={"t0": args.t0, "sampler": "ddim", "steps": args.steps},
                         compute={"batch_size": args.batch, "cpus_per_actor": args.threads})
        start = time.perf_counter()
        summary = run_job(spec, progress=False)
        wall = time.perf_counter() - start
        markers = sorted((json.loads(p.read_text()) for p in (root / "out" / "done").iterdir()),
                         key=lambda m: m["created_at"])
        commits = [dt.datetime.fromisoformat(m["created_at"]) for m in markers]
        steady_images = sum(m["outputs_ok"] for m in markers[1:])
        steady = (commits[-1] - commits[0]).total_seconds()
        loop_s, images = bare_loop(root / "model", shards, 7, args.t0, args.steps, args.batch,
                                   args.threads)
        assert summary.outputs_ok == images
        loop_rate, pipe_rate, e2e_rate = images / loop_s, steady_images / steady, images / wall
        print(f"model: UNet2DModel {channels} at {args.size}px, {params / 1e6:.2f}M params; "
              f"ddim {args.steps} steps at t0={args.t0}; batch {args.batch}; "
              f"{args.threads} threads; {images} images in {args.shards} shards")
        print(f"{'':28s}{'images/s':>10s}{'ratio':>8s}")
        print(f"{'bare loop (sdedit.edit)':28s}{loop_rate:10.2f}{1.0:8.3f}")
        print(f"{'pipeline, steady state':28s}{pipe_rate:10.2f}{pipe_rate / loop_rate:8.3f}")
        print(f"{'pipeline, end to end':28s}{e2e_rate:10.2f}{e2e_rate / loop_rate:8.3f}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
