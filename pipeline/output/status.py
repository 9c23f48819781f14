"""Job status from the output folder alone: shards done, failed and pending, counts, damaged
commits, the writing run, error rows and repeated keys. Totals come from the markers, so memory
does not grow with the rows. See docs/outputs.md, "status"."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pyarrow.compute as pc

from pipeline.errors import PipelineError, count
from pipeline.input.shards import expand_shards
from pipeline.job.load import load_spec
from pipeline.job.spec import JobSpec
from pipeline.output.commits import damage, digest_damage, recorded
from pipeline.output.folder import OutputFolder
from pipeline.output.keycount import AUTO_ROWS, count_repeated_keys
from pipeline.output.layout import DONE, FAILED
from pipeline.output.lease import LeaseState
from pipeline.storage import describe_error, url_fs

logger = logging.getLogger(__name__)

SHOWN_WARNINGS = 10
"""Warning kinds `run`'s summary and `status` show (the markers hold every kind)."""
_WORKERS = 8
"""Committed shards read through at once (`status --verify`)."""


@dataclass
class MarkerTotals:
    """Sums over done markers: the one place `run`'s summary and `status` add them up."""

    samples: int = 0
    outputs_ok: int = 0
    outputs_error: int = 0
    errors_by_kind: dict[str, int] = field(default_factory=dict)
    """Error rows by `error_kind` ("unknown" for markers without kinds)."""
    row_warnings: dict[str, int] = field(default_factory=dict)
    """Manifest rows by warning kind (`pipeline.worker.notices`)."""
    actor_warnings: dict[str, int] = field(default_factory=dict)
    """Python warnings the actors showed, by kind."""

    @property
    def rows(self) -> int:
        """Manifest rows (outputs ok and error)."""
        return self.outputs_ok + self.outputs_error

    def warnings_text(self, limit: int = SHOWN_WARNINGS) -> str:
        """The warnings by kind, row warnings first, most first, at most `limit` kinds."""
        items = [f"{count(n, noun)}: {kind}" for counts, noun in (
            (self.row_warnings, "row"), (self.actor_warnings, "time"))
            for kind, n in sorted(counts.items(), key=lambda item: (-item[1], item[0]))]
        shown = items[:limit]
        if len(items) > limit:
            shown.append(f"{len(items) - limit} more kinds (OUT/done/*.json: row_warnings, "
                         "actor_warnings)")
        return "; ".join(shown) or "none"

    def add(self, marker: Mapping[str, Any]) -> None:
        """Add one marker's counts."""
        self.samples += int(marker.get("samples", 0))
        self.outputs_ok += int(marker.get("outputs_ok", 0))
        self.outputs_error += int(marker.get("outputs_error", 0))
        kinds = marker.get("errors_by_kind")
        if kinds is None and marker.get("outputs_error"):
            kinds = {"unknown": int(marker["outputs_error"])}
        for kind, n in (kinds or {}).items():
            self.errors_by_kind[kind] = self.errors_by_kind.get(kind, 0) + int(n)
        for name in ("row_warnings", "actor_warnings"):
            counts, found = getattr(self, name), marker.get(name)
            for kind, n in (found.items() if isinstance(found, Mapping) else ()):
                counts[kind] = counts.get(kind, 0) + int(n)


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
    damaged: dict[str, str] = field(default_factory=dict)
    """Committed shards with files missing, of other sizes or unreadable: stem -> what is wrong."""
    unrecorded: int = 0
    """Done markers that record no sizes (only the presence of their files is checked)."""
    verified: bool = False
    """Whether every committed shard was read through (`job_status(verify=True)`)."""
    lease: LeaseState | None = None
    """The lease of the output (None: no run holds it)."""
    keys_in_several_shards: int | None = None
    """Keys in more than one input shard; None: not counted (too many rows, not asked for)."""

    @property
    def pending(self) -> int | None:
        if self.shards_total is None:
            return None
        return self.shards_total - self.done - len(self.failed)


def job_status(target: str, storage_options: dict[str, Any] | None = None,
               repeated_keys: bool | None = None, verify: bool = False) -> JobStatus:
    """Status of a job from its output path / URL or its job file (YAML).

    `repeated_keys`: None = count them up to `keycount.AUTO_ROWS` rows, True = always, False =
    never. `verify`: read every committed tar and manifest through against their digests (else
    sizes are checked by listing). PipelineError when there is no job.json, StorageError when
    unreadable."""
    spec: JobSpec | None = None
    if target.endswith((".yaml", ".yml")) and os.path.isfile(target):
        spec = load_spec(target)
        output, options = spec.output.path, dict(spec.output.storage_options)
    else:
        output, options = target, dict(storage_options or {})
    folder = OutputFolder(output, options)
    record = folder.read_record()
    if record is None:
        raise PipelineError(f"{output}: no job.json; not the output of an sdedit-batch job "
                            "(yet)")
    status = JobStatus(output=output, storage_options=options,
                       name=record.get("spec", {}).get("name", ""), verified=verify)
    status.lease = folder.lease_state()
    done: dict[str, dict[str, Any] | None] = {}
    for stem, marker in folder.markers(DONE):  # before the listing: files precede markers
        done[stem] = marker
        if marker is None:
            status.unreadable += 1
        else:
            status.add(marker)
        status.unrecorded += recorded(marker) is None
    status.done = len(done)
    listing = folder.listing()
    for stem, marker in done.items():
        problem = damage(stem, marker, listing)
        if problem is not None:
            status.damaged[stem] = problem
    if verify:
        status.damaged.update(_verify(folder, {s: m for s, m in done.items()
                                               if s not in status.damaged}))
    for stem, marker in folder.markers(FAILED):
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
        whole = [stem for stem in done if stem not in status.damaged]
        status.keys_in_several_shards = count_repeated_keys(
            folder, whole, rows=status.rows, on_unreadable=status.damaged.__setitem__)
    return status


def _verify(folder: OutputFolder, markers: dict[str, dict[str, Any] | None]
            ) -> dict[str, str]:
    """stem -> what is wrong, for committed shards whose files do not match their digests."""
    fs, _ = url_fs(folder.path, folder.options)

    def check(stem: str) -> tuple[str, str | None]:
        urls = folder.shard_urls(stem)
        return stem, digest_damage(fs, url_fs(urls.tar, folder.options)[1],
                                   url_fs(urls.manifest, folder.options)[1], markers[stem])

    with ThreadPoolExecutor(_WORKERS) as pool:
        return {stem: why for stem, why in pool.map(check, sorted(markers)) if why}


def bounded_repeated_keys(folder: OutputFolder) -> int | None:
    """Keys repeated across the done shards, counted up to `keycount.AUTO_ROWS` rows; None above
    that or when unreadable (a summary figure never fails a run that succeeded)."""
    try:
        return count_repeated_keys(folder, sorted(folder.done_stems()), limit=AUTO_ROWS)
    except Exception as exc:
        logger.warning("cannot count keys repeated across shards: %s", describe_error(exc))
        return None


def error_rows(output: str, storage_options: Mapping[str, Any] | None = None,
               limit: int = 20) -> tuple[list[dict[str, Any]], int, dict[str, str]]:
    """(up to `limit` error rows ordered by shard then key, how many there are, unreadable
    manifests: name -> why); each row has key, output_key, input_shard, error_kind and error."""
    columns = ["key", "output_key", "input_shard", "error_kind", "error"]
    table, unreadable = OutputFolder(output, storage_options).read_manifests(
        columns, pc.field("status") == "error")
    table = table.sort_by([("input_shard", "ascending"), ("output_key", "ascending")])
    return table.slice(0, limit).to_pylist(), table.num_rows, unreadable
