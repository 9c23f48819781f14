"""pipeline.output.manifest: the schema, the error kinds and the one row builder."""

from __future__ import annotations

import datetime as dt
import io

import pyarrow.parquet as pq
import pytest

from pipeline.output.manifest import (
    COLUMNS,
    ERROR_KINDS,
    MANIFEST_SCHEMA,
    ManifestRowError,
    manifest_bytes,
    manifest_row,
)


def _values(**changes):
    values = dict.fromkeys(COLUMNS)
    values.update(key="k", output_key="k", sample_index=0, status="ok",
                  created_at=dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc))
    values.update(changes)
    return values


def test_error_kinds_are_a_fixed_list():
    assert list(ERROR_KINDS) == ["key", "missing", "duplicate", "member", "decode", "size",
                                 "mask", "setting", "device", "edit", "encode"]
    assert tuple(MANIFEST_SCHEMA.names) == COLUMNS


def test_a_row_has_every_column_in_schema_order():
    values = _values()
    row = manifest_row(**dict(reversed(list(values.items()))))
    assert list(row) == list(COLUMNS) and row == values
    table = pq.read_table(io.BytesIO(manifest_bytes([row])))
    assert table.schema.equals(MANIFEST_SCHEMA) and table.to_pylist() == [values]


@pytest.mark.parametrize("values, message", [
    ({**_values(), "widht": 16}, r"unknown widht; allowed: exactly the columns"),
    ({k: v for k, v in _values().items() if k not in ("width", "seed")},
     r"missing seed, width; allowed"),
    (_values(status="fine"), r"status 'fine'; allowed: 'ok' or 'error'"),
    (_values(error="x"), r"status 'ok' with error_kind None and error 'x'"),
    (_values(status="error", error="x"), r"error_kind None is not one of key, missing"),
    (_values(status="error", error="x", error_kind="oops"), r"error_kind 'oops' is not one"),
    (_values(status="error", error="", error_kind="decode"), r"an error row without a message"),
], ids=["unknown", "missing", "status", "ok-with-error", "no-kind", "bad-kind", "no-message"])
def test_the_row_builder_refuses_what_the_schema_does_not_hold(values, message):
    with pytest.raises(ManifestRowError, match=message):
        manifest_row(**values)


def test_an_error_row_of_each_kind_is_accepted():
    for kind in ERROR_KINDS:
        row = manifest_row(**_values(status="error", error="why", error_kind=kind))
        assert (row["status"], row["error_kind"]) == ("error", kind)
