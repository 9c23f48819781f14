"""pipeline.writer: one shard's tar, manifest and marker, published in that order or not at all."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline import writer as writer_module
from pipeline.writer import MANIFEST_SCHEMA, ShardOutput, now, output_sample, output_urls


def _arrays(seed: int = 0):
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 256, (8, 8, 3), dtype=np.uint8),
            rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))


def _fill(out: ShardOutput, keys=("a", "b"), image_format="png", include_guide=True) -> None:
    for i, key in enumerate(keys):
        output, guide = _arrays(i)
        out.add_sample(output_sample(key, output, {"key": key}, image_format=image_format,
                                     guide=guide if include_guide else None,
                                     target=b"TARGET" if include_guide else None))
        out.add_row({"key": key, "output_key": key, "status": "ok", "created_at": now()})
    out.add_row({"key": "bad", "output_key": "bad", "status": "error", "error": "x"})


def test_commit_publishes_tar_manifest_then_marker(tmp_path, monkeypatch):
    order = []
    original = writer_module.put_bytes_atomic

    def recording(url, data, options=None, **kwargs):
        order.append(url.rsplit("/", 2)[-2])
        return original(url, data, options, **kwargs)

    monkeypatch.setattr(writer_module, "put_bytes_atomic", recording)
    out = ShardOutput(str(tmp_path), "part-1", None)
    _fill(out)
    assert not (tmp_path / "shards" / "part-1.tar").exists()  # nothing visible before commit
    out.commit({"stem": "part-1"})
    assert order == ["manifests", "done"]  # the tar was already in place (rename) before them
    with tarfile.open(tmp_path / "shards" / "part-1.tar") as tar:
        names = tar.getnames()
    assert names == ["a.guide.png", "a.json", "a.png", "a.target.png",
                     "b.guide.png", "b.json", "b.png", "b.target.png"]  # each key contiguous
    table = pq.read_table(tmp_path / "manifests" / "part-1.parquet")
    assert table.schema.equals(MANIFEST_SCHEMA) and table.num_rows == 3
    assert json.loads((tmp_path / "done" / "part-1.json").read_text()) == {"stem": "part-1"}
    assert not [p for p in (tmp_path / "shards").iterdir() if p.name.startswith(".")]


def test_tar_bytes_are_deterministic_and_guides_optional(tmp_path):
    blobs = []
    for run in range(2):
        out = ShardOutput(str(tmp_path / str(run)), "s", None)
        _fill(out, image_format="webp", include_guide=False)
        out.commit({})
        blobs.append((tmp_path / str(run) / "shards" / "s.tar").read_bytes())
    assert blobs[0] == blobs[1]
    with tarfile.open(fileobj=io.BytesIO(blobs[0])) as tar:
        assert tar.getnames() == ["a.json", "a.webp", "b.json", "b.webp"]


def test_abort_publishes_nothing(tmp_path):
    out = ShardOutput(str(tmp_path), "s", None)
    _fill(out)
    out.abort()
    assert list((tmp_path / "shards").iterdir()) == []
    assert not (tmp_path / "manifests").exists() and not (tmp_path / "done").exists()


def test_a_failed_manifest_write_leaves_no_marker(tmp_path, monkeypatch):
    out = ShardOutput(str(tmp_path), "s", None)
    _fill(out)

    def broken(url, data, options=None, **kwargs):
        raise PermissionError("denied")

    monkeypatch.setattr(writer_module, "put_bytes_atomic", broken)
    with pytest.raises(PermissionError):
        out.commit({})
    assert not (tmp_path / "done").exists()


def test_output_urls_keep_the_protocol():
    assert output_urls("s3://b/out/", "p-1") == {
        "tar": "s3://b/out/shards/p-1.tar", "manifest": "s3://b/out/manifests/p-1.parquet",
        "marker": "s3://b/out/done/p-1.json"}
