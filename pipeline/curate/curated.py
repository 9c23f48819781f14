"""`sdedit-batch filter`: a curated WebDataset of exactly the rows of an output that pass.

The selection (with `--dedup`, greedy in `--best` order against the rows kept so far) is decided
once and recorded before any shard is written, so an interrupted filter resumes to the same
shards; other settings are refused unless `--overwrite`. Curated keys are `{source stem}_{output
key}`, unique across source shards. The folder's layout: docs/scores.md, "a curated set"."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import webdataset as wds

from pipeline.curate.select import COLUMNS, Predicate
from pipeline.curate.table import output_rows
from pipeline.errors import PipelineError, ResumeConflictError
from pipeline.input.reader import iter_raw
from pipeline.output.folder import OutputFolder
from pipeline.storage import absolute_url, put_bytes_atomic, url_fs, with_retries

logger = logging.getLogger(__name__)

__all__ = ["FilterSummary", "filter_output"]

SETTINGS = "filter.json"
SELECTION = "selection.parquet"
LINEAGE = ("key", "curated_shard", "source_output", "source_stem", "source_output_shard",
           "source_key")
"""The curated manifest's first columns; the source's columns follow (`key` as `input_key`)."""


@dataclass
class FilterSummary:
    """What one `filter_output` call did."""

    rows_seen: int = 0
    rows_passed: int = 0
    rows_kept: int = 0
    shards_total: int = 0
    shards_before: int = 0
    shards_written: int = 0


def filter_output(source: str, out: str, *, where: str | None = None,
                  dedup: float | None = None, best: str | None = None,
                  shard_size: int = 1000, overwrite: bool = False,
                  after_shard: Callable[[str], None] | None = None) -> FilterSummary:
    """Write the curated set of `source`'s rows that satisfy `where` at `out` (resumable).
    PipelineError for a bad predicate or --best column, --dedup without embeddings, unscored
    shards the predicate needs, or other settings at `out` (ResumeConflictError)."""
    src, dst = OutputFolder(source), OutputFolder(out)
    record = src.read_record()
    if record is None:
        raise PipelineError(f"output {source}: no job.json; allowed: an output written by "
                            "`sdedit-batch run`")
    image_format = record.get("spec", {}).get("output", {}).get("image_format", "png")
    predicate = Predicate(where)
    if best is not None and best not in COLUMNS:
        raise PipelineError(f"--best {best!r}: no such column; allowed: one of "
                            f"{', '.join(COLUMNS)}")
    settings = {"source": absolute_url(source), "where": predicate.where, "dedup": dedup,
                "best": best, "shard_size": shard_size}
    summary = FilterSummary()
    selection = _recorded(dst, settings, overwrite)
    if selection is None:
        data = _parquet(_select(src, predicate, dedup, best, shard_size, summary))
        put_bytes_atomic(dst.url(SELECTION), data, dst.options)
        put_bytes_atomic(dst.url(SETTINGS), json.dumps(settings, indent=1).encode(),
                         dst.options)
        selection = pq.read_table(io.BytesIO(data))  # as a resumed filter reads it
    summary.rows_kept = len(selection)
    shards = sorted(set(selection.column("curated_shard").to_pylist()))
    done = dst.done_stems()
    summary.shards_total, summary.shards_before = len(shards), len(done & set(shards))
    for stem in shards:
        if stem in done:
            continue
        rows = selection.filter(pc.equal(selection["curated_shard"], stem))
        _write_shard(src, dst, stem, rows, image_format)
        summary.shards_written += 1
        if after_shard is not None:
            after_shard(stem)
    return summary


def _recorded(dst: OutputFolder, settings: dict[str, Any], overwrite: bool) -> pa.Table | None:
    """The selection recorded at `dst` by a filter with the same settings, or None (nothing
    there, or discarded by `overwrite`)."""
    fs, path = url_fs(dst.url(SETTINGS), dst.options)
    if not with_retries(lambda: fs.exists(path), what="check", url=dst.url(SETTINGS)):
        return None
    old = json.loads(fs.cat_file(path))
    if old != settings:
        if not overwrite:
            changed = [f"{k}: {old.get(k)!r} -> {settings[k]!r}" for k in settings
                       if old.get(k) != settings[k]]
            raise ResumeConflictError(f"{dst.path} holds a curated set made with other "
                                      f"settings ({', '.join(changed)}); use a new --out, or "
                                      "--overwrite to discard it")
        dst.discard_results()
        fs.rm(path)
        return None
    sel_fs, sel_path = url_fs(dst.url(SELECTION), dst.options)
    return pq.read_table(io.BytesIO(sel_fs.cat_file(sel_path)))


def _select(src: OutputFolder, predicate: Predicate, dedup: float | None, best: str | None,
            shard_size: int, summary: FilterSummary) -> pa.Table:
    """Every row that passes (deduplicated), in source order, with curated keys and shards."""
    parts, unscored = [], []
    needs_scores = dedup is not None or _names_scores(predicate.where, best)
    for stem, rows, scored in output_rows(src):
        if needs_scores and not scored and len(rows):
            unscored.append(stem)
            continue
        summary.rows_seen += len(rows)
        parts.append(rows.take(predicate.select(rows)))
    if unscored:
        raise PipelineError(f"{len(unscored)} shard(s) of {src.path} have no scores (first: "
                            f"{unscored[0]}): run `sdedit-batch score {src.path}` first")
    passed = pa.concat_tables(parts) if parts else None
    if passed is None or not len(passed):
        raise PipelineError(f"no row of {src.path} passes --where {predicate.where!r}")
    summary.rows_passed = len(passed)
    if dedup is not None:
        passed = passed.take(_dedup(passed, dedup, best))
    return _lineage(passed, src, shard_size)


def _names_scores(where: str | None, best: str | None) -> bool:
    text = f"{where or ''} {best or ''}"
    return any(name in text for name in ("ssim", "clip_score", "aesthetic"))


def _dedup(rows: pa.Table, threshold: float, best: str | None) -> np.ndarray:
    """Indices (source order) of the rows kept: best first, a row dropped when its embedding's
    cosine similarity to a kept row is >= `threshold` (exact, O(kept x passing))."""
    embeddings = rows.column("embedding").to_pylist()
    if any(e is None for e in embeddings):
        raise PipelineError("--dedup compares the CLIP image embeddings, which some rows do "
                            "not have; allowed: an output scored with the embedding scorer "
                            "(sdedit-batch score OUT --metrics ...,embedding)")
    x = np.asarray(embeddings, dtype=np.float32)
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    name = best or next((c for c in ("aesthetic", "clip_score", "ssim")
                         if rows.column(c).null_count < len(rows)), None)
    values = np.zeros(len(rows)) if name is None else np.array(
        [-np.inf if v is None else v for v in rows.column(name).to_pylist()], dtype=np.float64)
    order = np.lexsort((np.arange(len(rows)), -values))  # best first, ties in source order
    kept: list[int] = []
    kept_x = np.empty_like(x)
    for i in order:
        if kept and float((kept_x[:len(kept)] @ x[i]).max()) >= threshold:
            continue
        kept_x[len(kept)] = x[i]
        kept.append(int(i))
    return np.sort(np.asarray(kept, dtype=np.int64))


def _lineage(rows: pa.Table, src: OutputFolder, shard_size: int) -> pa.Table:
    """The selection's columns: curated key and shard, lineage, then the source columns."""
    stems, okeys = rows.column("stem").to_pylist(), rows.column("output_key").to_pylist()
    keys, taken = [], set()
    for stem, okey in zip(stems, okeys, strict=True):
        key = f"{stem}_{okey}".replace(".", "_")
        n = 1
        while key in taken:
            key, n = f"{stem}_{okey}_{n}".replace(".", "_"), n + 1
        taken.add(key)
        keys.append(key)
    shards = [f"curated-{i // shard_size:06d}" for i in range(len(rows))]
    rest = [name for name in rows.column_names if name not in ("stem", "key", "output_key")]
    return pa.Table.from_arrays(
        [pa.array(keys), pa.array(shards), pa.array([absolute_url(src.path)] * len(rows)),
         rows.column("stem"), rows.column("output_shard"), rows.column("output_key"),
         rows.column("key"), *(rows.column(name) for name in rest)],
        names=[*LINEAGE, "input_key", *rest])


def _write_shard(src: OutputFolder, dst: OutputFolder, stem: str, rows: pa.Table,
                 image_format: str) -> None:
    """The curated shard `stem`: tar, then manifest, then marker, each published whole."""
    wanted: dict[str, dict[str, str]] = {}
    for key, source_stem, okey in zip(rows.column("key").to_pylist(),
                                      rows.column("source_stem").to_pylist(),
                                      rows.column("source_key").to_pylist(), strict=True):
        wanted.setdefault(source_stem, {})[okey] = key
    found: dict[str, dict[str, Any]] = {}
    for source_stem, keys in wanted.items():
        for raw in iter_raw(src.shard_urls(source_stem).tar, src.options):
            if raw.key in keys and not raw.duplicate:
                found[keys[raw.key]] = {"__key__": keys[raw.key], **raw.members}
    order = rows.column("key").to_pylist()
    missing = [key for key in order if key not in found or image_format not in found[key]]
    if missing:
        raise PipelineError(f"curated shard {stem}: the outputs of {len(missing)} row(s) are "
                            f"not in their source shards (first: {missing[0]})")
    buffer = io.BytesIO()
    with wds.TarWriter(buffer, encoder=False, mtime=0.0) as tar:
        for key in order:
            tar.write(found[key])
    urls = dst.shard_urls(stem)
    put_bytes_atomic(urls.tar, buffer.getvalue(), dst.options)
    put_bytes_atomic(urls.manifest, _parquet(rows), dst.options)
    marker = {"stem": stem, "rows": len(rows), "output_shard": absolute_url(urls.tar),
              "manifest": absolute_url(urls.manifest)}
    put_bytes_atomic(urls.marker, json.dumps(marker, indent=1).encode(), dst.options)
    logger.info("curated shard %s: %d rows", stem, len(rows))


def _parquet(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()
