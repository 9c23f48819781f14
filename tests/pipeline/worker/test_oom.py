"""pipeline.worker.oom: a batch out of device memory is split in halves, recursively; one sample
still
out of memory alone is an EditFailure of kind "device". (Through the worker, with the same
outputs as unsplit: tests/pipeline/worker/test_worker.py.)"""

from __future__ import annotations

import torch

from pipeline.worker.oom import EditFailure, split_on_oom


def test_split_on_oom_covers_every_item_once_in_order():
    def run(items):
        if len(items) > 1 and sum(items) % 2:
            raise torch.OutOfMemoryError("out of memory")
        if items == [4]:
            raise torch.OutOfMemoryError("")
        return [i * 10 for i in items]

    parts = list(split_on_oom([1, 2, 3, 4, 5], run))  # 15 odd: [1, 2, 3] + [4, 5] (9 odd)
    assert [p for p, _ in parts] == [[1, 2, 3], [4], [5]]
    assert parts[0][1] == [10, 20, 30] and parts[2][1] == [50]
    assert isinstance(parts[1][1], EditFailure) and parts[1][1].kind == "device"
    assert "(batch of 1): OutOfMemoryError;" in parts[1][1].message
