"""What runs inside the Ray actors, as plain classes that `pipeline.driver.pool` wraps with
`ray.remote`: `ShardActor` (`run`), `ScoreActor` (`score`), and the image counters of the
progress bar."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from typing import Any

import torch

from pipeline.input.shards import shard_stem
from pipeline.job.spec import JobSpec
from pipeline.output.folder import OutputFolder
from pipeline.redaction import SecretFilter
from pipeline.score.scorer import Scorer
from pipeline.score.shard import ShardScorer
from pipeline.worker.hooks import NO_HOOKS, Hooks
from pipeline.worker.shard import ShardWorker
from sdedit import resolve_device

__all__ = ["Batched", "Counter", "ScoreActor", "ShardActor"]


class Counter:
    """Images finished so far per shard, as the actors write them; a failed attempt's count is
    dropped (its images are made again)."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.sum = 0

    def add(self, shard: str, n: int) -> None:
        self.counts[shard] = self.counts.get(shard, 0) + n
        self.sum += n

    def drop(self, shard: str) -> None:
        self.sum -= self.counts.pop(shard, 0)

    def done(self, shard: str) -> None:
        """The shard committed: its count stays in the sum, its entry goes."""
        self.counts.pop(shard, None)

    def total(self) -> int:
        return self.sum


class _WorkerActor:
    """What both actors share: logs with secrets redacted, one worker made at start, a start
    error kept and raised by `ready` and `process`, per-image counts sent to the counter."""

    def __init__(self, make: Callable[[], Any], counter: Any) -> None:
        logging.basicConfig(level=logging.INFO)
        for handler in logging.getLogger().handlers:
            handler.addFilter(SecretFilter())
        self.counter = counter
        self.start_error: Exception | None = None
        self.worker: Any = None
        try:
            self.worker = make()
        except Exception as exc:
            self.start_error = exc

    def ready(self) -> bool:
        """Returns once the worker has started; raises why it could not."""
        if self.start_error is not None:
            raise self.start_error
        return True

    def _counted(self, url: str, work: Callable[[Batched], Any]) -> dict[str, Any]:
        self.ready()
        report = Batched(lambda n: self.counter.add.remote(url, n))
        stats = work(report)
        report.flush()
        return dataclasses.asdict(stats)

    def close(self) -> bool:
        """End the worker's threads (the driver then ends the actor)."""
        if self.worker is not None:
            self.worker.close()
        return True


class ShardActor(_WorkerActor):
    """One ShardWorker in a Ray actor: loads the model once, then processes whole shards.

    A worker that cannot start keeps its error and raises it from `ready` and `process`, so the
    driver sees the cause: a model that cannot load or run the job stops the job at once, any
    other cause counts as a failed actor start."""

    def __init__(self, spec: JobSpec, threads: int, counter: Any,
                 hooks: Hooks = NO_HOOKS) -> None:
        super().__init__(lambda: ShardWorker(spec, threads=threads, hooks=hooks), counter)

    def process(self, url: str) -> dict[str, Any]:
        """Process one shard (two may run at once: the actor's two slots)."""
        return self._counted(url, lambda report: self.worker.process(url, progress=report))


class ScoreActor(_WorkerActor):
    """One `ShardScorer` in a Ray actor: loads the scorer models once, then scores committed
    shards by their output tar URL; a start error is raised by `ready`, as in `ShardActor`."""

    def __init__(self, spec: JobSpec, threads: int, counter: Any,
                 hooks: Hooks = NO_HOOKS) -> None:
        def make() -> ShardScorer:
            torch.set_num_threads(max(1, threads))
            hooks.starting()
            fake_gpu = hooks.fake_gpu and spec.compute.device == "cuda"
            device = resolve_device("cpu" if fake_gpu else spec.compute.device)
            return ShardScorer(
                OutputFolder.of(spec), Scorer(spec.score, device), spec.output.image_format,
                spec.score.batch_size or spec.compute.batch_size,
                spec.compute.host_threads or max(2, threads), after_batch=hooks.after_batch)

        super().__init__(make, counter)

    def process(self, url: str) -> dict[str, Any]:
        """Score the committed shard whose output tar is at `url`."""
        return self._counted(
            url, lambda report: self.worker.process(shard_stem(url), progress=report))

class Batched:
    """Image counts sent to the counter at most every 0.5 s, not one remote call per image."""

    def __init__(self, send: Any) -> None:
        self.send, self.count, self.last = send, 0, time.monotonic()

    def __call__(self, n: int) -> None:
        self.count += n
        if time.monotonic() - self.last > 0.5:
            self.flush()

    def flush(self) -> None:
        if self.count:
            self.send(self.count)
        self.count, self.last = 0, time.monotonic()
