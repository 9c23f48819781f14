"""The shape of OUT/job.json, checked before any command reads it.

`record_problems` checks every key this code reads against `SCHEMA`; other recorded settings may
hold any JSON value (the fingerprint decides a resume). A record of a newer version of this code
is named as such. Messages name keys and types, never values (a value may be megabytes long)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from pipeline.errors import ResumeConflictError
from pipeline.job.spec import FINGERPRINT_VERSION

__all__ = ["RECORD_VERSION", "SCHEMA", "newer_version", "parse_record", "record_problems"]

RECORD_VERSION = 1
"""The shape of job.json this code writes (`record_version`; a record without it is 1)."""

Schema = type | tuple[type, ...] | list | dict
SCHEMA: dict[str, Schema] = {
    "record_version?": int,
    "spec": {"name?": str, "model?": {"source?": str}, "input?": {"shards?": [str]},
             "output?": {"path?": str}, "sdedit?": {}, "compute?": {}},
    "fingerprint": str,
    "output_affecting": {"fingerprint_version": int},
    "versions?": {},
    "model?": str,
    "compute?": {"device?": str, "dtype?": str, "threads?": int, "batch_size?": int},
    "precision?": {},
}
"""Keys of a job record (a trailing "?": may be absent) and their JSON types: a type, a one-item
list (a list of that), or a dict (an object with these keys, others allowed)."""

_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false",
          list: "a list", dict: "an object", type(None): "null"}


def parse_record(data: bytes, where: str) -> dict[str, Any]:
    """The job record in `data` (job.json's bytes; `where` names it in messages);
    ResumeConflictError when it is not JSON, not of the record's shape, or of a newer version."""
    try:
        record = json.loads(data)
    except ValueError as exc:
        raise ResumeConflictError(f"{where} cannot be read as a job record ({exc}); use a new "
                                  "output.path, or --overwrite to discard its results") from exc
    newer = newer_version(record) if isinstance(record, dict) else None
    if newer is not None:
        raise ResumeConflictError(f"{where}: {newer}; upgrade sdedit-batch to resume it, use a "
                                  "new output.path, or --overwrite to discard its results")
    problems = record_problems(record)
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more"
                                           if len(problems) > 5 else "")
        raise ResumeConflictError(f"{where} cannot be read as a job record ({shown}); use a new "
                                  "output.path, or --overwrite to discard its results")
    return record


def record_problems(record: Any) -> list[str]:
    """One line per key of `record` missing or of another type ("spec.input: a string, ...")."""
    problems: list[str] = []
    _check(record, SCHEMA, "", problems)
    return problems


def newer_version(record: Mapping[str, Any]) -> str | None:
    """Why `record` was written by a newer version than this one (naming the versions), or None."""
    writer = (record.get("versions") or {}).get("sdedit-batch")
    by = f" (sdedit-batch {writer})" if isinstance(writer, str) else ""
    version = record.get("record_version", 1)
    if isinstance(version, int) and version > RECORD_VERSION:
        return (f"it was written by a newer version{by}: record version {version}, this "
                f"version reads up to {RECORD_VERSION}")
    fingerprint = (record.get("output_affecting") or {}).get("fingerprint_version")
    if isinstance(fingerprint, int) and fingerprint > FINGERPRINT_VERSION:
        return (f"it was written by a newer version{by}: fingerprint version {fingerprint}, "
                f"this version knows up to {FINGERPRINT_VERSION}")
    return None


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return _NAMES[bool]
    if isinstance(value, float):
        return _NAMES[float]
    return _NAMES.get(type(value), type(value).__name__)


def _fits(value: Any, expected: type | tuple[type, ...]) -> bool:
    types = expected if isinstance(expected, tuple) else (expected,)
    if isinstance(value, bool):
        return bool in types
    return isinstance(value, types)


def _check(value: Any, schema: Schema, where: str, problems: list[str]) -> None:
    name = where or "job.json"
    if isinstance(schema, dict):
        if not isinstance(value, Mapping):
            problems.append(f"{name}: {_kind(value)}, expected an object")
            return
        for key, sub in schema.items():
            optional = key.endswith("?")
            key = key.rstrip("?")
            path = f"{where}.{key}" if where else key
            if key not in value:
                if not optional:
                    problems.append(f"{path}: missing")
                continue
            _check(value[key], sub, path, problems)
    elif isinstance(schema, list):
        if not isinstance(value, list):
            problems.append(f"{name}: {_kind(value)}, expected a list")
            return
        for i, item in enumerate(value):
            before = len(problems)
            _check(item, schema[0], f"{name}[{i}]", problems)
            if len(problems) > before:
                return  # one bad item names the list's problem
    elif not _fits(value, schema):
        expected = schema if isinstance(schema, tuple) else (schema,)
        problems.append(f"{name}: {_kind(value)}, expected "
                        f"{' or '.join(_NAMES[t] for t in expected)}")
