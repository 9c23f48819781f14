"""JPEG and WebP quality: encode time, size and fidelity of 256 px outputs, to choose
`output.jpeg_quality` / `output.webp_quality`.

The stand-in for SDEdit outputs is the built-in "rooms" domain rendered at 256 px (shaded
surfaces, texture, per-pixel noise of about 1.5 levels, as a generated photo has), as in
benchmarks/png_levels.py. Every setting encodes the same images with the pipeline's own encoder
(`pipeline.images.encode_image`), one core; the median of 3 rounds is reported. Fidelity is the
PSNR of the decoded image against the 8-bit output it was encoded from (PNG is lossless: inf).

    python benchmarks/lossy_quality.py [--n 24 --size 256]
"""

from __future__ import annotations

import argparse
import io
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.images import encode_image
from pipeline.tools.rooms import render_room

SETTINGS = [("png", None)] + [(fmt, q) for fmt in ("jpg", "webp") for q in (75, 85, 90, 95, 100)]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two uint8 images (inf when equal)."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=24)
    parser.add_argument("--size", type=int, default=256)
    args = parser.parse_args()
    images = [np.asarray(render_room(np.random.default_rng([7, i]), args.size).convert("RGB"))
              for i in range(args.n)]
    print(f"{args.n} rooms of {args.size} px, one core; PNG at level 1 (the default)")
    print("| format | quality | ms per image | KiB per image | size vs PNG | PSNR dB |")
    print("|---|---:|---:|---:|---:|---:|")
    rows = []
    for fmt, quality in SETTINGS:
        times, sizes, fidelity = [], [], []
        for round_ in range(3):
            encoded = []
            start = time.perf_counter()
            for image in images:
                encoded.append(encode_image(image, fmt, png_compress_level=1, quality=quality))
            times.append((time.perf_counter() - start) / args.n)
            sizes += [len(data) for data in encoded]
            if round_ == 0:
                fidelity = [psnr(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")), image)
                            for data, image in zip(encoded, images, strict=True)]
        rows.append((fmt, quality, 1000 * statistics.median(times),
                     statistics.mean(sizes) / 1024, statistics.mean(fidelity)))
    png_kib = rows[0][3]
    for fmt, quality, ms, kib, db in rows:
        shown = "-" if quality is None else str(quality)
        print(f"| {fmt} | {shown} | {ms:.1f} | {kib:.1f} | {kib / png_kib:.2f} | {db:.1f} |")


if __name__ == "__main__":
    main()
