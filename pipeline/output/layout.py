"""The names of what an output folder holds (`pipeline.output.folder.OutputFolder` builds their
URLs and does every read and write).

```
OUT/job.json                  resolved spec, fingerprint, versions (pipeline.output.jobrecord)
OUT/shards/{stem}.tar         one output tar per input shard (pipeline.output.writer)
OUT/manifests/{stem}.parquet  one manifest per input shard (pipeline.output.manifest)
OUT/done/{stem}.json          commit marker, written last: the shard is done
OUT/failed/{stem}.json        a shard that failed after its retries (pipeline.driver.runner)
OUT/lease.json                the run writing here now (pipeline.output.lease)
OUT/scores/{stem}.parquet     per-row scores of a shard, before its marker (pipeline.output.scores)
OUT/scores/settings.json      the score settings every sidecar was made with
```
`stem` is the input shard's name without folders and tar suffix
(`pipeline.input.shards.shard_stem`).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DONE", "FAILED", "JOB_RECORD", "LEASE", "MANIFESTS", "MARKER_SUFFIX", "RESULT_FOLDERS",
           "SCORES", "SCORE_SETTINGS", "SHARDS", "ShardUrls", "marker_stem"]

JOB_RECORD = "job.json"
"""What the job is (resolved spec, fingerprint, versions, resolved compute values)."""
LEASE = "lease.json"
"""The run writing here now: holder, host, pid, start and heartbeat (removed at its end)."""
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
SCORES = "scores"
"""Per-row score sidecars, `{stem}.parquet`, one row per manifest row (`pipeline.output.scores`)."""
SCORE_SETTINGS = "settings.json"
"""In SCORES: the score settings of its sidecars (a rescore with others needs --overwrite)."""
RESULT_FOLDERS = (DONE, FAILED, SHARDS, MANIFESTS, SCORES)
"""The folders holding results (what `run --overwrite` discards; job.json is rewritten)."""


@dataclass(frozen=True)
class ShardUrls:
    """The final locations of one shard's results."""

    tar: str
    manifest: str
    marker: str


def marker_stem(name: str) -> str | None:
    """The stem a file of `done/` or `failed/` records (its base name without `.json`), or None
    for a file that is no marker: another suffix, or a temporary file of an atomic write
    (`.{name}.json.tmp-...` ends otherwise). The one rule by which `run` and `status` count
    markers, so both see the same shards done."""
    base = name.rstrip("/").rsplit("/", 1)[-1]
    if not base.endswith(MARKER_SUFFIX) or len(base) == len(MARKER_SUFFIX):
        return None
    return base[: -len(MARKER_SUFFIX)]
