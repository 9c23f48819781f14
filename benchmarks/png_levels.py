"""PNG compression level: encode time and size of 256 px outputs, to choose the default.

Outputs of SDEdit are realistic images; the stand-in here is the built-in "rooms" domain
rendered at 256 px (shaded surfaces, texture, per-pixel noise of about 1.5 levels, as a
generated photo has). Each level encodes the same images; the median of 3 rounds is reported.

    python benchmarks/png_levels.py [--n 24 --size 256]
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.tools.rooms import render_room


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=24)
    parser.add_argument("--size", type=int, default=256)
    args = parser.parse_args()
    images = [render_room(np.random.default_rng([7, i]), args.size) for i in range(args.n)]
    raw = args.size * args.size * 3
    print(f"{args.n} rooms of {args.size} px; raw RGB {raw / 1024:.0f} KiB each")
    print("| level | ms per image | KiB per image | size vs level 6 |")
    print("|---:|---:|---:|---:|")
    rows = []
    for level in range(10):
        times, sizes = [], []
        for _ in range(3):
            start = time.perf_counter()
            for image in images:
                buffer = io.BytesIO()
                image.save(buffer, format="PNG", compress_level=level)
                sizes.append(len(buffer.getvalue()))
            times.append((time.perf_counter() - start) / args.n)
        rows.append((level, 1000 * statistics.median(times), statistics.mean(sizes) / 1024))
    ref = rows[6][2]
    for level, ms, kib in rows:
        print(f"| {level} | {ms:.1f} | {kib:.0f} | {kib / ref:.2f} |")
    decode = []
    for image in images[:8]:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", compress_level=1)
        data = buffer.getvalue()
        start = time.perf_counter()
        Image.open(io.BytesIO(data)).convert("RGB").load()
        decode.append(time.perf_counter() - start)
    print(f"decode of a level-1 PNG: {1000 * statistics.median(decode):.1f} ms")


if __name__ == "__main__":
    main()
