"""OUT/job.json: what a job is (resolved spec, fingerprint, versions) and what it ran with.

`prepare_output` refuses a resume whose output-affecting settings changed (unless `--overwrite`)
and writes job.json before any model work; `record_compute` adds the resolved compute values once
the actors' settings are known, warning when a resume changes one. See docs/outputs.md, "resume"."""

from __future__ import annotations

import importlib.metadata
import logging
from typing import Any

import torch

from pipeline import __version__
from pipeline.errors import ResumeConflictError
from pipeline.job.spec import JobSpec
from pipeline.output.folder import OutputFolder
from pipeline.output.recordcheck import RECORD_VERSION
from sdedit import dtype_name, quoted, resolve_dtype

logger = logging.getLogger(__name__)

__all__ = ["job_record", "prepare_output", "record_compute", "resolved_compute",
           "resumable_record", "resume_conflict"]


def resumable_record(spec: JobSpec, overwrite: bool) -> dict[str, Any] | None:
    """The output's job.json when this run resumes it (None: none, refused, or discarded by
    `--overwrite`), which decides what `auto` weights mean."""
    try:
        old = OutputFolder.of(spec).read_record()
    except Exception:  # prepare_output reports it
        return None
    return old if resume_conflict(spec, old) is None else None


def prepare_output(spec: JobSpec, overwrite: bool,
                   precision: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """Refuse an unwritable output or a changed spec, then write OUT/job.json (with `precision`
    when given) before any model work; `validate` makes the same checks.

    Returns the job.json found there before (None if none or discarded); its `compute` section is
    kept until `record_compute` replaces it."""
    folder = OutputFolder.of(spec)
    folder.check_writable()
    try:
        old = folder.read_record()
        conflict = resume_conflict(spec, old)
    except ResumeConflictError as exc:  # a job.json that is not a job record
        old, conflict = None, str(exc)
    if conflict is not None:
        if not overwrite:
            raise ResumeConflictError(conflict)
        folder.discard_results()
        old = None
    record = job_record(spec, precision=precision)
    if old is not None and "compute" in old:
        record["compute"] = old["compute"]
    folder.write_record(record)
    return old


def resume_conflict(spec: JobSpec, old: dict[str, Any] | None) -> str | None:
    """Why `spec` cannot resume the job recorded in `old` (naming each changed setting), or None."""
    if old is None or old.get("fingerprint") == spec.fingerprint():
        return None
    changed = _changed_fields(old.get("output_affecting", {}), spec.output_affecting())
    return (f"output {spec.output.path} holds a job with different output-affecting settings "
            f"({', '.join(changed) or 'fingerprint'}); use a new output.path, or --overwrite "
            "to discard its results")


def job_record(spec: JobSpec, compute: dict[str, Any] | None = None,
               precision: dict[str, Any] | None = None) -> dict[str, Any]:
    """OUT/job.json: the resolved spec (secrets redacted), its fingerprint, versions, the
    weights' precision and, once known, the resolved `compute` values."""
    import diffusers

    record = {"record_version": RECORD_VERSION, "spec": spec.to_dict(),
              "fingerprint": spec.fingerprint(),
              "output_affecting": spec.output_affecting(),
              "versions": {"sdedit-batch": __version__, "torch": torch.__version__,
                           "diffusers": diffusers.__version__,
                           "ray": importlib.metadata.version("ray")},
              "model": spec.model.source}
    if precision is not None:
        record["precision"] = precision
    if compute is not None:
        record["compute"] = compute
    return record


def resolved_compute(spec: JobSpec, use_gpu: bool, threads: int,
                     weights: str | None = None) -> dict[str, Any]:
    """The compute values outputs depend on through rounding: device type, compute dtype (the
    weights' own when low-precision), torch threads per actor and batch size."""
    device = "cuda" if use_gpu else "cpu"
    name = dtype_name(resolve_dtype(spec.compute.dtype, torch.device(device)))
    if weights in ("bf16", "fp16", "fp8"):
        name = "fp16" if weights == "fp16" else "bf16"
    return {"device": device, "dtype": name, "threads": threads,
            "batch_size": spec.compute.batch_size}


def record_compute(spec: JobSpec, compute: dict[str, Any], previous: dict[str, Any] | None,
                   shards_done: int, precision: dict[str, Any] | None = None) -> list[str]:
    """Write the resolved compute values into OUT/job.json and warn when shards are already done
    with other values; returns the changes as "name old -> new"."""
    before = (previous or {}).get("compute") or {}
    changes = [f"{name} {before[name]} -> {value}" for name, value in compute.items()
               if name in before and before[name] != value] if shards_done else []
    if changes:
        logger.warning(
            "resuming with compute settings that differ from those of the %d shard(s) already "
            "done (%s): byte-identical outputs need the same batch size, device, dtype and "
            "threads; other values give outputs that differ in rounding (a few levels; a dtype "
            "change more), see docs/outputs.md", shards_done, ", ".join(changes))
    OutputFolder.of(spec).write_record(job_record(spec, compute, precision))
    return changes


def _changed_fields(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    changed = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changed += _changed_fields(a, b, f"{prefix}{key}.")
        elif a != b:
            changed.append(f"{prefix}{key}: {quoted(a)} -> {quoted(b)}")
    return changed
