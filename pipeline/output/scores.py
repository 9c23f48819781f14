"""Score sidecars: `OUT/scores/{stem}.parquet`, one row per manifest row, and their settings.

A sidecar holds the manifest's rows in its order with its keys, and one column per scorer (null
for error rows and scorers not asked for); its Parquet metadata records what made the scores.
Scores with other settings replace them only with `--overwrite` (`score_conflict`). See
docs/scores.md."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

__all__ = ["METADATA_KEY", "SCORE_COLUMNS", "SCORE_SCHEMA", "read_metadata", "score_conflict",
           "score_row", "scores_bytes"]

SCORE_COLUMNS = ("ssim", "clip_score", "aesthetic", "embedding")
"""The score columns, one per scorer of `pipeline.job.spec.METRICS`."""
SCORE_SCHEMA = pa.schema([
    ("key", pa.string()), ("output_key", pa.string()), ("sample_index", pa.int32()),
    ("ssim", pa.float64()), ("clip_score", pa.float64()), ("aesthetic", pa.float64()),
    ("embedding", pa.list_(pa.float16())),
])
"""One row per manifest row: its keys, then ssim (to the guide, -1..1), clip_score (0..100),
aesthetic (the LAION predictor's scale, about 1..10) and the L2-normalised CLIP image embedding
(float16)."""
METADATA_KEY = b"sdedit_scores"
"""The Parquet metadata key holding what made a sidecar's scores (JSON)."""


def score_row(manifest_row: Mapping[str, Any], scores: Mapping[str, Any] | None) -> dict[str, Any]:
    """The sidecar row of one manifest row: its keys and `scores` (name -> value; None or missing
    = null); a name that is no score column is refused."""
    values = dict(scores or {})
    unknown = sorted(set(values) - set(SCORE_COLUMNS))
    if unknown:
        raise ValueError(f"score row of key {manifest_row.get('key')!r}: unknown score "
                         f"{', '.join(unknown)}; allowed: {', '.join(SCORE_COLUMNS)}")
    row = {name: manifest_row[name] for name in ("key", "output_key", "sample_index")}
    for name in SCORE_COLUMNS:
        value = values.get(name)
        if name == "embedding" and value is not None:
            value = np.asarray(value, dtype=np.float16)
        row[name] = value
    return row


def scores_bytes(rows: Sequence[Mapping[str, Any]], metadata: Mapping[str, Any]) -> bytes:
    """Parquet bytes of a shard's sidecar rows, with `metadata` as JSON."""
    schema = SCORE_SCHEMA.with_metadata({METADATA_KEY: json.dumps(dict(metadata),
                                                                  sort_keys=True).encode()})
    sink = pa.BufferOutputStream()
    with pq.ParquetWriter(sink, schema) as writer:
        if rows:
            writer.write_table(pa.Table.from_pylist(list(rows), schema=schema))
    return sink.getvalue().to_pybytes()


def read_metadata(schema: pa.Schema) -> dict[str, Any]:
    """What made a sidecar (its `METADATA_KEY` metadata), {} when it has none."""
    raw = (schema.metadata or {}).get(METADATA_KEY)
    return json.loads(raw) if raw else {}


def score_conflict(path: str, recorded: Mapping[str, Any] | None,
                   settings: Mapping[str, Any]) -> str | None:
    """Why scores made with `settings` cannot join those recorded at `path`, or None."""
    if recorded is None or dict(recorded) == dict(settings):
        return None
    changed = [f"score.{k}: {recorded.get(k)!r} -> {settings.get(k)!r}"
               for k in sorted(set(recorded) | set(settings)) if recorded.get(k) != settings.get(k)]
    return (f"output {path} holds scores made with other settings ({', '.join(changed)}); "
            f"rescore them all with `sdedit-batch score {path} --overwrite ...`, or keep the "
            "score settings they were made with")
