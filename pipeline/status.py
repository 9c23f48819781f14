"""Job status from the output folder alone: done, failed and pending shards, sample counts."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

from pipeline.errors import PipelineError
from pipeline.shards import expand_shards, shard_stem
from pipeline.spec import JobSpec, load_spec
from pipeline.storage import join, url_fs


@dataclass
class JobStatus:
    """Counts read from OUT/job.json, OUT/done/*.json and OUT/failed/*.json."""

    output: str
    name: str = ""
    shards_total: int | None = None
    done: int = 0
    failed: dict[str, str] = field(default_factory=dict)
    samples: int = 0
    outputs_ok: int = 0
    outputs_error: int = 0

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
    fs, path = url_fs(join(output, "job.json"), options)
    if not fs.exists(path):
        raise PipelineError(f"{output}: no job.json; not the output of an sdedit-batch job (yet)")
    record = json.loads(fs.cat_file(path))
    status = JobStatus(output=output, name=record.get("spec", {}).get("name", ""))
    for marker in _read_all(output, "done", options):
        status.done += 1
        status.samples += int(marker.get("samples", 0))
        status.outputs_ok += int(marker.get("outputs_ok", 0))
        status.outputs_error += int(marker.get("outputs_error", 0))
    done_stems = {m for m in _stems(output, "done", options)}
    for marker in _read_all(output, "failed", options):
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
    return status


def _stems(output: str, sub: str, options: dict[str, Any]) -> list[str]:
    fs, path = url_fs(join(output, sub), options)
    if not fs.exists(path):
        return []
    return sorted(shard_stem(p).removesuffix(".json") for p in fs.ls(path, detail=False)
                  if p.endswith(".json") and not os.path.basename(p).startswith("."))


def _read_all(output: str, sub: str, options: dict[str, Any]) -> list[dict[str, Any]]:
    fs, path = url_fs(join(output, sub), options)
    if not fs.exists(path):
        return []
    files = [p for p in fs.ls(path, detail=False)
             if p.endswith(".json") and not os.path.basename(p).startswith(".")]
    return [json.loads(blob) for blob in fs.cat(files).values()] if files else []
