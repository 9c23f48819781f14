"""pipeline.output.folder.OutputFolder: the output folder's names and URLs, which shards are
done (one listing), and the one rule that names markers."""

from __future__ import annotations

import json
from pathlib import Path

import fsspec
import pytest
from fsspec.implementations.memory import MemoryFileSystem

from pipeline.errors import PipelineError
from pipeline.input.shards import expand_shards
from pipeline.output.folder import OutputFolder, Plan
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


def _commit(out: Path, stem: str, marker: dict | None = None) -> None:
    """A committed shard as a marker written before sizes were recorded sees it: a tar, a
    manifest and a marker (`marker`, default {})."""
    for folder, name in (("shards", f"{stem}.tar"), ("manifests", f"{stem}.parquet")):
        (out / folder).mkdir(parents=True, exist_ok=True)
        (out / folder / name).write_bytes(b"x" * 10)
    (out / "done").mkdir(parents=True, exist_ok=True)
    (out / "done" / f"{stem}.json").write_text(json.dumps(marker or {}))


def test_plan_local(tmp_path: Path) -> None:
    shards = [f"s3://b/p-{i:06d}.tar" for i in range(4)]
    out = tmp_path / "out"
    assert OutputFolder(str(out)).plan(shards) == Plan(pending=shards)  # no output folder yet
    _commit(out, "p-000001")
    _commit(out, "p-000003")
    _commit(out, "unrelated")
    (out / "done" / "p-000002.json.tmp").write_text("{}")
    (out / "shards" / "p-000000.tar").write_bytes(b"x")  # tar without marker: not done
    plan = OutputFolder(str(out)).plan(shards)
    assert plan.pending == [shards[0], shards[2]]
    assert plan.done == [shards[1], shards[3]]
    assert plan.markers_read == 0 and plan.damaged == {}  # files older than their markers


def test_plan_memory_lists_each_folder_once(memory_root: str,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """done/, shards/ and manifests/ are listed once each; nothing is asked per shard (the
    markers are read in bulk, `fs.cat` of a list)."""
    fs = fsspec.filesystem("memory")
    shards = expand_shards(f"{memory_root}/in/p-{{0..5}}.tar")
    for i in (0, 5):
        _touch(fs, *(f"{memory_root}/out/{folder}/p-{i}{suffix}" for folder, suffix in
                     (("done", ".json"), ("shards", ".tar"), ("manifests", ".parquet"))))
    calls: list[str] = []
    original_ls = MemoryFileSystem.ls

    def counting_ls(self: MemoryFileSystem, path: str, detail: bool = True, **kw: object):
        calls.append(path.rsplit("/", 1)[-1])
        return original_ls(self, path, detail=detail, **kw)

    monkeypatch.setattr(MemoryFileSystem, "ls", counting_ls)
    for name in ("exists", "info", "isfile"):
        monkeypatch.setattr(MemoryFileSystem, name, lambda *a, **k: pytest.fail("per-shard"))
    plan = OutputFolder(f"{memory_root}/out").plan(shards)
    assert calls == ["done", "shards", "manifests"]
    assert plan.done == [shards[0], shards[5]]
    assert plan.pending == shards[1:5]


def test_plan_rejects_colliding_stems(tmp_path: Path) -> None:
    with pytest.raises(PipelineError, match="collide"):
        OutputFolder(str(tmp_path)).plan(["s3://a/p.tar", "s3://b/p.tar"])
