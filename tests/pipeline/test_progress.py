"""pipeline.progress: the bar counts images, and estimates the total from committed shards."""

from __future__ import annotations

from pipeline.progress import RunProgress


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
