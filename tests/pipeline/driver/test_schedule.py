"""pipeline.driver.schedule: the driver's bookkeeping without Ray (order, retries, deadlines,
starts)."""

from __future__ import annotations

import pytest

from pipeline.driver.schedule import START_FAILURES, TIMEOUT_FLOOR_S, Schedule, retry_delay


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_shards_go_in_order_and_retries_wait_their_delay():
    clock = Clock()
    schedule = Schedule(["a", "b", "c"], retries=2, clock=clock)
    assert schedule.next_shard() == "a"
    assert schedule.failed("a") == retry_delay(1) == 1.0  # queued again, after 1 s
    assert [schedule.next_shard(), schedule.next_shard(), schedule.next_shard()] == \
        ["b", "c", None]
    assert len(schedule) == 1 and schedule.not_started() == ["a"]
    clock.now += 1.0
    assert schedule.next_shard() == "a"
    assert schedule.failed("a") == 2.0  # the second retry waits twice as long
    clock.now += 2.0
    assert schedule.next_shard() == "a"
    assert schedule.failed("a") is None  # 3 attempts: given up
    assert schedule.attempts["a"] == 3 and len(schedule) == 0


def test_a_shard_ended_for_another_ones_deadline_starts_again_first_without_an_attempt():
    schedule = Schedule(["a", "b", "c"], retries=0)
    assert schedule.next_shard() == "a"
    schedule.requeue("a")
    assert schedule.next_shard() == "a" and schedule.attempts["a"] == 0


def test_the_deadline_is_explicit_or_ten_times_the_slowest_commit_at_least_an_hour():
    clock = Clock()
    derived = Schedule(["a"], retries=1, clock=clock)
    assert derived.deadline_s() == TIMEOUT_FLOOR_S == 3600.0  # before any commit
    derived.committed("x", 500.0)
    derived.committed("y", 30.0)
    assert derived.deadline_s() == 5000.0
    started = clock.now
    clock.now += 4999.0
    assert not derived.overdue(started)
    clock.now += 2.0
    assert derived.overdue(started)
    explicit = Schedule(["a"], retries=1, timeout_s=4.0, clock=clock)
    explicit.committed("x", 500.0)
    assert explicit.deadline_s() == 4.0


def test_actor_start_failures_stop_the_job_only_when_in_a_row():
    schedule = Schedule(["a"], retries=0)
    for _ in range(START_FAILURES - 1):
        assert not schedule.actor_start_failed()
    schedule.actor_started()  # one started: the count begins again
    for _ in range(START_FAILURES - 1):
        assert not schedule.actor_start_failed()
    assert schedule.actor_start_failed()


@pytest.mark.parametrize("n", [200, 20_000])
def test_every_shard_failed_once_comes_back_once_in_failure_order(n):
    """(Scheduling time per shard at 200 and 2,000 shards: benchmarks/driver_scale.py.)"""
    clock = Clock()
    schedule = Schedule([f"s{i}" for i in range(n)], retries=1, clock=clock)
    for _ in range(n):
        schedule.failed(schedule.next_shard())
    clock.now += 10
    started = [schedule.next_shard() for _ in range(n)]
    assert started == [f"s{i}" for i in range(n)] and schedule.next_shard() is None
