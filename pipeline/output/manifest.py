"""The manifest: its schema, its error kinds and the one function that builds a row.

Every shard's results carry one Parquet manifest (`OUT/manifests/{stem}.parquet`, see
`pipeline.output.layout`) with one row per input sample x output index, errors included. This
module is
the only home of what a row is:

- `MANIFEST_SCHEMA`: the columns, their types and order (new columns are only appended, so
  manifests written before a column existed read together with newer ones);
- `ERROR_KINDS`: the fixed list of `error_kind` values, with what each means;
- `manifest_row`: the one row builder; it refuses a row with an unknown or a missing column, a
  status other than "ok" / "error", an ok row with an error, or an error row without a message
  or with a kind not in `ERROR_KINDS` (a misspelt column never becomes a silent null);
- `manifest_bytes`: the Parquet bytes of a shard's rows.
"""

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
    # added with issue 11 (appended: older manifests read together with these, the new
    # columns null for their rows)
    ("eta", pa.float64()), ("dtype", pa.string()), ("batch_size", pa.int32()),
    ("model_identity", pa.string()), ("error_kind", pa.string()),
    # added with issue 10: per-row settings of text-conditioned models (null for pixel models)
    ("prompt", pa.string()), ("negative_prompt", pa.string()), ("guidance_scale", pa.float64()),
    # added with issue 23: what the text encoders did not take of the prompts (null: whole)
    ("prompt_truncated", pa.string()), ("negative_prompt_truncated", pa.string()),
])
"""One row per input sample x output index. `input_shard`, `output_shard` and `model` are
absolute (local paths made absolute, URLs without credentials, a hub id as given);
`batch_size` is the number of samples in the network call that made the output.
`prompt_truncated` / `negative_prompt_truncated`: null when every text encoder took the prompt
whole (and for pixel models, and rows whose settings were never read), else which encoders cut
it and where ("text_encoder kept 77 of 95 tokens"; several joined by "; ")."""

COLUMNS: tuple[str, ...] = tuple(MANIFEST_SCHEMA.names)
"""The manifest's column names, in order."""

_COLUMN_SET = frozenset(COLUMNS)


class ManifestRowError(ValueError):
    """A manifest row that does not fit the schema (a bug of the code building it, never a
    problem of the input): the message names the columns or values at fault."""


def manifest_row(**columns: Any) -> dict[str, Any]:
    """One manifest row: every column of `MANIFEST_SCHEMA` given (None for null), no other.

    Returns the row as a dict in column order.
    Raises:
        ManifestRowError: a column missing or unknown; `status` not "ok" or "error"; an ok row
            with an `error` or `error_kind`; an error row whose `error_kind` is not one of
            `ERROR_KINDS` or whose `error` is empty.
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
    """Parquet bytes of manifest rows (each made by `manifest_row`), in the order given.

    No rows (an empty shard, or one whose samples all failed before decoding) gives a file with
    the schema and no row group: pyarrow, pandas and duckdb read it as 0 rows, and HF
    `datasets` reads a folder holding it (a row group of 0 rows makes `datasets` fail with
    "BatchSize must be greater than 0").
    """
    sink = pa.BufferOutputStream()
    with pq.ParquetWriter(sink, MANIFEST_SCHEMA) as writer:
        if rows:
            writer.write_table(pa.Table.from_pylist(list(rows), schema=MANIFEST_SCHEMA))
    return sink.getvalue().to_pybytes()
