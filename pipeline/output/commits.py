"""Whether committed shards are whole: what a marker records of its files against the output.

`damage` compares sizes with one listing per folder (`status`); `run`'s plan reads a marker only
where the listing cannot vouch for its shard, so it makes no request per shard; `digest_damage`
reads the files through (`status --verify`). See docs/outputs.md, "committed shards verified"."""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import time
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.output.layout import MANIFESTS, SHARDS
from pipeline.storage import FileSystem, describe_error, stale_temp

__all__ = ["Listing", "Plan", "damage", "digest_damage", "modified", "recorded",
           "remove_stale_temps", "sizes_by_stem", "unsure"]

_READ = 1 << 20
"""Bytes read at a time when a tar is read through."""


@dataclass
class Plan:
    """What is left to do of a job's input shards, in input order."""

    pending: list[str] = field(default_factory=list)
    """Input shards to process: no commit marker, or a damaged commit."""
    done: list[str] = field(default_factory=list)
    """Input shards committed whole (their tar and manifest listed at the recorded sizes)."""
    damaged: dict[str, str] = field(default_factory=dict)
    """Input shard -> what is wrong with its commit (also in `pending`)."""
    markers_read: int = 0
    """Done markers read to compare sizes (those the listings could not vouch for)."""


@dataclass
class Listing:
    """The tars and manifests an output holds, by stem: (size, modification time or None)."""

    tars: dict[str, tuple[int, float | None]] = field(default_factory=dict)
    manifests: dict[str, tuple[int, float | None]] = field(default_factory=dict)


def recorded(marker: Mapping[str, Any] | None) -> dict[str, dict[str, Any]] | None:
    """A marker's `files` record, or None when it has none of that shape."""
    files = (marker or {}).get("files")
    if not isinstance(files, Mapping):
        return None
    out = {}
    for name, digest in (("tar", "crc32"), ("manifest", "sha256")):
        entry = files.get(name)
        if not (isinstance(entry, Mapping) and type(entry.get("bytes")) is int
                and isinstance(entry.get(digest), str)):
            return None
        out[name] = dict(entry)
    return out


def damage(stem: str, marker: Mapping[str, Any] | None, listing: Listing) -> str | None:
    """What is wrong with committed shard `stem` by the listing (None: nothing): a tar or
    manifest missing, or of another size than recorded (empty, when the marker records none)."""
    files = recorded(marker)
    problems = []
    for name, path, entries in (("tar", f"{SHARDS}/{stem}.tar", listing.tars),
                                ("manifest", f"{MANIFESTS}/{stem}.parquet", listing.manifests)):
        size = entries[stem][0] if stem in entries else None
        expected = files[name]["bytes"] if files else None
        if size is None:
            problems.append(f"{path} is missing")
        elif expected is not None and size != expected:
            problems.append(f"{path} has {size:,} bytes, its commit marker records {expected:,}")
        elif expected is None and size == 0:
            problems.append(f"{path} is empty")
    return "; ".join(problems) or None


def unsure(stem: str, marker_time: float | None, listing: Listing) -> bool:
    """Whether the listing alone cannot vouch for shard `stem`: its tar or manifest was modified
    after its marker (at `marker_time`), or a time is unknown; its marker is then read."""
    for entries in (listing.tars, listing.manifests):
        time_ = entries[stem][1] if stem in entries else None
        if time_ is None or marker_time is None or time_ > marker_time:
            return True
    return False


def modified(entry: Mapping[str, Any]) -> float | None:
    """The modification time (UNIX seconds) of an fsspec listing entry, or None."""
    for key in ("mtime", "LastModified", "updated", "created"):
        value = entry.get(key)
        if isinstance(value, dt.datetime):
            return value.timestamp()
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and value:
            try:
                return dt.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
            except ValueError:
                return None
    return None


def digest_damage(fs: FileSystem, tar: str, manifest: str,
                  marker: Mapping[str, Any] | None) -> str | None:
    """What is wrong with a committed shard read through: a digest other than recorded, or a
    manifest that is not Parquet. None: nothing."""
    files = recorded(marker)
    problems = []
    try:
        crc = 0
        with fs.open(tar, "rb") as handle:
            while chunk := handle.read(_READ):
                crc = zlib.crc32(chunk, crc)
        if files and f"{crc:08x}" != files["tar"]["crc32"]:
            problems.append(f"{SHARDS}/{tar.rsplit('/', 1)[-1]}: CRC-32 {crc:08x}, its commit "
                            f"marker records {files['tar']['crc32']}")
    except Exception as exc:
        problems.append(f"{SHARDS}/{tar.rsplit('/', 1)[-1]} cannot be read: "
                        f"{describe_error(exc)}")
    name = f"{MANIFESTS}/{manifest.rsplit('/', 1)[-1]}"
    try:
        data = fs.cat_file(manifest)
        if files and hashlib.sha256(data).hexdigest() != files["manifest"]["sha256"]:
            problems.append(f"{name}: sha256 differs from what its commit marker records")
        else:
            pq.read_metadata(pa.BufferReader(data))
    except Exception as exc:
        problems.append(f"{name} cannot be read: {describe_error(exc)}")
    return "; ".join(problems) or None


def sizes_by_stem(entries: Iterable[Mapping[str, Any]], suffix: str
                  ) -> dict[str, tuple[int, float | None]]:
    """stem -> (size, modification time) of each `{stem}{suffix}` listed, temporaries left out."""
    sizes = {}
    for entry in entries:
        base = entry["name"].rstrip("/").rsplit("/", 1)[-1]
        if base.endswith(suffix) and len(base) > len(suffix) and \
                entry.get("type", "file") == "file":
            sizes[base[: -len(suffix)]] = (int(entry.get("size") or 0), modified(entry))
    return sizes


def remove_stale_temps(root: str, folders: Iterable[str], max_age_s: float) -> int:
    """Remove the temporary files in local folder `root` and its `folders` whose writer is gone
    (`pipeline.storage.stale_temp`), never a live writer's; returns how many."""
    now, removed = time.time(), 0
    for sub in ("", *folders):
        try:
            entries = list(os.scandir(os.path.join(root, sub)))
        except OSError:
            continue
        for entry in entries:
            try:
                if entry.is_file() and stale_temp(entry.name, now - entry.stat().st_mtime,
                                                  max_age_s):
                    os.unlink(entry.path)
                    removed += 1
            except OSError:
                continue  # gone since: nothing to do
    return removed
