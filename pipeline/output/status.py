"""Job status from the output folder alone: done, failed and pending shards, sample counts,
error rows by kind (all from the markers), error rows themselves and keys repeated across shards
(from the manifests).

Memory does not grow with the number of rows: the totals come from the done markers
(`MarkerTotals`, the same sum `run`'s summary makes), read a few hundred at a time by several
threads (`iter_markers`); the manifests are read only to list error rows (`status --errors`)
or to count repeated keys (`pipeline.output.keycount`: in passing up to `keycount.AUTO_ROWS` rows,
at any size with `status --repeated-keys`). Every storage failure is a `StorageError` naming
the location and the cause.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from pipeline.errors import PipelineError, StorageError
from pipeline.input.shards import expand_shards
from pipeline.job.spec import JobSpec, load_spec
from pipeline.output.folder import done_stems
from pipeline.output.jobrecord import read_job_record
from pipeline.output.keycount import AUTO_ROWS, count_repeated_keys
from pipeline.output.layout import DONE, FAILED, MANIFESTS, folder_url, marker_stem
from pipeline.output.manifest import MANIFEST_SCHEMA
from pipeline.redaction import redact_url
from pipeline.storage import describe_error, url_fs, with_retries

logger = logging.getLogger(__name__)

_CHUNK = 256
"""Markers read per thread task."""
_WORKERS = 16
"""Threads reading markers (local disks and object stores both gain from several reads)."""


@dataclass
class MarkerTotals:
    """Sums over done markers (or the stats of shards done by a run, which markers carry):
    the one place `run`'s summary and `status` add them up."""

    samples: int = 0
    outputs_ok: int = 0
    outputs_error: int = 0
    errors_by_kind: dict[str, int] = field(default_factory=dict)
    """Error rows by `error_kind` ("unknown" for markers written before error kinds
    existed)."""

    @property
    def rows(self) -> int:
        """Manifest rows (outputs ok and error)."""
        return self.outputs_ok + self.outputs_error

    def add(self, marker: Mapping[str, Any]) -> None:
        """Add one marker's counts."""
        self.samples += int(marker.get("samples", 0))
        self.outputs_ok += int(marker.get("outputs_ok", 0))
        self.outputs_error += int(marker.get("outputs_error", 0))
        kinds = marker.get("errors_by_kind")
        if kinds is None and marker.get("outputs_error"):
            kinds = {"unknown": int(marker["outputs_error"])}
        for kind, count in (kinds or {}).items():
            self.errors_by_kind[kind] = self.errors_by_kind.get(kind, 0) + int(count)


@dataclass(kw_only=True)
class JobStatus(MarkerTotals):
    """Counts read from OUT/job.json, OUT/done/*.json and OUT/failed/*.json."""

    output: str
    storage_options: dict[str, Any] = field(default_factory=dict, repr=False)
    name: str = ""
    shards_total: int | None = None
    done: int = 0
    failed: dict[str, str] = field(default_factory=dict)
    unreadable: int = 0
    """Done markers whose content is not a JSON object (done, counts unknown)."""
    keys_in_several_shards: int | None = None
    """Keys that occur in more than one input shard (manifests of done shards); None: not
    counted (more than `keycount.AUTO_ROWS` rows and not asked for)."""

    @property
    def pending(self) -> int | None:
        if self.shards_total is None:
            return None
        return self.shards_total - self.done - len(self.failed)


def job_status(target: str, storage_options: dict[str, Any] | None = None,
               repeated_keys: bool | None = None) -> JobStatus:
    """Status of a job given its output path/URL or its job file (YAML).

    Args:
        repeated_keys: count keys repeated across shards: None = when the job holds at most
            `keycount.AUTO_ROWS` rows, True = always (reads every manifest's keys), False =
            never.
    Raises:
        PipelineError: no job.json at `target`'s output; StorageError: it cannot be read.
    """
    spec: JobSpec | None = None
    if target.endswith((".yaml", ".yml")) and os.path.isfile(target):
        spec = load_spec(target)
        output, options = spec.output.path, dict(spec.output.storage_options)
    else:
        output, options = target, dict(storage_options or {})
    record = read_job_record(output, options)
    if record is None:
        raise PipelineError(f"{output}: no job.json; not the output of an sdedit-batch job "
                            "(yet)")
    status = JobStatus(output=output, storage_options=options,
                       name=record.get("spec", {}).get("name", ""))
    stems: list[str] = []
    for stem, marker in iter_markers(output, DONE, options):
        status.done += 1
        stems.append(stem)
        if marker is None:
            status.unreadable += 1
        else:
            status.add(marker)
    done = set(stems)
    for stem, marker in iter_markers(output, FAILED, options):
        if stem not in done:
            marker = marker or {}
            status.failed[marker.get("input_shard", stem)] = marker.get("error", "")
    patterns = spec.input.shards if spec else record.get("spec", {}).get("input", {}).get("shards")
    if patterns:
        in_options = dict(spec.input.storage_options) if spec else {}
        try:
            status.shards_total = len(expand_shards(list(patterns), in_options))
        except PipelineError:
            status.shards_total = None
    if repeated_keys or (repeated_keys is None and status.rows <= AUTO_ROWS):
        status.keys_in_several_shards = count_repeated_keys(output, options, stems,
                                                            rows=status.rows)
    return status


def iter_markers(output: str, folder: str, options: Mapping[str, Any]
                 ) -> Iterator[tuple[str, dict[str, Any] | None]]:
    """(stem, content) of every marker of `folder` (`done` or `failed`), read `_CHUNK` at a
    time by `_WORKERS` threads; content None when it is not a JSON object.

    Raises:
        StorageError: the folder cannot be listed or a marker cannot be read.
    """
    url = folder_url(output, folder)
    try:
        fs, path = url_fs(url, options)
        fs.invalidate_cache(path)
        names = fs.ls(path, detail=False)
        fs.invalidate_cache(path)  # a listing of 100,000 entries is not kept
    except FileNotFoundError:
        return
    except Exception as exc:
        raise StorageError(f"cannot list {redact_url(url)}: {describe_error(exc)}") from exc
    files = [(stem, name) for name in names if (stem := marker_stem(name)) is not None]

    def read(chunk: list[tuple[str, str]]) -> list[tuple[str, dict[str, Any] | None]]:
        try:
            found = with_retries(lambda: fs.cat([name for _, name in chunk], on_error="return"),
                                 what="read markers", url=url)
        except Exception as exc:
            raise StorageError(f"cannot read markers in {redact_url(url)}: "
                               f"{describe_error(exc)}") from exc
        out = []
        for stem, name in chunk:
            blob = found.get(name)
            if isinstance(blob, FileNotFoundError):
                continue  # removed since the listing
            if isinstance(blob, BaseException) or blob is None:
                raise StorageError(f"cannot read {redact_url(name)}: "
                                   f"{describe_error(blob or OSError('no data'))}")
            out.append((stem, _parse(blob)))
        return out

    chunks = [files[i:i + _CHUNK] for i in range(0, len(files), _CHUNK)]
    with ThreadPoolExecutor(_WORKERS) as pool:
        for start in range(0, len(chunks), _WORKERS):  # at most _WORKERS chunks in memory
            for result in pool.map(read, chunks[start:start + _WORKERS]):
                yield from result


def _parse(blob: bytes) -> dict[str, Any] | None:
    try:
        data = json.loads(blob)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def bounded_repeated_keys(output: str, storage_options: Mapping[str, Any] | None) -> int | None:
    """Keys repeated across the job's done shards, counted only while the manifests hold at
    most `keycount.AUTO_ROWS` rows (else None: `status --repeated-keys` counts them); None too
    when they cannot be read (a summary figure never fails a run that succeeded)."""
    try:
        stems = sorted(done_stems(output, storage_options))
        return count_repeated_keys(output, storage_options, stems, limit=AUTO_ROWS)
    except Exception as exc:
        logger.warning("cannot count keys repeated across shards: %s", describe_error(exc))
        return None


def read_manifests(output: str, storage_options: Mapping[str, Any] | None,
                   columns: list[str], where: pc.Expression | None = None) -> pa.Table:
    """`columns` of every manifest of a job's output (rows matching `where`), as one table.

    Read with MANIFEST_SCHEMA, so manifests written before a column existed read together
    with newer ones (that column null for their rows). No manifests: an empty table.
    """
    url = folder_url(output, MANIFESTS)
    fs, path = url_fs(url, storage_options)
    schema = pa.schema([MANIFEST_SCHEMA.field(name) for name in columns])
    try:
        if not fs.exists(path):
            return schema.empty_table()
        dataset = pads.dataset(path, filesystem=fs, format="parquet", schema=MANIFEST_SCHEMA)
        return dataset.to_table(columns=columns, filter=where)
    except Exception as exc:
        raise StorageError(f"cannot read the manifests in {redact_url(url)}: "
                           f"{describe_error(exc)}") from exc


def error_rows(output: str, storage_options: Mapping[str, Any] | None = None,
               limit: int = 20) -> tuple[list[dict[str, Any]], int]:
    """(up to `limit` error rows, how many there are) of the job's manifests, ordered by
    input shard then key; each row has key, output_key, input_shard, error_kind and error."""
    columns = ["key", "output_key", "input_shard", "error_kind", "error"]
    table = read_manifests(output, storage_options, columns, pc.field("status") == "error")
    table = table.sort_by([("input_shard", "ascending"), ("output_key", "ascending")])
    return table.slice(0, limit).to_pylist(), table.num_rows
