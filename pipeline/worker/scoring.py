"""The worker's score stage: each ok output's scores, right after its edit, on the same device.

The scorers' host inputs are made in the host pool beside the encode; the device scores rows in
batches as they are written, and the last partial batch before the commit, so a committed shard
has every row's scores."""

from __future__ import annotations

from typing import Any

import torch

from pipeline.images import decode_guide
from pipeline.job.spec import JobSpec
from pipeline.score.scorer import ScoreInput, Scorer
from pipeline.worker.attempt import Attempt
from pipeline.worker.encode import Encoded

__all__ = ["ScoreStage"]


class ScoreStage:
    """The scorers of `spec.score` on `device`, in batches of `score.batch_size` (default
    `compute.batch_size`); `scorer` is loaded here unless given (tests)."""

    def __init__(self, spec: JobSpec, device: torch.device, scorer: Scorer | None = None) -> None:
        self.scorer = scorer or Scorer(spec.score, device)
        self.batch = spec.score.batch_size or spec.compute.batch_size
        self.image_format = spec.output.image_format
        self.metadata: dict[str, Any] = self.scorer.metadata()

    def prepare(self, encoded: Encoded) -> ScoreInput:
        """The output's scorer inputs from its pixels as written (host pool)."""
        done = encoded.done
        assert encoded.sample is not None and done.task.sample.guide is not None
        if self.image_format == "png":
            pixels = done.pixels()
        else:
            pixels = decode_guide(encoded.sample[self.image_format],
                                  f"{done.task.output_key}.{self.image_format}")
        return self.scorer.prepare(pixels, done.task.sample.guide, done.task.settings.prompt)

    def add(self, a: Attempt, row: dict[str, Any], position: int, item: ScoreInput) -> None:
        """An ok row and its inputs; a full batch is scored at once (device thread)."""
        a.scoring.append((row, position, item))
        if len(a.scoring) >= self.batch:
            self.flush(a)

    def flush(self, a: Attempt) -> None:
        """Score the rows waiting and hand them to the shard's writer with their scores."""
        if not a.scoring:
            return
        waiting, a.scoring = a.scoring, []
        with a.timings.measure("score"):
            scores = self.scorer.score([item for _, _, item in waiting])
        for (row, position, _), values in zip(waiting, scores, strict=True):
            a.writer.add_row(row, position, values)
