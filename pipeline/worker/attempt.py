"""One attempt at one shard while it runs: its results, counts, timings and manifest rows.

`ShardWorker.process` makes one `Attempt` per call and every stage writes its rows through it, so
that each row is counted once."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pipeline.input.reader import Sample
from pipeline.output.writer import ShardOutput
from pipeline.stages import Gauge, OrderedSink, Timings
from pipeline.storage import absolute_url
from pipeline.worker.batching import Task
from pipeline.worker.encode import Encoded
from pipeline.worker.records import Records, ShardStats

logger = logging.getLogger(__name__)

__all__ = ["Attempt"]


@dataclass
class Attempt:
    """One attempt at one shard: its writer and records, its counts and timings, its decoded
    images alive (`gauge`), its device turn (`token`), its encode sink and the ok rows awaiting
    scores."""

    url: str
    stem: str
    writer: ShardOutput
    stats: ShardStats
    gauge: Gauge
    progress: Callable[[int], None] | None
    records: Records
    timings: Timings = field(default_factory=Timings)
    token: object = field(default_factory=object)
    sink: OrderedSink[Encoded] = field(init=False)
    scoring: list[tuple[dict[str, Any], int, Any]] = field(default_factory=list)
    """(manifest row, sample position, score input) of ok rows not yet scored."""

    def ok_row(self, item: Encoded) -> dict[str, Any]:
        """The encoded output to the tar, in processing order; returns its manifest row for the
        caller to hand to the writer (at once, or with its scores)."""
        task = item.done.task
        assert item.sample is not None
        with self.timings.measure("write"):
            self.writer.add_sample(item.sample)
        self.stats.outputs_ok += 1
        self.stats.count_notes(task.notes)
        return self.records.row(
            self.stats.input_shard, task.sample, task.index, task.settings,
            batch_size=item.done.batch_size, encoded=item,
            output_shard=absolute_url(self.writer.urls.tar))

    def error_row(self, sample: Sample, position: int, index: int, kind: str | None,
                  error: str, batch_size: int | None = None, task: Task | None = None) -> None:
        """One error row of kind `kind` for the sample at `position`, with the row's own settings
        when they were read (`task`), else the job's."""
        settings = task.settings if task is not None else self.records.job_settings()
        row = self.records.row(self.stats.input_shard, sample, index, settings,
                               batch_size=batch_size, error=error, error_kind=kind)
        self.writer.add_row(row, position)
        self.stats.count_error(row["error_kind"])
        if task is not None:
            self.stats.count_notes(task.notes)
        logger.warning("sample %s: %s", row["output_key"], error)
