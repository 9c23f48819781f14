"""The concurrency of one actor: shards taking turns on the device, outputs encoded in a pool and
written in order, per-stage timings.

A host pool (compute.host_threads) decodes and encodes for both of an actor's shards while the
device computes: Pillow, zlib and torch release the GIL. See docs/performance.md, "the pipelined
actor"."""

from __future__ import annotations

import collections
import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, Future
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class DeviceTurns:
    """Shards compute in the order they arrived, so an actor holds one computing shard and,
    beside it, one that reads ahead or commits."""

    def __init__(self) -> None:
        self._queue: collections.deque[object] = collections.deque()
        self._changed = threading.Condition()

    def arrive(self, token: object) -> None:
        """Queue a shard for the device (call when it starts reading)."""
        with self._changed:
            self._queue.append(token)

    @contextlib.contextmanager
    def turn(self, token: object) -> Iterator[float]:
        """Block until `token` is the oldest shard still computing; yields the seconds waited."""
        start = time.perf_counter()
        with self._changed:
            while self._queue[0] is not token:
                self._changed.wait()
        yield time.perf_counter() - start

    def leave(self, token: object) -> None:
        """The shard has finished computing (or failed): the next shard may compute."""
        with self._changed:
            if token in self._queue:
                self._queue.remove(token)
            self._changed.notify_all()


class OrderedSink(Generic[T]):
    """Runs `encode` jobs in a pool and hands their results to `write`, in submission order.

    At most `window` jobs are pending; `submit` waits for the oldest beyond that. `write` runs in
    the submitting thread; an exception of either propagates from `submit` / `finish`."""

    def __init__(self, pool: Executor, write: Callable[[T], None], window: int) -> None:
        self.pool, self.write, self.window = pool, write, max(1, window)
        self.pending: collections.deque[Future[T]] = collections.deque()

    def submit(self, job: Callable[..., T], *args: Any) -> None:
        self.pending.append(self.pool.submit(job, *args))
        while self.pending and (self.pending[0].done() or len(self.pending) > self.window):
            self.write(self.pending.popleft().result())

    def finish(self) -> None:
        """Write every pending result, in order."""
        while self.pending:
            self.write(self.pending.popleft().result())

    def cancel(self) -> None:
        """Drop what is pending (the shard is aborted)."""
        for future in self.pending:
            future.cancel()
        self.pending.clear()


class Timings:
    """Seconds spent per stage, summed over threads (thread-safe)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = collections.defaultdict(float)
        self._lock = threading.Lock()

    def add(self, stage: str, seconds: float) -> None:
        with self._lock:
            self.seconds[stage] += seconds

    @contextlib.contextmanager
    def measure(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(stage, time.perf_counter() - start)

    def timed(self, stage: str, fn: Callable[..., T]) -> Callable[..., T]:
        """`fn`, with its run time added to `stage` (for jobs run in a pool)."""
        def run(*args: Any) -> T:
            with self.measure(stage):
                return fn(*args)
        return run


class Gauge:
    """A count of things alive (decoded images not yet written) and its high-water mark.

    A child gauge (one shard's) adds to its parent under its own lock, so the parent is always
    the sum of its open children; `close()` takes a child's value off the parent and ignores
    later adds."""

    def __init__(self, parent: Gauge | None = None) -> None:
        self.value = self.peak = 0
        self.parent = parent
        self.closed = False
        self._lock = threading.Lock()

    def add(self, n: int) -> None:
        with self._lock:
            if self.closed:
                return
            self.value += n
            self.peak = max(self.peak, self.value)
            if self.parent is not None:  # lock order: child, then parent (never the reverse)
                self.parent.add(n)

    def close(self) -> int:
        """Stop counting and take the value off the parent at once; returns that value."""
        with self._lock:
            if self.closed:
                return 0
            self.closed = True
            value, self.value = self.value, 0
            if self.parent is not None and value:
                self.parent.add(-value)
            return value
