"""pipeline.output.keycount: keys repeated across shards, exact, in memory or in hash partitions."""

from __future__ import annotations

import pytest

from pipeline.output import keycount
from pipeline.output.folder import OutputFolder
from pipeline.output.keycount import count_repeated_keys
from pipeline.output.manifest import COLUMNS, manifest_bytes, manifest_row


def _manifest(keys):
    return manifest_bytes([manifest_row(**{**dict.fromkeys(COLUMNS), "key": k, "output_key": k,
                                           "status": "ok"}) for k in keys])


@pytest.fixture
def job(tmp_path):
    """Shards a..e: a and b share k1..k3, c holds k3 twice (one shard: not repeated across),
    d repeats a's k9, e is a marker whose manifest is missing."""
    shards = {"a": ["k1", "k2", "k3", "k9"], "b": ["k1", "k2", "k3", "x"], "c": ["k3", "k3"],
              "d": ["k9", "y"], "e": None}
    (tmp_path / "manifests").mkdir()
    for stem, keys in shards.items():
        if keys is not None:
            (tmp_path / "manifests" / f"{stem}.parquet").write_bytes(_manifest(keys))
    return str(tmp_path), sorted(shards)


def test_in_memory_and_partitioned_counts_agree(job, monkeypatch):
    output, stems = job
    assert count_repeated_keys(OutputFolder(output), stems) == 4  # k1, k2, k3, k9
    assert count_repeated_keys(OutputFolder(output), ["a", "c"]) == 1
    monkeypatch.setattr(keycount, "PARTITION_ROWS", 3)  # 14 rows: 5 partitions on disk
    assert count_repeated_keys(OutputFolder(output), stems, rows=14, workers=2) == 4


def test_counting_in_passing_gives_up_past_its_limit(job):
    output, stems = job
    assert count_repeated_keys(OutputFolder(output), stems, limit=100) == 4
    assert count_repeated_keys(OutputFolder(output), stems, limit=5) is None
