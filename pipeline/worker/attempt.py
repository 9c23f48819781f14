"""`Attempt`: one attempt at one shard while it runs, the state every stage of the worker shares
(`pipeline.worker.shard` makes it; `tasks` and `scoring` take it)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pipeline.output.writer import ShardOutput
from pipeline.stages import Gauge, OrderedSink, Timings
from pipeline.worker.encode import Encoded
from pipeline.worker.records import ShardStats

__all__ = ["Attempt"]


@dataclass
class Attempt:
    """One attempt at one shard, while it runs: where its results go, what it counted, its
    timings, its decoded images alive (`gauge`), its turn at the device (`token`), the
    ordered sink of its encodes and the rows waiting for their scores (`scoring`)."""

    url: str
    stem: str
    writer: ShardOutput
    stats: ShardStats
    gauge: Gauge
    progress: Callable[[int], None] | None
    timings: Timings = field(default_factory=Timings)
    token: object = field(default_factory=object)
    sink: OrderedSink[Encoded] = field(init=False)
    scoring: list[tuple[dict[str, Any], int, Any]] = field(default_factory=list)
    """(manifest row, sample position, score input) of ok rows not yet scored."""
