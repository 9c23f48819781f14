"""pipeline.stages on their own: device turns, the ordered sink and the in-flight gauge."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from pipeline.stages import DeviceTurns, Gauge, OrderedSink


def test_device_turns_go_in_arrival_order_and_a_leaver_lets_the_next_in():
    turns = DeviceTurns()
    first, second, order = object(), object(), []
    turns.arrive(first)
    turns.arrive(second)

    def use(token, name):
        with turns.turn(token) as waited:
            order.append((name, waited))
        turns.leave(token)

    later = threading.Thread(target=use, args=(second, "second"))
    later.start()
    time.sleep(0.2)
    assert order == []  # the second shard waits while the first has not computed
    use(first, "first")
    later.join(timeout=5)
    assert [name for name, _ in order] == ["first", "second"]
    assert order[1][1] >= 0.15  # it waited for its turn
    # a shard that fails before its turn leaves the queue and never blocks the next one
    dead, alive = object(), object()
    turns.arrive(dead)
    turns.arrive(alive)
    turns.leave(dead)
    with turns.turn(alive) as waited:
        assert waited < 0.1


def test_the_ordered_sink_writes_in_submission_order_within_its_window():
    written, pending_seen = [], []
    with ThreadPoolExecutor(4) as pool:
        sink: OrderedSink[int] = OrderedSink(pool, written.append, window=3)

        def job(value, delay):
            time.sleep(delay)
            return value

        for value, delay in enumerate([0.3, 0.0, 0.1, 0.0, 0.2, 0.0]):
            sink.submit(job, value, delay)
            pending_seen.append(len(sink.pending))
        sink.finish()
    assert written == [0, 1, 2, 3, 4, 5]  # later jobs finished first, written in order
    assert max(pending_seen) <= 3 and not sink.pending


def test_the_ordered_sink_raises_a_jobs_error_and_cancel_drops_the_rest():
    written = []
    with ThreadPoolExecutor(1) as pool:
        sink: OrderedSink[int] = OrderedSink(pool, written.append, window=8)
        gate = threading.Event()

        def fail():
            raise OSError("encoder failed")

        with pytest.raises(OSError, match="encoder failed"):  # from submit or from finish
            sink.submit(fail)
            sink.submit(lambda: gate.wait(5) and 1)
            sink.finish()
        sink.cancel()
        gate.set()
    assert written == [] and not sink.pending


def test_a_closed_gauge_leaves_its_parent_at_the_sum_of_the_open_ones():
    """The issue's case: an aborted shard's gauge was reset by a read-then-add while its
    decode jobs still added to it (0 right after the abort, 2 a second later, for good)."""
    parent = Gauge()
    kept, aborted = Gauge(parent), Gauge(parent)
    kept.add(3)
    aborted.add(5)
    assert (parent.value, parent.peak) == (8, 8)
    assert aborted.close() == 5 and parent.value == 3
    aborted.add(2)  # a decode of the aborted shard that finishes afterwards
    aborted.add(-1)
    assert (aborted.value, parent.value) == (0, 3) and aborted.close() == 0
    kept.add(-3)
    assert parent.value == 0 and parent.peak == 8


def test_closing_a_gauge_while_threads_add_to_it_loses_no_count():
    parent = Gauge()
    for _ in range(20):
        steady, dying = Gauge(parent), Gauge(parent)
        start = threading.Barrier(5)

        def churn(gauge, start=start, n=400):
            start.wait()
            for _ in range(n):
                gauge.add(1)
                gauge.add(-1)
            gauge.add(1)  # one left alive per thread

        threads = [threading.Thread(target=churn, args=(g,)) for g in
                   (steady, steady, dying, dying)]
        for thread in threads:
            thread.start()
        start.wait()
        dying.close()  # mid-way, while two threads still add to it
        for thread in threads:
            thread.join()
        assert parent.value == steady.value == 2
        steady.close()
        assert parent.value == 0
