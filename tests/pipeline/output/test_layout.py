"""pipeline.output.layout: the output folder's names and URLs."""

from __future__ import annotations

import pytest

from pipeline.output.layout import (
    RESULT_FOLDERS,
    ShardUrls,
    done_url,
    failed_url,
    folder_url,
    job_record_url,
    marker_stem,
    shard_urls,
)


def test_urls_keep_the_protocol():
    assert shard_urls("s3://b/out/", "p-1") == ShardUrls(
        tar="s3://b/out/shards/p-1.tar", manifest="s3://b/out/manifests/p-1.parquet",
        marker="s3://b/out/done/p-1.json")
    assert done_url("/o", "p") == "/o/done/p.json"
    assert failed_url("gs://b/o", "p") == "gs://b/o/failed/p.json"
    assert job_record_url("file:///o/") == "file:///o/job.json"
    assert [folder_url("/o", f) for f in RESULT_FOLDERS] == [
        "/o/done", "/o/failed", "/o/shards", "/o/manifests"]
    with pytest.raises(ValueError, match="folder 'tmp' is not one of done, failed"):
        folder_url("/o", "tmp")


def test_one_rule_names_markers():
    """`run` (planning) and `status` count the same markers: a name starting with '.' is a
    marker like any other (the issue's case: status skipped it, run counted it); temporary
    files of atomic writes and other suffixes are not."""
    assert marker_stem("s3://b/o/done/p-000001.json") == "p-000001"
    assert marker_stem("/o/done/.hidden.json") == ".hidden"
    assert marker_stem("/o/done/.p.json.tmp-0123456789ab") is None
    assert marker_stem("/o/done/p.parquet") is None
    assert marker_stem("/o/done/.json") is None
