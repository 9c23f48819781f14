"""pipeline.output.folder.OutputFolder: the output folder's names and URLs, which shards are
done (one listing), and the one rule that names markers."""

from __future__ import annotations

from pathlib import Path

import fsspec
import pytest
from fsspec.implementations.memory import MemoryFileSystem

from pipeline.errors import PipelineError
from pipeline.input.shards import expand_shards
from pipeline.output.folder import OutputFolder
from pipeline.output.layout import FAILED, JOB_RECORD, RESULT_FOLDERS, ShardUrls, marker_stem


def _touch(fs: fsspec.AbstractFileSystem, *paths: str) -> None:
    for path in paths:
        fs.pipe(path, b"x")


def test_urls_keep_the_protocol():
    assert OutputFolder("s3://b/out/").shard_urls("p-1") == ShardUrls(
        tar="s3://b/out/shards/p-1.tar", manifest="s3://b/out/manifests/p-1.parquet",
        marker="s3://b/out/done/p-1.json")
    assert OutputFolder("gs://b/o").url(FAILED, "p.json") == "gs://b/o/failed/p.json"
    assert OutputFolder("file:///o/").url(JOB_RECORD) == "file:///o/job.json"
    assert [OutputFolder("/o").url(f) for f in RESULT_FOLDERS] == [
        "/o/done", "/o/failed", "/o/shards", "/o/manifests", "/o/scores"]


def test_one_rule_names_markers():
    """`run` (planning) and `status` count the same markers: a name starting with '.' is a
    marker like any other (the issue's case: status skipped it, run counted it); temporary
    files of atomic writes and other suffixes are not."""
    assert marker_stem("s3://b/o/done/p-000001.json") == "p-000001"
    assert marker_stem("/o/done/.hidden.json") == ".hidden"
    assert marker_stem("/o/done/.p.json.tmp-0123456789ab") is None
    assert marker_stem("/o/done/p.parquet") is None
    assert marker_stem("/o/done/.json") is None


def test_plan_local(tmp_path: Path) -> None:
    shards = [f"s3://b/p-{i:06d}.tar" for i in range(4)]
    out = tmp_path / "out"
    assert OutputFolder(str(out)).plan(shards) == (shards, [])  # no output folder yet
    (out / "done").mkdir(parents=True)
    for name in ("p-000001.json", "p-000003.json", "p-000002.json.tmp", "unrelated.json"):
        (out / "done" / name).write_text("{}")
    (out / "shards").mkdir()
    (out / "shards" / "p-000000.tar").write_bytes(b"x")  # tar without marker: not done
    pending, done = OutputFolder(str(out)).plan(shards)
    assert pending == [shards[0], shards[2]]
    assert done == [shards[1], shards[3]]


def test_plan_memory_lists_once(memory_root: str,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    fs = fsspec.filesystem("memory")
    shards = expand_shards(f"{memory_root}/in/p-{{0..5}}.tar")
    _touch(fs, *(f"{memory_root}/out/done/p-{i}.json" for i in (0, 5)))
    calls: list[str] = []
    original_ls = MemoryFileSystem.ls

    def counting_ls(self: MemoryFileSystem, path: str, detail: bool = True, **kw: object):
        calls.append(path)
        return original_ls(self, path, detail=detail, **kw)

    monkeypatch.setattr(MemoryFileSystem, "ls", counting_ls)
    for name in ("exists", "info", "isfile"):
        monkeypatch.setattr(MemoryFileSystem, name, lambda *a, **k: pytest.fail("per-shard"))
    pending, done = OutputFolder(f"{memory_root}/out").plan(shards)
    assert len(calls) == 1 and calls[0].endswith("/out/done")
    assert done == [shards[0], shards[5]]
    assert pending == shards[1:5]


def test_plan_rejects_colliding_stems(tmp_path: Path) -> None:
    with pytest.raises(PipelineError, match="collide"):
        OutputFolder(str(tmp_path)).plan(["s3://a/p.tar", "s3://b/p.tar"])
