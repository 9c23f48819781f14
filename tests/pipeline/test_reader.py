"""pipeline.reader: decoding one sample, streaming one tar, the background reader thread."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline.errors import ShardError
from pipeline.reader import check_key, decode_sample, iter_samples, prefetch, read_shard
from tests.support.shards import png, write_shards


def _guide(size: int = 8, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def test_keys_that_escape_are_errors():
    assert check_key("a_b-1") is None
    for key in ("../x", "a/b", "..", ".hidden", ""):
        assert check_key(key)


def test_decode_sample_guide_mask_and_target():
    guide, mask = _guide(), np.zeros((8, 8), np.uint8)
    mask[:, 4:] = 255
    raw = {"__key__": "k", "png": png(guide), "mask.png": png(mask), "target.png": b"T"}
    sample = decode_sample(raw, None, "mask.png")
    assert sample.error is None and np.array_equal(sample.guide, guide)
    assert sample.mask.tolist() == (mask // 255).tolist()
    assert sample.members == {"guide": raw["png"], "mask": raw["mask.png"], "target": b"T"}


def test_decode_problems_are_sample_errors_not_exceptions():
    assert "missing guide member k.png or jpg" in decode_sample({"__key__": "k", "txt": b"x"},
                                                                None, None).error
    assert "cannot decode k.png" in decode_sample({"__key__": "k", "png": b"nope"}, None,
                                                  None).error
    raw = {"__key__": "k", "png": png(_guide()), "mask.png": png(np.zeros((4, 8), np.uint8))}
    assert "allowed: the same size" in decode_sample(raw, None, "mask.png").error
    assert "missing mask member k.mask.png" in decode_sample({"__key__": "k",
                                                              "png": png(_guide())},
                                                             None, "mask.png").error
    assert "not allowed" in decode_sample({"__key__": "..", "png": png(_guide())}, None,
                                          None).error


def test_iter_samples_in_tar_order(tmp_path):
    urls = write_shards(tmp_path, n_shards=1, per_shard=5, size=8, bad=False)
    keys = [s.key for s in read_shard(urls[0], None, None, None)]
    assert keys == [f"s0_{i:03d}" for i in range(5)]


def test_truncated_tar_is_a_shard_error(tmp_path):
    url = write_shards(tmp_path, n_shards=1, per_shard=4, size=8, bad=False)[0]
    data = Path(url).read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: len(data) // 2 + 100])
    with pytest.raises(ShardError, match=r"cut\.tar: cannot read: .*truncated"):
        list(iter_samples(str(cut), None, None, None))
    with pytest.raises(ShardError, match="cannot read"):
        list(iter_samples(str(tmp_path / "missing.tar"), None, None, None))


def test_prefetch_reraises_after_the_items_before_the_error():
    def items():
        yield 1
        yield 2
        raise ValueError("boom")

    got = []
    with pytest.raises(ValueError, match="boom"):
        for item in prefetch(items(), depth=1):
            got.append(item)
    assert got == [1, 2]


def test_prefetch_thread_ends_when_the_consumer_stops_early():
    """The reader's final puts never block on a consumer that is gone (a full queue)."""
    def items():
        yield from range(10)  # more than the queue holds: the producer blocks on a full queue

    before = {t for t in threading.enumerate() if t.name == "shard-reader"}
    stream = prefetch(items(), depth=2)
    assert next(stream) == 0
    time.sleep(0.3)  # the producer has filled the queue and waits
    stream.close()  # the consumer stops early
    deadline = time.monotonic() + 5
    while {t for t in threading.enumerate() if t.name == "shard-reader"} - before:
        assert time.monotonic() < deadline, "the reader thread is still blocked"
        time.sleep(0.05)

    # the same after the producer's last item, when only its end-marker put is left
    stream = prefetch(iter([1, 2]), depth=1)
    assert next(stream) == 1
    time.sleep(0.3)
    stream.close()
    deadline = time.monotonic() + 5
    while {t for t in threading.enumerate() if t.name == "shard-reader"} - before:
        assert time.monotonic() < deadline, "the reader thread is blocked on its end marker"
        time.sleep(0.05)
