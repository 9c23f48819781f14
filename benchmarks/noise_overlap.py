"""Would per-sample CPU noise starve a GPU? Inline draws vs `PrefetchNoise`, measured on the CPU.

The reproducibility contract draws every output's noise from its own CPU generator. Per reverse
step that is `batch` x randn(3, H, W) on the host. This script measures (1) the time of one
step's draws, and (2) a step loop where the host is busy for `--forward-ms` per step (standing
in for the GPU forward the host waits on), with draws inline (`SeedNoise`) or prefetched by
background threads (`PrefetchNoise`), checking that both deliver identical values.

    python benchmarks/noise_overlap.py [--size 256 --batch 8 --steps 40 --forward-ms 10
                                        --threads 2]

The default forward time is an H100 at 40% MFU on DDPM-256: 8 x 497 GFLOP / (0.4 x 989 TFLOP/s)
= 10 ms per batched forward.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sdedit.accel import PrefetchNoise
from sdedit.edit import SeedNoise


def busy(seconds: float) -> None:
    """Hold the host like a driver thread waiting on the device (sleep releases the GIL)."""
    time.sleep(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--forward-ms", type=float, default=10.0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    shape = (3, args.size, args.size)
    rows = list(range(args.batch))
    cpu = torch.device("cpu")

    noise = SeedNoise(rows, shape, cpu)
    draw = []
    for _ in range(15):
        start = time.perf_counter()
        noise(rows)
        draw.append(time.perf_counter() - start)
    print(f"one step's noise, {args.batch} x randn{shape}: median "
          f"{1e3 * statistics.median(draw):.2f} ms (min {1e3 * min(draw):.2f})")

    def loop(source: SeedNoise | PrefetchNoise, keep: bool) -> tuple[float, list[torch.Tensor]]:
        out = []    # kept only when checking values: holding them all slows allocation
        start = time.perf_counter()
        for _ in range(args.steps):
            busy(args.forward_ms / 1e3)
            draws = source(rows)
            if keep:
                out.append(draws)
        return (time.perf_counter() - start) / args.steps, out

    def prefetch() -> PrefetchNoise:
        return PrefetchNoise(rows, shape, cpu, threads=args.threads, depth=2)

    inline_s, _ = loop(SeedNoise(rows, shape, cpu), keep=False)
    with prefetch() as ahead:
        ahead_s, _ = loop(ahead, keep=False)
    with prefetch() as ahead:
        prefetched = loop(ahead, keep=True)[1]
    inline = loop(SeedNoise(rows, shape, cpu), keep=True)[1]
    same = all(torch.equal(a, b) for a, b in zip(inline, prefetched, strict=True))
    print(f"step loop with a {args.forward_ms:.1f} ms forward: inline {1e3 * inline_s:.2f} ms/step,"
          f" prefetched ({args.threads} threads) {1e3 * ahead_s:.2f} ms/step; identical: {same}")


if __name__ == "__main__":
    main()
