"""The driver's bookkeeping, without Ray: which shard goes next, when an attempt is overdue, what
a failed attempt or actor start means.

Operations are O(log n) or less, so scheduling per shard does not grow with the job. An attempt
many times slower than the slowest committed one is stuck, not slow, and fails; a floor gives a
slow job's first shards time. See docs/cluster.md."""

from __future__ import annotations

import collections
import heapq
import itertools
import time
from collections.abc import Callable, Sequence

__all__ = ["RETRY_BASE_DELAY", "RETRY_MAX_DELAY", "START_FAILURES", "TIMEOUT_FACTOR",
           "TIMEOUT_FLOOR_S", "Schedule", "retry_delay"]

RETRY_BASE_DELAY = 1.0
"""Seconds before the first retry of a failed shard; doubles per attempt, so a storage outage
does not use up every retry at once."""
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
    """Pending shards (in start order), their attempts and retry times, the deadline, actor start
    failures; each shard gets `retries + 1` attempts, `timeout_s` None derives the deadline."""

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
        """Seconds an attempt may run before it counts as failed."""
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
        """An attempt at `url` failed: the seconds until its retry (it is queued again), or None
        when that was its last attempt."""
        self.attempts[url] += 1
        if self.attempts[url] > self.retries:
            return None
        delay = retry_delay(self.attempts[url])
        heapq.heappush(self._later, (self.clock() + delay, next(self._seq), url))
        return delay

    def requeue(self, url: str) -> None:
        """`url`'s attempt ended through no fault of its own: it starts again first, for free."""
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
