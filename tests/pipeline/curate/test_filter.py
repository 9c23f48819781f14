"""`filter`: exactly the rows that satisfy the predicate (checked against DuckDB on the
manifests and sidecars), their members copied with unique keys and lineage, near-duplicates
dropped by the best score, a clear error for a wrong column, and an interrupted filter that
resumes to the same shards."""

from __future__ import annotations

import tarfile
from pathlib import Path

import duckdb
import pandas as pd
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.curate.curated import filter_output
from pipeline.errors import PipelineError, ResumeConflictError


def _frame(out) -> pd.DataFrame:
    """Every row of the output with its scores, joined by position per shard (pandas)."""
    parts = []
    for manifest in sorted((out / "manifests").glob("*.parquet")):
        rows = pq.read_table(manifest).to_pandas()
        scores = pq.read_table(out / "scores" / manifest.name).to_pandas()
        assert list(scores["output_key"]) == list(rows["output_key"])
        rows = pd.concat([rows, scores.drop(columns=["key", "output_key", "sample_index",
                                                     "embedding"])], axis=1)
        rows["stem"] = manifest.stem
        parts.append(rows)
    return pd.concat(parts, ignore_index=True)


def _members(tar_path) -> dict[str, bytes]:
    with tarfile.open(tar_path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def test_filter_keeps_exactly_the_rows_duckdb_selects(scored, tmp_path):
    source = scored.output.path
    frame = _frame(Path(source))
    cut_a, cut_s = float(frame["aesthetic"].median()), float(frame["ssim"].quantile(0.25))
    where = f"aesthetic >= {cut_a!r} AND ssim > {cut_s!r}"
    expected = duckdb.sql(f"SELECT stem, output_key FROM frame WHERE status = 'ok' AND "
                          f"({where})").fetchall()
    assert 0 < len(expected) < len(frame)
    curated = tmp_path / "curated"
    summary = filter_output(source, str(curated), where=where, shard_size=3)
    kept = pq.read_table(curated / "selection.parquet").to_pylist()
    assert sorted((r["source_stem"], r["source_key"]) for r in kept) == sorted(expected)
    assert summary.rows_kept == len(expected)
    keys = [r["key"] for r in kept]
    assert len(set(keys)) == len(keys)  # k0 is in both source shards
    for stem in sorted({r["curated_shard"] for r in kept}):
        rows = pq.read_table(curated / "manifests" / f"{stem}.parquet").to_pylist()
        members = _members(curated / "shards" / f"{stem}.tar")
        assert (curated / "done" / f"{stem}.json").exists()
        for row in rows:
            source_members = _members(Path(source) / "shards" / f"{row['source_stem']}.tar")
            assert members[f"{row['key']}.png"] == source_members[f"{row['source_key']}.png"]
            assert f"{row['key']}.guide.png" in members and f"{row['key']}.json" in members
            assert row["aesthetic"] is not None and row["source_output_shard"].endswith(".tar")


def test_wrong_column_dedup_and_conflicts(scored, tmp_path):
    source = scored.output.path
    with pytest.raises(PipelineError, match=r"aesthetics.*allowed: an SQL condition over the "
                                            r"columns stem, key, .*aesthetic"):
        filter_output(source, str(tmp_path / "c0"), where="aesthetics > 1")
    frame = _frame(Path(source))
    summary = filter_output(source, str(tmp_path / "c1"), dedup=-1.0)
    assert summary.rows_kept == 1  # every pair is a near-duplicate: the best one stays
    kept = pq.read_table(tmp_path / "c1" / "selection.parquet").to_pylist()[0]
    assert kept["aesthetic"] == pytest.approx(frame["aesthetic"].max())
    with pytest.raises(ResumeConflictError, match=r"dedup: -1.0 -> 0.5"):
        filter_output(source, str(tmp_path / "c1"), dedup=0.5)
    assert filter_output(source, str(tmp_path / "c1"), dedup=0.5, overwrite=True).rows_kept >= 1


def test_an_interrupted_filter_resumes_to_the_same_shards(scored, tmp_path):
    source = scored.output.path
    reference = tmp_path / "reference"
    filter_output(source, str(reference), where="ssim > -1", shard_size=2)
    stopped = tmp_path / "stopped"

    def interrupt(stem: str) -> None:
        raise KeyboardInterrupt(stem)

    with pytest.raises(KeyboardInterrupt):
        filter_output(source, str(stopped), where="ssim > -1", shard_size=2,
                      after_shard=interrupt)
    assert len(list((stopped / "done").iterdir())) == 1
    result = CliRunner().invoke(main, ["filter", source, "--where", "ssim > -1", "--out",
                                       str(stopped), "--shard-size", "2"])
    assert result.exit_code == 0, result.output
    assert "written now, 1 before" in result.output
    for folder in ("shards", "manifests"):
        names = sorted(p.name for p in (reference / folder).iterdir())
        assert names == sorted(p.name for p in (stopped / folder).iterdir())
        for name in names:
            assert (reference / folder / name).read_bytes() == \
                (stopped / folder / name).read_bytes(), name
