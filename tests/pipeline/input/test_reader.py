"""pipeline.input.reader: decoding one sample, streaming one tar, the background reader thread."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from pipeline.errors import ShardError
from pipeline.input.members import Member, group_members
from pipeline.input.reader import check_key, decode_sample, iter_samples, prefetch, read_shard
from tests.support.images import png16, png_header_only
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
    def problem(raw, mask_ext=None, max_pixels=4096 * 4096):
        sample = decode_sample(raw, None, mask_ext, max_pixels)
        assert sample.guide is None or sample.error is None
        return sample.error_kind, sample.error

    kind, error = problem({"__key__": "k", "txt": b"x"})
    assert kind == "missing" and "missing guide member k.png or jpg" in error
    kind, error = problem({"__key__": "k", "png": b"nope"})
    assert kind == "decode" and "cannot decode k.png" in error
    raw = {"__key__": "k", "png": png(_guide()), "mask.png": png(np.zeros((4, 8), np.uint8))}
    kind, error = problem(raw, "mask.png")
    assert kind == "mask" and "mask k.mask.png is 8x4 but the guide is 8x8; allowed: the " \
        "same size" in error
    kind, error = problem({"__key__": "k", "png": png(_guide())}, "mask.png")
    assert kind == "missing" and "missing mask member k.mask.png" in error
    kind, error = problem({"__key__": "..", "png": png(_guide())})
    assert kind == "key" and "not allowed" in error
    kind, error = problem({"__key__": "k", "png": png_header_only(9000, 9000)})
    assert kind == "size" and "k.png is 9000x9000 (81,000,000 pixels)" in error
    kind, error = problem({"__key__": "k", "png": png(_guide())}, max_pixels=63)
    assert kind == "size" and "allowed: at most 63 pixels (input.max_pixels)" in error
    grey = {"__key__": "k", "png": png(_guide()), "mask.png": png(np.full((8, 8), 100,
                                                                           np.uint8))}
    kind, error = problem(grey, "mask.png")
    assert kind == "mask" and "values 100 x64" in error


def test_decode_sample_uses_the_one_conversion():
    """16-bit guides are scaled, not clipped (through pipeline.images.decode_guide)."""
    raw = {"__key__": "k", "png": png16(np.full((8, 8), 32768, np.uint16))}
    sample = decode_sample(raw, None, None)
    assert sample.error is None and (sample.guide == 128).all()


def test_group_members_splits_repeated_keys_instead_of_failing():
    names = ["a.png", "a.json", "a.png", "a.json", "b.png", "a.png", "c.PNG", "README",
             "c.mask.png", "c.mask.png"]
    raws = list(group_members(Member(n, n.encode()) for n in names))
    assert [r.key for r in raws] == ["a", "a", "b", "a", "c", "README", "c"]
    assert [sorted(r.members) for r in raws] == [
        ["json", "png"], ["json", "png"], ["png"], ["png"], ["mask.png", "png"], [],
        ["mask.png"]]
    assert [r.keyless for r in raws] == [False] * 5 + [True, False]


def test_duplicate_keys_are_error_samples_and_never_fail_the_shard(tmp_path):
    """The issue's cases: the same key twice in a row failed the shard ("duplicate file
    name"); twice but apart it gave two ok samples with one seed."""
    url = str(tmp_path / "dup.tar")
    first, second = _guide(seed=1), _guide(seed=2)
    with wds.TarWriter(url) as writer:
        writer.write({"__key__": "a", "png": png(first)})
        writer.write({"__key__": "a", "png": png(second)})  # in a row
        writer.write({"__key__": "b", "png": png(second)})
        writer.write({"__key__": "a", "png": png(second)})  # apart
    samples = list(iter_samples(url, None, None, None))
    assert [(s.key, s.error_kind) for s in samples] == [
        ("a", None), ("a", "duplicate"), ("b", None), ("a", "duplicate")]
    assert np.array_equal(samples[0].guide, first)  # the first occurrence is the one kept
    assert samples[1].error == ("duplicate key a: sample 2 of the shard repeats sample 1 "
                                "(only the first is used); allowed: each key once per shard")
    assert "sample 4 of the shard repeats sample 1" in samples[3].error
    assert samples[1].guide is None and samples[3].guide is None


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
