"""pipeline.status: counts from the output folder alone (job.json, done/ and failed/ markers)."""

from __future__ import annotations

import json

import pytest

from pipeline.errors import PipelineError
from pipeline.runner import prepare_output
from pipeline.status import job_status
from pipeline.worker import ShardWorker
from tests.support.shards import make_spec, write_shards


def test_status_counts_done_failed_and_pending(tiny_vp, tiny_vp_dir, tmp_path):
    shards = write_shards(tmp_path / "in", n_shards=3, per_shard=3)
    out = tmp_path / "out"
    spec = make_spec(tiny_vp_dir, shards, out)
    prepare_output(spec, overwrite=False)
    ShardWorker(spec, model=tiny_vp).process(shards[1])  # holds one undecodable sample
    (out / "failed").mkdir()
    (out / "failed" / "part-000002.json").write_text(json.dumps(
        {"stem": "part-000002", "input_shard": shards[2], "error": "truncated tar"}))
    status = job_status(str(out))
    assert (status.name, status.shards_total, status.done, status.pending) == ("test-job", 3, 1, 1)
    assert status.failed == {shards[2]: "truncated tar"}
    assert (status.samples, status.outputs_ok, status.outputs_error) == (3, 2, 1)
    # a failed marker of a shard that is done since is not counted as failed
    (out / "failed" / "part-000001.json").write_text(json.dumps(
        {"stem": "part-000001", "input_shard": shards[1], "error": "old"}))
    assert set(job_status(str(out)).failed) == {shards[2]}


def test_status_of_a_folder_without_a_job_is_an_error(tmp_path):
    with pytest.raises(PipelineError, match=r"no job\.json"):
        job_status(str(tmp_path))
