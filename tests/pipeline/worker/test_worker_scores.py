"""Scores on the actor: a job with a `score:` section writes a sidecar beside each shard, before
its marker, one row per manifest row, and scoring the same outputs after the fact gives the
same scores (png and jpg outputs: scores come from the pixels as written)."""

from __future__ import annotations

import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.output import writer as writer_module
from pipeline.output.folder import OutputFolder
from pipeline.output.scores import SCORE_COLUMNS, read_metadata
from pipeline.score.scorer import Scorer
from pipeline.score.shard import ShardScorer
from pipeline.worker.shard import ShardWorker
from tests.support.shards import make_spec, write_shards


def _score_section(clip_dir, aesthetic) -> dict:
    return {"metrics": ["ssim", "clip_score", "aesthetic", "embedding"],
            "clip_model": str(clip_dir), "aesthetic_model": str(aesthetic),
            "prompt": "a photo of a room", "batch_size": 2}


@pytest.mark.parametrize("image_format", ["png", "jpg"])
def test_sidecars_before_markers_and_equal_after_the_fact(
        tiny_vp, tiny_vp_dir, tiny_clip_dir, tiny_aesthetic_path, tmp_path, monkeypatch,
        image_format):
    shards = write_shards(tmp_path / "in", n_shards=2, per_shard=3)
    out = tmp_path / "out"
    spec = make_spec(tiny_vp_dir, shards, out, output={"image_format": image_format},
                     score=_score_section(tiny_clip_dir, tiny_aesthetic_path))
    assert spec.fingerprint() == make_spec(tiny_vp_dir, shards, out,
                                           output={"image_format": image_format}).fingerprint()
    published: list[str] = []
    real_put = writer_module.put_bytes_atomic

    def put(url, data, options, **kwargs):
        published.append(url.rsplit("/", 2)[-2])
        return real_put(url, data, options, **kwargs)

    monkeypatch.setattr(writer_module, "put_bytes_atomic", put)
    with ShardWorker(spec, model=tiny_vp) as worker:
        for url in shards:
            worker.process(url)
    assert published == ["manifests", "scores", "done"] * 2
    folder = OutputFolder(str(out))
    assert folder.scored_stems() == {"part-000000", "part-000001"}
    for stem in sorted(folder.scored_stems()):
        manifest = pq.read_table(out / "manifests" / f"{stem}.parquet").to_pylist()
        sidecar = pq.read_table(out / "scores" / f"{stem}.parquet")
        meta = read_metadata(sidecar.schema)
        assert meta["settings"]["clip_model"] == str(tiny_clip_dir)
        assert meta["models"]["clip"]["identity"].startswith("sha256:")
        rows = sidecar.to_pylist()
        assert [(r["key"], r["output_key"]) for r in rows] == \
            [(r["key"], r["output_key"]) for r in manifest]
        for m, s in zip(manifest, rows, strict=True):
            filled = [s[name] is not None for name in SCORE_COLUMNS]
            assert filled == [m["status"] == "ok"] * len(SCORE_COLUMNS), (m, s)
        # after the fact: the same scores from the output tar as written
        run_rows = rows
        shutil.move(out / "scores" / f"{stem}.parquet", tmp_path / f"{stem}.run.parquet")
        scorer = ShardScorer(folder, Scorer(spec.score, torch.device("cpu")), image_format,
                             batch_size=3)
        stats = scorer.process(stem)
        scorer.close()
        assert stats.scored == sum(m["status"] == "ok" for m in manifest)
        again = pq.read_table(out / "scores" / f"{stem}.parquet").to_pylist()
        for a, b in zip(run_rows, again, strict=True):
            assert a["key"] == b["key"]
            for name in ("ssim", "clip_score", "aesthetic"):
                assert a[name] == pytest.approx(b[name], abs=1e-5) if a[name] is not None \
                    else b[name] is None
            if a["embedding"] is not None:
                np.testing.assert_allclose(a["embedding"], b["embedding"], atol=1e-3)
