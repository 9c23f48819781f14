"""The names of what an output folder holds; `OutputFolder` builds their URLs and does every read
and write. `stem` is the input shard's name without folders and tar suffix. The folder is
described in docs/outputs.md."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DONE", "FAILED", "JOB_RECORD", "LEASE", "MANIFESTS", "MARKER_SUFFIX", "RESULT_FOLDERS",
           "SCORES", "SCORE_SETTINGS", "SHARDS", "ShardUrls", "marker_stem"]

JOB_RECORD = "job.json"
"""What the job is (resolved spec, fingerprint, versions, resolved compute values)."""
LEASE = "lease.json"
"""The run writing here now (removed at its end)."""
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
"""Per-row score sidecars, `{stem}.parquet`, one row per manifest row."""
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
    """The stem a file of `done/` or `failed/` records, or None for another suffix or a temporary
    file: the one rule by which `run` and `status` count markers."""
    base = name.rstrip("/").rsplit("/", 1)[-1]
    if not base.endswith(MARKER_SUFFIX) or len(base) == len(MARKER_SUFFIX):
        return None
    return base[: -len(MARKER_SUFFIX)]
