"""Tests of pipeline.input.shards: pattern expansion, shard stems and resume planning."""

from __future__ import annotations

from pathlib import Path

import fsspec
import pytest

from pipeline.errors import PipelineError
from pipeline.input.shards import expand_shards, shard_stem, unique_stems


def _touch(fs: fsspec.AbstractFileSystem, *paths: str) -> None:
    for path in paths:
        fs.pipe(path, b"x")


def test_brace_range_is_zero_padded_and_not_listed() -> None:
    shards = expand_shards("s3://no-such-bucket/p-{000000..000127}.tar")
    assert len(shards) == 128
    assert shards[:2] == ["s3://no-such-bucket/p-000000.tar", "s3://no-such-bucket/p-000001.tar"]
    assert shards[-1] == "s3://no-such-bucket/p-000127.tar"


def test_brace_list_and_list_of_patterns_deduplicated() -> None:
    shards = expand_shards(["gs://b/{train,val}-{0..1}.tar", "gs://b/val-1.tar", "gs://b/x.tar",
                            "gs://b/train-0.tar"])
    assert shards == ["gs://b/train-0.tar", "gs://b/train-1.tar", "gs://b/val-0.tar",
                      "gs://b/val-1.tar", "gs://b/x.tar"]


def test_local_glob_sorted_files_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("b-000001.tar", "a-000002.tar", "b-000000.tar", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "c-dir.tar").mkdir()
    assert expand_shards(str(tmp_path / "*.tar")) == [
        str(tmp_path / n) for n in ("a-000002.tar", "b-000000.tar", "b-000001.tar")]
    monkeypatch.chdir(tmp_path)  # relative patterns come back absolute, duplicates merged
    assert expand_shards(["b-*.tar", f"file://{tmp_path}/b-000000.tar", "b-000001.tar"]) == [
        str(tmp_path / "b-000000.tar"), str(tmp_path / "b-000001.tar")]
    assert expand_shards("b-00000[1].tar") == [str(tmp_path / "b-000001.tar")]


def test_memory_glob_keeps_protocol_and_merges_spellings(memory_root: str) -> None:
    fs = fsspec.filesystem("memory")
    _touch(fs, f"{memory_root}/in/p-000001.tar", f"{memory_root}/in/p-000000.tar",
           f"{memory_root}/in/q-000000.tar", f"{memory_root}/other/p-9.tar")
    shards = expand_shards([f"{memory_root}/in/p-000001.tar", f"{memory_root}/in/p-*.tar"])
    assert len(shards) == 2
    assert shards[0] == f"{memory_root}/in/p-000001.tar"  # first spelling kept
    assert shards[1].startswith("memory://") and shards[1].endswith("/in/p-000000.tar")
    assert all(fs.exists(url) for url in shards)
    both = expand_shards(f"{memory_root}/{{in,other}}/p-*.tar")  # braces, then globs
    assert [shard_stem(u) for u in both] == ["p-000000", "p-000001", "p-9"]


def test_zero_matches_and_bad_patterns(tmp_path: Path, memory_root: str) -> None:
    with pytest.raises(PipelineError, match=r"'.*nothing-\*\.tar' matches no files"):
        expand_shards([str(tmp_path / "nothing-*.tar")])
    with pytest.raises(PipelineError, match="matches no files"):
        expand_shards(f"{memory_root}/*.tar")
    with pytest.raises(PipelineError, match="Unbalanced braces"):
        expand_shards("s3://b/p-{000..001.tar")
    with pytest.raises(PipelineError, match="no patterns"):
        expand_shards([])


def test_https_question_mark_is_not_a_glob() -> None:
    url = "https://host/data/p-000001.tar?sig=abc"
    assert expand_shards(url) == [url]
    assert shard_stem(url) == "p-000001"


@pytest.mark.parametrize(("url", "stem"), [
    ("s3://b/in/p-000001.tar", "p-000001"),
    ("/data/x/shard.tar.gz", "shard"),
    ("gs://b/a.tgz", "a"),
    ("relative/name.with.dots.tar", "name.with.dots"),
    ("memory:///d/raw", "raw"),
    ("s3://b/.tar", ".tar"),
])
def test_shard_stem(url: str, stem: str) -> None:
    assert shard_stem(url) == stem


def test_stem_collisions_listed() -> None:
    with pytest.raises(PipelineError) as info:
        expand_shards(["s3://a/x/p-0.tar", "s3://a/y/p-0.tar", "s3://a/z/p-0.tar.gz",
                       "s3://a/y/q.tar", "s3://a/q.tar"])
    message = str(info.value)
    assert "p-0: s3://a/x/p-0.tar, s3://a/y/p-0.tar, s3://a/z/p-0.tar.gz" in message
    assert "q: s3://a/y/q.tar, s3://a/q.tar" in message
    assert unique_stems(["s3://a/p-0.tar", "s3://a/p-1.tar"]) == {
        "p-0": "s3://a/p-0.tar", "p-1": "s3://a/p-1.tar"}
