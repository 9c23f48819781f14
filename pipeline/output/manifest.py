"""The manifest: its schema, its error kinds and the one function that builds a row.

Each shard has one Parquet manifest with one row per input sample x output index, errors
included. `manifest_row` refuses a row that does not fit the schema, so a misspelt column never
becomes a silent null; columns are only ever appended, so older manifests read with newer ones.
The columns and kinds are documented in docs/outputs.md."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

__all__ = ["COLUMNS", "ERROR_KINDS", "MANIFEST_SCHEMA", "ManifestRowError", "manifest_bytes",
           "manifest_row"]

ERROR_KINDS: dict[str, str] = {
    "key": "the key cannot name an output (contains '/', '\\' or '..', starts with '.', holds "
           "control characters or bytes that are not UTF-8)",
    "missing": "the guide member, or the mask member the job names, is absent",
    "duplicate": "the key was already seen in this shard (only its first occurrence is used)",
    "member": "a member that cannot be part of a sample: a link, device or FIFO, an extension "
              "that cannot be written back (empty parts, a leading '_'), or a name that gives "
              "no key (its own row, keyed by the member's name)",
    "decode": "the image or mask cannot be decoded, or its mode cannot be converted faithfully",
    "size": "over input.max_pixels (read from the header), a size the model cannot take, or a "
            "member over the member limit (never read)",
    "mask": "the mask is not black and white within the tolerance, is transparent, or its "
            "size differs from the guide's",
    "setting": "a per-row setting in {key}.json / {key}.txt cannot be used (t0 out of range or "
               "below what sdedit.steps allows, a prompt that is not a string, a json that "
               "cannot be read or is no object, a misspelt setting)",
    "device": "the sample ran out of device memory even alone (batches are split first)",
    "edit": "the SDEdit engine refused the sample's inputs (sdedit.EditInputError)",
    "encode": "the output cannot be encoded as output.image_format (e.g. a size WebP cannot "
              "hold)",
}
"""The fixed list of manifest `error_kind` values (null for ok rows), with what each means."""

MANIFEST_SCHEMA = pa.schema([
    ("key", pa.string()), ("output_key", pa.string()), ("sample_index", pa.int32()),
    ("input_shard", pa.string()), ("output_shard", pa.string()), ("status", pa.string()),
    ("error", pa.string()), ("seed", pa.int64()), ("t0", pa.float64()),
    ("sampler", pa.string()), ("steps", pa.int32()), ("repeats", pa.int32()),
    ("model", pa.string()), ("width", pa.int32()), ("height", pa.int32()),
    ("faithfulness_l2", pa.float64()), ("seconds", pa.float64()), ("worker", pa.string()),
    ("created_at", pa.timestamp("us", tz="UTC")),
    # appended columns (never inserted: older manifests read together with newer ones, the
    # columns they lack null for their rows)
    ("eta", pa.float64()), ("dtype", pa.string()), ("batch_size", pa.int32()),
    ("model_identity", pa.string()), ("error_kind", pa.string()),
    # per-row settings of text-conditioned models (null for pixel models)
    ("prompt", pa.string()), ("negative_prompt", pa.string()), ("guidance_scale", pa.float64()),
    # what the text encoders did not take of the prompts (null: whole)
    ("prompt_truncated", pa.string()), ("negative_prompt_truncated", pa.string()),
])
"""One row per input sample x output index; `input_shard`, `output_shard` and `model` are
absolute, without credentials."""

COLUMNS: tuple[str, ...] = tuple(MANIFEST_SCHEMA.names)
"""The manifest's column names, in order."""

_COLUMN_SET = frozenset(COLUMNS)


class ManifestRowError(ValueError):
    """A manifest row that does not fit the schema: a bug of its builder, never of the input."""


def manifest_row(**columns: Any) -> dict[str, Any]:
    """One manifest row in column order: every column of `MANIFEST_SCHEMA` given (None for null).

    Raises:
        ManifestRowError: a column missing or unknown; a status not "ok" / "error"; an ok row
            with an error; an error row without a message or with a kind not in `ERROR_KINDS`.
    """
    given = columns.keys()
    if given != _COLUMN_SET:
        missing = [name for name in COLUMNS if name not in given]
        unknown = sorted(given - _COLUMN_SET)
        parts = ([f"missing {', '.join(missing)}"] if missing else []) + \
            ([f"unknown {', '.join(unknown)}"] if unknown else [])
        raise ManifestRowError(f"manifest row of key {columns.get('key')!r}: "
                               f"{'; '.join(parts)}; allowed: exactly the columns of "
                               "pipeline.output.manifest.MANIFEST_SCHEMA")
    status, kind, error = columns["status"], columns["error_kind"], columns["error"]
    if status == "ok":
        if kind is not None or error is not None:
            raise ManifestRowError(f"manifest row of key {columns['key']!r}: status 'ok' with "
                                   f"error_kind {kind!r} and error {error!r}; allowed: both "
                                   "None on an ok row")
    elif status == "error":
        if kind not in ERROR_KINDS:
            raise ManifestRowError(f"manifest row of key {columns['key']!r}: error_kind "
                                   f"{kind!r} is not one of {', '.join(ERROR_KINDS)}")
        if not error:
            raise ManifestRowError(f"manifest row of key {columns['key']!r}: an error row "
                                   "without a message; allowed: a message naming the problem")
    else:
        raise ManifestRowError(f"manifest row of key {columns['key']!r}: status {status!r}; "
                               "allowed: 'ok' or 'error'")
    return {name: columns[name] for name in COLUMNS}


def check_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """`manifest_row(**row)`: the same checks on a row already built as a mapping."""
    return manifest_row(**row)


def manifest_bytes(rows: Sequence[Mapping[str, Any]]) -> bytes:
    """Parquet bytes of manifest rows, in the order given. No rows gives the schema and no row
    group, since a row group of 0 rows makes Hugging Face `datasets` fail."""
    sink = pa.BufferOutputStream()
    with pq.ParquetWriter(sink, MANIFEST_SCHEMA) as writer:
        if rows:
            writer.write_table(pa.Table.from_pylist(list(rows), schema=MANIFEST_SCHEMA))
    return sink.getvalue().to_pybytes()
