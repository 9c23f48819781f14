"""An output's rows with their scores: each shard's manifest joined with its score sidecar.

The sidecar holds the manifest's rows in order, so the join is by position, checked on the keys;
a shard without a sidecar has null scores. `stem` is added, making ok rows unique by (stem,
output_key)."""

from __future__ import annotations

from collections.abc import Iterator

import pyarrow as pa

from pipeline.errors import PipelineError
from pipeline.output.folder import OutputFolder
from pipeline.output.manifest import MANIFEST_SCHEMA
from pipeline.output.scores import SCORE_COLUMNS, SCORE_SCHEMA

__all__ = ["ROW_SCHEMA", "output_rows", "shard_rows"]

ROW_SCHEMA = pa.schema([pa.field("stem", pa.string()), *MANIFEST_SCHEMA,
                        *(SCORE_SCHEMA.field(name) for name in SCORE_COLUMNS)])
"""A row of an output: its shard's stem, the manifest's columns, then the scores."""


def shard_rows(folder: OutputFolder, stem: str) -> tuple[pa.Table, bool]:
    """(rows of shard `stem` in ROW_SCHEMA, whether it has a sidecar); PipelineError when the
    manifest is missing or the sidecar does not match it."""
    manifest = folder.read_manifest(stem)
    if manifest is None:
        raise PipelineError(f"shard {stem} of {folder!r} is committed but has no manifest")
    found = folder.read_scores(stem)
    n = len(manifest)
    columns = [pa.array([stem] * n, pa.string()), *manifest.columns]
    if found is None:
        columns += [pa.nulls(n, SCORE_SCHEMA.field(name).type) for name in SCORE_COLUMNS]
    else:
        scores = found[0]
        if len(scores) != n or scores["output_key"] != manifest["output_key"]:
            raise PipelineError(f"shard {stem}: its score sidecar does not match its manifest "
                                f"({len(scores)} rows for {n}); rescore it: sdedit-batch "
                                f"score {folder.path} --overwrite")
        columns += [scores[name] for name in SCORE_COLUMNS]
    return pa.Table.from_arrays(columns, schema=ROW_SCHEMA), found is not None


def output_rows(folder: OutputFolder, stems: list[str] | None = None
                ) -> Iterator[tuple[str, pa.Table, bool]]:
    """(stem, rows, has scores) of each committed shard (or of `stems`), in stem order."""
    for stem in sorted(folder.done_stems() if stems is None else stems):
        table, scored = shard_rows(folder, stem)
        yield stem, table, scored
