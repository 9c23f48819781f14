"""Job status from the output folder alone: done, failed and pending shards, sample counts,
error rows (from the manifests) and keys repeated across shards."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from pipeline.errors import PipelineError
from pipeline.layout import DONE, FAILED, MANIFESTS, folder_url, job_record_url, marker_stem
from pipeline.manifest import MANIFEST_SCHEMA
from pipeline.shards import expand_shards
from pipeline.spec import JobSpec, load_spec
from pipeline.storage import url_fs


@dataclass
class JobStatus:
    """Counts read from OUT/job.json, OUT/done/*.json and OUT/failed/*.json."""

    output: str
    storage_options: dict[str, Any] = field(default_factory=dict, repr=False)
    name: str = ""
    shards_total: int | None = None
    done: int = 0
    failed: dict[str, str] = field(default_factory=dict)
    samples: int = 0
    outputs_ok: int = 0
    outputs_error: int = 0
    errors_by_kind: dict[str, int] = field(default_factory=dict)
    """Error rows of done shards by `error_kind` ("unknown" for markers written before
    error kinds existed)."""
    keys_in_several_shards: int = 0
    """Keys that occur in more than one input shard (manifests of done shards)."""

    @property
    def pending(self) -> int | None:
        if self.shards_total is None:
            return None
        return self.shards_total - self.done - len(self.failed)


def job_status(target: str, storage_options: dict[str, Any] | None = None) -> JobStatus:
    """Status of a job given its output path/URL or its job file (YAML)."""
    spec: JobSpec | None = None
    if target.endswith((".yaml", ".yml")) and os.path.isfile(target):
        spec = load_spec(target)
        output, options = spec.output.path, dict(spec.output.storage_options)
    else:
        output, options = target, dict(storage_options or {})
    fs, path = url_fs(job_record_url(output), options)
    if not fs.exists(path):
        raise PipelineError(f"{output}: no job.json; not the output of an sdedit-batch job (yet)")
    record = json.loads(fs.cat_file(path))
    status = JobStatus(output=output, storage_options=options,
                       name=record.get("spec", {}).get("name", ""))
    for marker in _read_all(output, DONE, options):
        status.done += 1
        status.samples += int(marker.get("samples", 0))
        status.outputs_ok += int(marker.get("outputs_ok", 0))
        status.outputs_error += int(marker.get("outputs_error", 0))
        kinds = marker.get("errors_by_kind")
        if kinds is None and marker.get("outputs_error"):
            kinds = {"unknown": int(marker["outputs_error"])}
        for kind, count in (kinds or {}).items():
            status.errors_by_kind[kind] = status.errors_by_kind.get(kind, 0) + int(count)
    done_stems = {m for m in _stems(output, DONE, options)}
    for marker in _read_all(output, FAILED, options):
        if marker.get("stem") not in done_stems:
            status.failed[marker.get("input_shard", marker.get("stem", "?"))] = marker.get(
                "error", "")
    patterns = spec.input.shards if spec else record.get("spec", {}).get("input", {}).get("shards")
    if patterns:
        in_options = dict(spec.input.storage_options) if spec else {}
        try:
            status.shards_total = len(expand_shards(list(patterns), in_options))
        except PipelineError:
            status.shards_total = None
    status.keys_in_several_shards = keys_in_several_shards(output, options)
    return status


def read_manifests(output: str, storage_options: Mapping[str, Any] | None,
                   columns: list[str], where: pc.Expression | None = None) -> pa.Table:
    """`columns` of every manifest of a job's output (rows matching `where`), as one table.

    Read with MANIFEST_SCHEMA, so manifests written before a column existed read together
    with newer ones (that column null for their rows). No manifests: an empty table.
    """
    fs, path = url_fs(folder_url(output, MANIFESTS), storage_options)
    schema = pa.schema([MANIFEST_SCHEMA.field(name) for name in columns])
    if not fs.exists(path):
        return schema.empty_table()
    dataset = pads.dataset(path, filesystem=fs, format="parquet", schema=MANIFEST_SCHEMA)
    return dataset.to_table(columns=columns, filter=where)


def keys_in_several_shards(output: str, storage_options: Mapping[str, Any] | None = None
                           ) -> int:
    """How many keys occur in more than one input shard of the job (its manifests). Not an
    error (outputs are per shard), but joins on the key alone are ambiguous for them."""
    table = read_manifests(output, storage_options, ["key", "input_shard"])
    if table.num_rows == 0:
        return 0
    per_key = table.group_by("key").aggregate([("input_shard", "count_distinct")])
    return int(pc.sum(pc.greater(per_key["input_shard_count_distinct"], 1)).as_py() or 0)


def error_rows(output: str, storage_options: Mapping[str, Any] | None = None,
               limit: int = 20) -> tuple[list[dict[str, Any]], int]:
    """(up to `limit` error rows, how many there are) of the job's manifests, ordered by
    input shard then key; each row has key, output_key, input_shard, error_kind and error."""
    columns = ["key", "output_key", "input_shard", "error_kind", "error"]
    table = read_manifests(output, storage_options, columns, pc.field("status") == "error")
    table = table.sort_by([("input_shard", "ascending"), ("output_key", "ascending")])
    return table.slice(0, limit).to_pylist(), table.num_rows


def _stems(output: str, sub: str, options: dict[str, Any]) -> list[str]:
    fs, path = url_fs(folder_url(output, sub), options)
    if not fs.exists(path):
        return []
    return sorted(stem for stem in map(marker_stem, fs.ls(path, detail=False))
                  if stem is not None)


def _read_all(output: str, sub: str, options: dict[str, Any]) -> list[dict[str, Any]]:
    fs, path = url_fs(folder_url(output, sub), options)
    if not fs.exists(path):
        return []
    files = [p for p in fs.ls(path, detail=False) if marker_stem(p) is not None]
    return [json.loads(blob) for blob in fs.cat(files).values()] if files else []
