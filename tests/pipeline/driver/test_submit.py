"""`sdedit-batch submit` / `status SUBMISSION_ID` against a real Ray head (the `ray_head` fixture).

The submitted entrypoint runs on the head, which is this machine, so the job uses local paths.
`submit` runs as its own process in its own session, ended by session id; `status`, which
starts no process, runs in this one. The head's own processes (including the job supervisor
and the submitted driver) end with the fixture.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from pipeline.cli import main
from pipeline.driver.submit import submission_status
from tests.support.cli import run_cli_in_session
from tests.support.rayhead import RayHeadInfo, ray_auth_env
from tests.support.shards import write_job, write_shards

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


def _cli(args: list[str], info: RayHeadInfo, timeout: float) -> subprocess.CompletedProcess[str]:
    """`python -m pipeline.cli ARGS` with the head's token and no RAY_ADDRESS, in its own
    session; whatever it started is ended, even on timeout."""
    drop = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN_PATH")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(info.env)
    return run_cli_in_session(args, env, timeout)


def _status(sid: str, info: RayHeadInfo) -> Result:
    """`sdedit-batch status SID --address ...` in this process (it starts no process), with
    `info`'s token."""
    with ray_auth_env(info):
        return CliRunner().invoke(main, ["status", sid, "--address", info.dashboard_url])


@pytest.mark.timeout(400)
def test_submit_runs_job_on_the_cluster_and_status_reads_the_submission(
        ray_head: RayHeadInfo, tiny_vp_dir: Path, tmp_path: Path) -> None:
    inputs = write_shards(tmp_path / "in", n_shards=2, per_shard=2, bad=False)
    out = tmp_path / "out"
    job = write_job(tmp_path / "job.yaml", tiny_vp_dir, inputs, out, "submitted",
                    compute={"batch_size": 2})
    url = ray_head.dashboard_url

    run = _cli(["submit", str(job), "--address", url, "--set", "sdedit.seed=5"], ray_head, 300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    match = re.search(r"submitted submitted as (raysubmit_\w+)", run.stderr)
    assert match, run.stderr
    sid = match.group(1)
    # The driver's own output was streamed back, and it did the work on this cluster.
    assert "shards 2 done now, 0 done before, 0 failed (of 2)" in run.stdout
    assert f"submission {sid}: SUCCEEDED (exit code 0)" in run.stderr
    assert sorted(p.name for p in (out / "done").iterdir()) == [
        "part-000000.json", "part-000001.json"]
    assert json.loads((out / "job.json").read_text())["spec"]["sdedit"]["seed"] == 5
    with ray_auth_env(ray_head):
        info = submission_status(url, sid)
    assert info.ray_job_id, "the entrypoint's driver never joined the head's cluster"
    assert "--address auto" in info.entrypoint and "seed" not in info.entrypoint
    assert (info.job_name, info.output) == ("submitted", str(out))

    status = _status(sid, ray_head)
    assert status.exit_code == 0, status.output
    assert f"submission {sid}: SUCCEEDED (exit code 0)" in status.stdout
    assert "shards: 2 done, 0 pending, 0 failed (of 2)" in status.stdout

    # --no-wait prints the id at once; a changed t0 makes the driver refuse to resume (exit 2),
    # which `status` reports.
    nowait = _cli(["submit", str(job), "--address", url, "--no-wait", "--set", "sdedit.t0=0.05"],
                  ray_head, 60)
    assert nowait.returncode == 0, nowait.stderr
    sid2 = nowait.stdout.strip()
    assert re.fullmatch(r"raysubmit_\w+", sid2) and sid2 != sid
    deadline = time.monotonic() + 120
    with ray_auth_env(ray_head):
        while not (final := submission_status(url, sid2)).terminal:
            assert time.monotonic() < deadline, f"{sid2} still {final.status}"
            time.sleep(1.0)
    assert (final.status, final.exit_code) == ("FAILED", 2)
    status2 = _status(sid2, ray_head)
    assert f"submission {sid2}: FAILED (exit code 2)" in status2.stdout
    wrong = _status(sid2, dataclasses.replace(ray_head, env={**ray_head.env,
                                                             "RAY_AUTH_TOKEN": "0" * 32}))
    assert wrong.exit_code == 2 and f"cannot reach the Ray Jobs API at {url}" in wrong.stderr
    assert "RAY_AUTH_TOKEN" in wrong.stderr and ray_head.token not in wrong.stderr


def test_submit_reports_an_invalid_job_before_submitting(tmp_path: Path) -> None:
    job = tmp_path / "job.yaml"
    job.write_text("name: bad\nmodel: {source: m}\ninput: {shards: a.tar}\n"
                   "output: {path: /tmp/x}\nsdedit: {t0: 3}\n")
    # No cluster at this address: the spec error must come first (exit 2, nothing sent).
    # (In this process: a refused submission starts no process.)
    run = CliRunner().invoke(main, ["submit", str(job), "--address", "http://127.0.0.1:9"])
    assert run.exit_code == 2
    assert "sdedit.t0: 3 " in run.stderr and "Ray Jobs API" not in run.stderr
    unreachable = CliRunner().invoke(main, ["submit", str(job), "--address",
                                            "http://127.0.0.1:9", "--set", "sdedit.t0=0.5"])
    assert unreachable.exit_code == 2
    assert "cannot reach the Ray Jobs API at http://127.0.0.1:9" in unreachable.stderr
