"""`ShardScorer`: the score sidecar of a committed output shard, after the fact.

It reads the shard's manifest and output tar and scores the rows with the same `Scorer` a run
uses, so `sdedit-batch score` gives the run's scores. A shard with a sidecar is skipped (resume);
one without a commit marker is not scored."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.errors import ShardError
from pipeline.images import ImageError, decode_guide
from pipeline.input.reader import iter_raw
from pipeline.output.folder import OutputFolder
from pipeline.output.scores import score_row
from pipeline.score.scorer import ScoreInput, Scorer

logger = logging.getLogger(__name__)

__all__ = ["ScoreStats", "ShardScorer"]


@dataclass
class ScoreStats:
    """What scoring one shard did."""

    stem: str
    rows: int = 0
    scored: int = 0
    skipped: bool = False
    seconds: float = 0.0


class ShardScorer:
    """Scores committed shards of one output folder.

    `image_format` is the outputs' member extension (output.image_format); `after_batch` gets
    (stem, rows scored so far) after each scorer call (the test hooks')."""

    def __init__(self, folder: OutputFolder, scorer: Scorer, image_format: str,
                 batch_size: int, host_threads: int = 2,
                 after_batch: Callable[[str, int], None] | None = None) -> None:
        self.folder, self.scorer = folder, scorer
        self.image_format, self.batch_size = image_format, batch_size
        self.after_batch = after_batch
        self.pool = ThreadPoolExecutor(max(1, host_threads), thread_name_prefix="score-host")

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)

    def process(self, stem: str, progress: Callable[[int], None] | None = None) -> ScoreStats:
        """Score shard `stem` and publish its sidecar (skipped when it has one); ShardError when
        the manifest or tar cannot be read or a row's output is missing."""
        start = time.perf_counter()
        if self.folder.has_scores(stem):
            return ScoreStats(stem, skipped=True)
        manifest = self.folder.read_manifest(stem)
        if manifest is None:
            raise ShardError(f"shard {stem}: no manifest in {self.folder!r}")
        rows = manifest.to_pylist()
        wanted = {row["output_key"]: i for i, row in enumerate(rows) if row["status"] == "ok"}
        scores: list[dict[str, Any] | None] = [None] * len(rows)
        batch: list[tuple[int, Any]] = []
        for index, future in self._prepared(stem, rows, wanted):
            batch.append((index, future))
            if len(batch) == self.batch_size:
                self._score(stem, batch, scores, progress)
                batch = []
        self._score(stem, batch, scores, progress)
        missing = [rows[i]["output_key"] for i in wanted.values() if scores[i] is None]
        if missing:
            raise ShardError(f"shard {stem}: {len(missing)} ok row(s) have no output in "
                             f"{self.folder.shard_urls(stem).tar} (first: {missing[0]})")
        self.folder.write_scores(stem, [score_row(row, s) for row, s in zip(rows, scores,
                                                                            strict=True)],
                                 self.scorer.metadata())
        return ScoreStats(stem, rows=len(rows), scored=len(wanted),
                          seconds=time.perf_counter() - start)

    def _prepared(self, stem: str, rows: list[dict[str, Any]], wanted: dict[str, int]
                  ) -> Iterator[tuple[int, Any]]:
        """(manifest row index, future ScoreInput) of each ok row in tar order, submitted to the
        host pool as the caller takes them."""
        url = self.folder.shard_urls(stem).tar
        for raw in iter_raw(url, self.folder.options):
            index = wanted.get(raw.key)
            if index is None or raw.duplicate:
                continue
            yield index, self.pool.submit(self._input, raw.members, rows[index], stem)

    def _input(self, members: dict[str, bytes], row: dict[str, Any], stem: str) -> ScoreInput:
        key = row["output_key"]
        data = members.get(self.image_format)
        if data is None:
            raise ShardError(f"shard {stem}: output {key} has no .{self.image_format} member")
        try:
            output = decode_guide(data, f"{key}.{self.image_format}")
            guide_png = members.get("guide.png")
            guide = None if guide_png is None or "ssim" not in self.scorer.metrics else \
                decode_guide(guide_png, f"{key}.guide.png")
        except ImageError as exc:
            raise ShardError(f"shard {stem}: {exc}") from exc
        return self.scorer.prepare(np.ascontiguousarray(output), guide, row["prompt"])

    def _score(self, stem: str, batch: list[tuple[int, Any]],
               scores: list[dict[str, Any] | None], progress: Callable[[int], None] | None
               ) -> None:
        if not batch:
            return
        inputs = [future.result() for _, future in batch]
        for (index, _), values in zip(batch, self.scorer.score(inputs), strict=True):
            scores[index] = values
        if progress is not None:
            progress(len(batch))
        if self.after_batch is not None:
            self.after_batch(stem, sum(s is not None for s in scores))
