"""pipeline.driver.progress: the bar counts images, and estimates the total from committed
shards."""

from __future__ import annotations

import io
import sys

from pipeline.driver.progress import RunProgress


def test_the_bar_counts_images_and_estimates_the_total_from_committed_shards():
    bar = RunProgress(shards=4, name="job", enabled=False)
    bar.images(5)
    assert bar.finished == 5 and bar.estimated_total() is None  # no shard committed yet
    bar.images(12)
    bar.shard_done(10)
    assert bar.estimated_total() == 40  # 10 images a shard, 4 shards
    bar.shard_failed()
    bar.images(25)
    bar.shard_done(12)
    assert bar.estimated_total() == 33  # 22 in two done shards + one left at 11 a shard
    assert (bar.done_shards, bar.failed_shards, bar.finished) == (2, 1, 25)
    bar.images(20)  # a failed attempt's images dropped: the count never runs backwards
    assert bar.finished == 25
    bar.close()


class _Terminal(io.StringIO):
    """A stream that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def test_written_to_a_file_the_progress_is_a_few_plain_lines(monkeypatch):
    """Redirected to a file, the bar wrote a '\\r'-joined update every 0.5 s (each call of the
    driver's loop): now plain lines, on a phase change, at most every 30 s and at the end."""
    log = io.StringIO()
    monkeypatch.setattr(sys, "stderr", log)
    bar = RunProgress(shards=4, name="job", enabled=True)
    bar.actors_started(1)
    for n in range(1, 101):  # the driver's loop, 100 times
        bar.images(n)
    bar.shard_done(100)
    bar.close()
    text = log.getvalue()
    assert "\r" not in text and text.endswith("\n")
    lines = text.splitlines()
    assert len(lines) == 3, lines  # the actor starting, the first images, the end
    assert lines[0].startswith("job: images 0, 0.00 images/s, shards 0/4 done, 0 failed, ")
    assert lines[0].endswith(", starting 1 actor (loading the model)")
    assert lines[1].startswith("job: images 1, ")
    assert lines[2].startswith("job: images 100/400, ")
    assert "shards 1/4 done, 0 failed" in lines[2]


def test_on_a_terminal_the_bar_says_what_it_waits_for_and_counts_images_per_second(
        monkeypatch):
    screen = _Terminal()
    monkeypatch.setattr(sys, "stderr", screen)
    bar = RunProgress(shards=4, name="job", enabled=True)
    assert "starting" in str(bar.bar)
    bar.actors_started(2)
    assert "starting 2 actors (loading the model)" in str(bar.bar)
    bar.actor_ready(1)
    assert "editing the first batches" in str(bar.bar)
    # 8 images after 20 s: 0.4 images/s, which tqdm's default format shows as 2.50s/img
    bar.bar.start_t -= 20
    bar.bar.last_print_t -= 20
    bar.images(8)
    shown = str(bar.bar)
    assert "0.40img/s" in shown and "s/img" not in shown, shown
    assert "editing" not in shown and "shards 0/4, 0 failed" in shown
    bar.close()
