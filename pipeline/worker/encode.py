"""What one edited output becomes: 8-bit pixels, its faithfulness and its encoded tar sample.

`encode_output` runs in the host pool; an output the chosen format cannot hold is that output's
error row, never the shard's."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pipeline.job.spec import OutputSpec
from pipeline.output.writer import output_sample
from pipeline.worker.batching import Task

__all__ = ["MAX_SIDE", "Done", "Encoded", "encode_output", "faithfulness_l2"]

MAX_SIDE = {"png": 2**31 - 1, "jpg": 65500, "webp": 16383}
"""The largest width or height each output format holds; a larger output is an "encode" row, any
other encoder failure fails the attempt."""


@dataclass
class Done:
    """One output as it leaves the device: the task, its pixels and what it cost."""

    task: Task
    edited: torch.Tensor  # float32 (3, H, W) in [-1, 1], on the CPU
    seconds: float        # device seconds per output of its batch
    batch_size: int       # samples in the network call that made it

    def pixels(self) -> np.ndarray:
        """uint8 (H, W, 3): the edited image rounded to 8 bits."""
        rgb = ((self.edited + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
        return rgb.permute(1, 2, 0).numpy()


@dataclass
class Encoded:
    """One output as it leaves the encoder: its tar sample, or why it has none."""

    done: Done
    metadata: dict[str, Any]
    sample: dict[str, Any] | None
    error: str | None = None
    size: tuple[int, int] = (0, 0)  # (H, W)
    score_input: Any = None  # its scorer inputs (`pipeline.worker.scoring`), with scoring on


def encode_output(done: Done, out: OutputSpec,
                  metadata: Callable[[Task, float], dict[str, Any]]) -> Encoded:
    """The output's metadata (`metadata(task, faithfulness_l2)`) and encoded tar sample, or why
    its size or content cannot be encoded."""
    sample = done.task.sample
    assert sample.guide is not None and sample.members is not None
    pixels = done.pixels()
    meta = metadata(done.task, faithfulness_l2(pixels, sample.guide, sample.mask))
    keep = out.include_guide
    h, w = pixels.shape[:2]
    limit = MAX_SIDE[out.image_format]
    if max(h, w) > limit:
        return Encoded(done, meta, None, f"cannot encode the output as {out.image_format}: "
                                         f"{w}x{h} is over {limit} px a side; allowed: an "
                                         "output size the format can hold")
    encoded = output_sample(
        done.task.output_key, pixels, meta,
        guide=sample.guide if keep else None,
        guide_png=sample.guide_png if keep else None,
        mask=sample.mask if keep else None,
        target=sample.members.get("target") if keep else None,
        carried=sample.carried, image_format=out.image_format,
        png_compress_level=out.png_compress_level, quality=out.quality())
    return Encoded(done, meta, encoded, size=pixels.shape[:2])


def faithfulness_l2(output: np.ndarray, guide: np.ndarray, mask: np.ndarray | None) -> float:
    """RMS difference of uint8 (H, W, 3) output and guide in 0..255 units, inside the mask (uint8
    (H, W) in {0, 1}) when it regenerates anything."""
    diff = output.astype(np.int32) - guide.astype(np.int32)
    if mask is not None and mask.any():
        diff = diff[mask.astype(bool)]
    return float(np.sqrt(np.mean(diff * diff)))
