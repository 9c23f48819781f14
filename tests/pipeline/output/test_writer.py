"""pipeline.output.writer: one shard's tar, manifest and marker, published in that order or not at
all."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import zlib

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from pipeline.output import writer as writer_module
from pipeline.output.folder import OutputFolder
from pipeline.output.manifest import MANIFEST_SCHEMA, ManifestRowError, manifest_row
from pipeline.output.writer import ShardOutput, model_location, now, output_sample
from pipeline.storage import absolute_url


def row(**values) -> dict:
    """A manifest row: `values`, every other column null."""
    return manifest_row(**{**dict.fromkeys(MANIFEST_SCHEMA.names), **values})


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
        out.add_row(row(key=key, output_key=key, status="ok", created_at=now()))
    out.add_row(row(key="bad", output_key="bad", status="error", error="x", error_kind="decode"))


def test_commit_publishes_tar_manifest_then_marker(tmp_path, monkeypatch):
    order = []
    original = writer_module.put_bytes_atomic

    def recording(url, data, options=None, **kwargs):
        order.append(url.rsplit("/", 2)[-2])
        return original(url, data, options, **kwargs)

    monkeypatch.setattr(writer_module, "put_bytes_atomic", recording)
    out = OutputFolder(str(tmp_path)).shard_writer("part-1")
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
    marker = json.loads((tmp_path / "done" / "part-1.json").read_text())
    tar = (tmp_path / "shards" / "part-1.tar").read_bytes()
    manifest = (tmp_path / "manifests" / "part-1.parquet").read_bytes()
    assert marker == {"stem": "part-1", "files": {  # what it commits, sizes and digests
        "tar": {"bytes": len(tar), "crc32": f"{zlib.crc32(tar):08x}"},
        "manifest": {"bytes": len(manifest), "sha256": hashlib.sha256(manifest).hexdigest()}}}
    assert not [p for p in (tmp_path / "shards").iterdir() if p.name.startswith(".")]


def test_tar_bytes_are_deterministic_and_guides_optional(tmp_path):
    blobs = []
    for run in range(2):
        out = OutputFolder(str(tmp_path / str(run))).shard_writer("s")
        _fill(out, image_format="webp", include_guide=False)
        out.commit({})
        blobs.append((tmp_path / str(run) / "shards" / "s.tar").read_bytes())
    assert blobs[0] == blobs[1]
    with tarfile.open(fileobj=io.BytesIO(blobs[0])) as tar:
        assert tar.getnames() == ["a.json", "a.webp", "b.json", "b.webp"]


def test_abort_publishes_nothing(tmp_path):
    out = OutputFolder(str(tmp_path)).shard_writer("s")
    _fill(out)
    out.abort()
    assert list((tmp_path / "shards").iterdir()) == []
    assert not (tmp_path / "manifests").exists() and not (tmp_path / "done").exists()


def test_a_failed_manifest_write_leaves_no_marker(tmp_path, monkeypatch):
    out = OutputFolder(str(tmp_path)).shard_writer("s")
    _fill(out)

    def broken(url, data, options=None, **kwargs):
        raise PermissionError("denied")

    monkeypatch.setattr(writer_module, "put_bytes_atomic", broken)
    with pytest.raises(PermissionError):
        out.commit({})
    assert not (tmp_path / "done").exists()


OLD_SCHEMA = pa.schema([MANIFEST_SCHEMA.field(i) for i in range(19)])
"""The manifest schema before issue 11 (its columns, in order, up to created_at)."""


def test_new_columns_are_appended_to_the_old_schema():
    assert OLD_SCHEMA.names[-1] == "created_at"
    assert MANIFEST_SCHEMA.names[19:] == ["eta", "dtype", "batch_size", "model_identity",
                                          "error_kind",  # issue 11
                                          "prompt", "negative_prompt", "guidance_scale",
                                          # issue 23
                                          "prompt_truncated", "negative_prompt_truncated"]


def test_old_and_new_manifests_read_together(tmp_path):
    """A job resumed across the schema change holds both; read with MANIFEST_SCHEMA, the new
    columns are null for the old rows (inferred from one file, pyarrow would drop them)."""
    folder = tmp_path / "manifests"
    folder.mkdir()
    pq.write_table(pa.Table.from_pylist([{"key": "old", "status": "ok"}], schema=OLD_SCHEMA),
                   folder / "a-old.parquet")
    new = OutputFolder(str(tmp_path)).shard_writer("b-new")
    new.add_row(row(key="new", status="error", error="x", error_kind="decode", dtype="fp32"))
    new.commit({})
    rows = pads.dataset(str(folder), schema=MANIFEST_SCHEMA).to_table().to_pylist()
    assert [(r["key"], r["error_kind"], r["dtype"]) for r in rows] == [
        ("old", None, None), ("new", "decode", "fp32")]
    unified = pa.unify_schemas([pq.read_schema(p) for p in sorted(folder.iterdir())])
    assert unified.equals(MANIFEST_SCHEMA)


def test_add_row_refuses_a_row_the_schema_does_not_hold(tmp_path):
    """The issue's case: add_row dropped unknown keys, so a misspelt column became null."""
    out = OutputFolder(str(tmp_path)).shard_writer("s")
    good = row(key="k", output_key="k", status="ok")
    with pytest.raises(ManifestRowError, match="unknown widht"):
        out.add_row({**good, "widht": 3})
    with pytest.raises(ManifestRowError, match="missing width"):
        out.add_row({k: v for k, v in good.items() if k != "width"})
    with pytest.raises(ManifestRowError, match="error_kind 'oops' is not one of key, missing"):
        out.add_row({**good, "status": "error", "error": "x", "error_kind": "oops"})
    out.add_row(good)
    assert out.rows == [good]
    out.abort()


def test_an_empty_manifest_reads_everywhere(tmp_path):
    """The issue's case: a 0-row manifest broke HF datasets ("BatchSize must be greater
    than 0"): it is written without a row group."""
    import duckdb
    import pandas

    OutputFolder(str(tmp_path)).shard_writer("a-empty").commit({})
    full = OutputFolder(str(tmp_path)).shard_writer("b-full")
    _fill(full)
    full.commit({})
    empty = tmp_path / "manifests" / "a-empty.parquet"
    table = pq.read_table(empty)
    assert table.num_rows == 0 and table.schema.equals(MANIFEST_SCHEMA)
    assert pq.ParquetFile(empty).metadata.num_row_groups == 0
    frame = pandas.read_parquet(empty)
    assert len(frame) == 0 and list(frame.columns) == MANIFEST_SCHEMA.names
    assert duckdb.sql(f"SELECT count(*) FROM '{empty}'").fetchall() == [(0,)]
    assert duckdb.sql(f"SELECT count(*) FROM '{tmp_path}/manifests/*.parquet'").fetchall() \
        == [(3,)]
    assert pads.dataset(str(tmp_path / "manifests")).to_table().num_rows == 3


def test_an_empty_manifest_reads_with_hf_datasets(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import datasets

    OutputFolder(str(tmp_path)).shard_writer("a-empty").commit({})
    full = OutputFolder(str(tmp_path)).shard_writer("b-full")
    _fill(full)
    full.commit({})
    job = datasets.load_dataset("parquet", data_files=str(tmp_path / "manifests" / "*.parquet"),
                                split="train", cache_dir=str(tmp_path / "cache"))
    assert job.num_rows == 3 and set(job.column_names) == set(MANIFEST_SCHEMA.names)
    # alone, an empty file streams as 0 rows with its columns (a non-streaming load refuses
    # every empty split, "corresponds to no data", whatever the format)
    alone = datasets.load_dataset("parquet", split="train", streaming=True, data_files=str(
        tmp_path / "manifests" / "a-empty.parquet"))
    assert list(alone) == [] and set(alone.features) == set(MANIFEST_SCHEMA.names)


def test_locations_in_manifests_are_absolute_and_without_credentials(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "m").mkdir(parents=True)
    assert model_location("models/m") == str(tmp_path / "models" / "m")
    assert model_location("file://models/m") == str(tmp_path / "models" / "m")
    assert model_location("google/ddpm-ema-bedroom-256") == "google/ddpm-ema-bedroom-256"
    assert model_location("https://user:pw@host/m?X-Amz-Signature=abc&v=1") == \
        "https://***@host/m?X-Amz-Signature=%2A%2A%2A&v=1"
    assert absolute_url("out/shards/a.tar") == str(tmp_path / "out" / "shards" / "a.tar")
    assert absolute_url("s3://b/out/a.tar") == "s3://b/out/a.tar"
    assert absolute_url("file://out/a.tar") == f"file://{tmp_path}/out/a.tar"
