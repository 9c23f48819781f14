"""`score` on Ray: after the fact (job.json's settings, or a job file's) it gives the run's
scores, resumes exactly after an interruption and after an actor lost mid-shard, and refuses
other settings without --overwrite; validate refuses a missing scorer model."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest
import yaml
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.driver.preflight import preflight
from pipeline.driver.scoring import score_output, score_spec
from pipeline.errors import ResumeConflictError
from pipeline.output.folder import OutputFolder
from pipeline.output.scorerecord import prepare_scores
from pipeline.worker.hooks import Hooks
from tests.support.rayhead import connected
from tests.support.scored import make_output, score_section, sweep_shards
from tests.support.shards import make_spec

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def local_ray(ray_head):
    """Drivers of the session's Ray head, as tests/pipeline/driver/test_runner.py."""
    with connected(ray_head):
        yield


def _sidecars(out) -> dict[str, list[dict]]:
    paths = sorted((out / "scores").glob("*.parquet"))
    return {p.stem: pq.read_table(p).to_pylist() for p in paths}


def _same(a: dict[str, list[dict]], b: dict[str, list[dict]]) -> None:
    assert a.keys() == b.keys()
    for stem in a:
        for x, y in zip(a[stem], b[stem], strict=True):
            assert x["output_key"] == y["output_key"]
            for name in ("ssim", "clip_score", "aesthetic"):
                assert (x[name] is None) == (y[name] is None)
                if x[name] is not None:
                    assert x[name] == pytest.approx(y[name], abs=1e-5)


def test_score_after_the_fact_resumes_exactly(local_ray, tiny_vp, tiny_vp_dir, tiny_clip_dir,
                                               tiny_aesthetic_path, tmp_path):
    """The run's sidecars (the worker's, `make_output`) are made again by `score` on Ray from
    job.json's settings: its actor killed mid-shard (no retries: the attempt fails), then
    resumed by the command; then other settings are refused, and --overwrite discards."""
    spec = make_output(tmp_path, tiny_vp, tiny_vp_dir, tiny_clip_dir, tiny_aesthetic_path)
    out = tmp_path / "out"
    run_scores = _sidecars(out)
    assert all(row["embedding"] is not None for rows in run_scores.values() for row in rows
               if row["ssim"] is not None)
    for path in (out / "scores").glob("*.parquet"):
        path.unlink()
    flag = tmp_path / "crashed"
    killed = score_output(score_spec(str(out), overrides=["compute.shard_retries=0"]),
                          progress=False, hooks=Hooks(crash=f"in-0:2:{flag}"))
    assert flag.exists() and killed.shards_scored + len(killed.failed) == 2 and killed.failed
    result = CliRunner().invoke(main, ["score", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert f"now ({12 - 6 * killed.shards_scored} of" in result.output
    _same(run_scores, _sidecars(out))
    status = CliRunner().invoke(main, ["status", str(out)])
    assert "scores: 2 of 2 done shards have a sidecar\n" in status.output
    again = score_spec(str(out))  # job.json's score section
    assert score_output(again, progress=False).shards_scored == 0  # nothing left, no actor
    job = tmp_path / "score.yaml"
    job.write_text(yaml.safe_dump({"score": score_section(tiny_clip_dir, tiny_aesthetic_path,
                                                          prompt="a red room")}))
    other = score_spec(str(out), str(job))
    with pytest.raises(ResumeConflictError, match=r"score\.prompt: 'a photo of a room' -> "
                                                  r"'a red room'"):
        score_output(other, progress=False)
    folder = OutputFolder(str(out))
    prepare_scores(folder, other.score.settings(), overwrite=True)
    assert folder.scored_stems() == set() and folder.read_score_settings()["prompt"] == \
        "a red room"
    assert spec.fingerprint() == other.fingerprint()


def test_validate_refuses_a_missing_scorer_model(tiny_vp_dir, tmp_path):
    shards = sweep_shards(tmp_path / "in")
    spec = make_spec(tiny_vp_dir, shards, tmp_path / "out", score={
        "metrics": ["clip_score", "aesthetic"], "clip_model": str(tmp_path / "no-clip"),
        "aesthetic_model": str(tmp_path / "no.pth")})
    problems = preflight(spec, offline=True).problems
    assert any(p.startswith("score.clip_model:") and "not found" in p for p in problems)
    assert any(p.startswith("score.aesthetic_model:") and "no such file" in p for p in problems)
