"""The driver's bookkeeping, without Ray: which shard goes next, when an attempt is overdue,
what a failed attempt or a failed actor start means.

`pipeline.driver.runner` moves shards to actors and back; `Schedule` decides. Every operation costs
O(log n) or less in the number of shards, so scheduling overhead per shard does not grow with
the job (benchmarks/driver_scale.py measures it).

Deadlines (`compute.shard_timeout_s`): an attempt that has not returned within the deadline
fails (its actor is ended, which is the only way to stop a read that never returns) and is
retried like any failed attempt. The default (null) is derived from the run itself: ten times
the slowest attempt this run has committed, and never less than `TIMEOUT_FLOOR_S` (an hour),
which also holds until the first commit. A shard ten times slower than every other is stuck,
not slow; the floor leaves the first shards of a slow job (model warm-up, a cold cache) time.

Actor starts: an actor that fails while starting (its constructor raises, or its process dies
before it is ready) costs no shard an attempt; `START_FAILURES` such failures in a row (no actor
having started in between) stop the job with the last cause named.
"""

from __future__ import annotations

import collections
import heapq
import itertools
import time
from collections.abc import Callable, Sequence

__all__ = ["RETRY_BASE_DELAY", "RETRY_MAX_DELAY", "START_FAILURES", "TIMEOUT_FACTOR",
           "TIMEOUT_FLOOR_S", "Schedule", "retry_delay"]

RETRY_BASE_DELAY = 1.0
"""Seconds before the first retry of a failed shard; doubles per attempt (a storage outage
should not use up every retry at once)."""
RETRY_MAX_DELAY = 30.0
TIMEOUT_FACTOR = 10.0
"""The default deadline is this many times the slowest attempt committed in this run..."""
TIMEOUT_FLOOR_S = 3600.0
"""...and never below this (also the deadline before the run's first commit)."""
START_FAILURES = 3
"""Actor start failures in a row that stop the job."""


def retry_delay(attempt: int) -> float:
    """Seconds to wait before retrying a shard whose `attempt`-th attempt (1-based) failed."""
    return min(RETRY_MAX_DELAY, RETRY_BASE_DELAY * 2 ** max(0, attempt - 1))


class Schedule:
    """Pending shards, their attempts and retry times, the deadline, actor start failures.

    Args:
        pending: shard URLs in the order they should start.
        retries: `compute.shard_retries`: failed attempts a shard may have before it is given
            up (it gets `retries + 1` attempts in all).
        timeout_s: `compute.shard_timeout_s`, or None for the derived default.
        clock: monotonic seconds (tests pass a fake).
    """

    def __init__(self, pending: Sequence[str], retries: int, timeout_s: float | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.queue: collections.deque[str] = collections.deque(pending)
        self.retries, self.timeout_s, self.clock = retries, timeout_s, clock
        self.attempts: collections.Counter[str] = collections.Counter()
        self._later: list[tuple[float, int, str]] = []  # (not before, seq, url): a heap
        self._seq = itertools.count()
        self.slowest = 0.0
        """Seconds of the slowest committed attempt of this run."""
        self.start_failures = 0
        """Actor start failures since an actor last started."""

    def __len__(self) -> int:
        """Shards waiting to start (queued now or waiting for their retry time)."""
        return len(self.queue) + len(self._later)

    def next_shard(self) -> str | None:
        """The next shard to start (a retry once its delay has passed), or None for now."""
        now = self.clock()
        while self._later and self._later[0][0] <= now:
            self.queue.append(heapq.heappop(self._later)[2])
        return self.queue.popleft() if self.queue else None

    def deadline_s(self) -> float:
        """Seconds an attempt may run before it counts as failed (see the module docstring)."""
        if self.timeout_s is not None:
            return self.timeout_s
        return max(TIMEOUT_FLOOR_S, TIMEOUT_FACTOR * self.slowest)

    def overdue(self, started: float) -> bool:
        """Whether an attempt started at `started` (this clock) has passed the deadline."""
        return self.clock() - started > self.deadline_s()

    def committed(self, url: str, seconds: float) -> None:
        """Shard `url` committed after an attempt of `seconds`."""
        self.slowest = max(self.slowest, seconds)
        self.attempts.pop(url, None)

    def failed(self, url: str) -> float | None:
        """An attempt at `url` failed: the seconds until its retry (it is queued again), or
        None when that was its last attempt."""
        self.attempts[url] += 1
        if self.attempts[url] > self.retries:
            return None
        delay = retry_delay(self.attempts[url])
        heapq.heappush(self._later, (self.clock() + delay, next(self._seq), url))
        return delay

    def requeue(self, url: str) -> None:
        """An attempt at `url` ended through no fault of its own (its actor was ended for
        another shard): it starts again first, without using an attempt."""
        self.queue.appendleft(url)

    def actor_started(self) -> None:
        self.start_failures = 0

    def actor_start_failed(self) -> bool:
        """One more actor failed while starting; True when the job should stop."""
        self.start_failures += 1
        return self.start_failures >= START_FAILURES

    def not_started(self) -> list[str]:
        """Shards still waiting, in the order they would have started."""
        return [*self.queue, *(url for _, _, url in sorted(self._later))]
