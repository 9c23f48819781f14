"""The output folder of a job: the names of what it holds and their URLs, in one place.

```
OUT/job.json                  resolved spec, fingerprint, versions (pipeline.output.jobrecord)
OUT/shards/{stem}.tar         one output tar per input shard (pipeline.output.writer)
OUT/manifests/{stem}.parquet  one manifest per input shard (pipeline.output.manifest)
OUT/done/{stem}.json          commit marker, written last: the shard is done
OUT/failed/{stem}.json        a shard that failed after its retries (pipeline.driver.runner)
```
`stem` is the input shard's name without folders and tar suffix
(`pipeline.input.shards.shard_stem`).
Every module that reads or writes the output folder takes its names and URLs from here.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.storage import join

__all__ = ["DONE", "FAILED", "JOB_RECORD", "MANIFESTS", "MARKER_SUFFIX", "RESULT_FOLDERS",
           "SHARDS", "ShardUrls", "done_url", "failed_url", "folder_url", "job_record_url",
           "marker_stem", "shard_urls"]

JOB_RECORD = "job.json"
"""What the job is (resolved spec, fingerprint, versions, resolved compute values)."""
SHARDS = "shards"
"""Output tars, `{stem}.tar`."""
MANIFESTS = "manifests"
"""Parquet manifests, `{stem}.parquet`."""
DONE = "done"
"""Commit markers, `{stem}.json`: a shard is done exactly when its marker exists."""
FAILED = "failed"
"""Failure records, `{stem}.json`, of shards that failed after their retries."""
MARKER_SUFFIX = ".json"
"""The suffix of commit markers and failure records."""
RESULT_FOLDERS = (DONE, FAILED, SHARDS, MANIFESTS)
"""The folders holding results (what `run --overwrite` discards; job.json is rewritten)."""


@dataclass(frozen=True)
class ShardUrls:
    """The final locations of one shard's results."""

    tar: str
    manifest: str
    marker: str


def job_record_url(output: str) -> str:
    """`OUT/job.json`."""
    return join(output, JOB_RECORD)


def folder_url(output: str, folder: str) -> str:
    """`OUT/{folder}` for one of `RESULT_FOLDERS`."""
    if folder not in RESULT_FOLDERS:
        raise ValueError(f"folder {folder!r} is not one of {', '.join(RESULT_FOLDERS)}")
    return join(output, folder)


def shard_urls(output: str, stem: str) -> ShardUrls:
    """Where shard `stem`'s tar, manifest and commit marker go (keeping `output`'s protocol)."""
    return ShardUrls(tar=join(output, SHARDS, f"{stem}.tar"),
                     manifest=join(output, MANIFESTS, f"{stem}.parquet"),
                     marker=done_url(output, stem))


def done_url(output: str, stem: str) -> str:
    """`OUT/done/{stem}.json`, shard `stem`'s commit marker."""
    return join(output, DONE, stem + MARKER_SUFFIX)


def failed_url(output: str, stem: str) -> str:
    """`OUT/failed/{stem}.json`, shard `stem`'s failure record."""
    return join(output, FAILED, stem + MARKER_SUFFIX)


def marker_stem(name: str) -> str | None:
    """The stem a file of `done/` or `failed/` records (its base name without `.json`), or None
    for a file that is no marker: another suffix, or a temporary file of an atomic write
    (`.{name}.json.tmp-...` ends otherwise). The one rule by which `run` and `status` count
    markers, so both see the same shards done."""
    base = name.rstrip("/").rsplit("/", 1)[-1]
    if not base.endswith(MARKER_SUFFIX) or len(base) == len(MARKER_SUFFIX):
        return None
    return base[: -len(MARKER_SUFFIX)]
