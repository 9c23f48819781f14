"""run_job on a real Ray (the session's head): end to end, actor loss, resume, failures,
driver kill."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pytest
import ray
import webdataset as wds
import yaml
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.driver import pool, schedule
from pipeline.driver.pool import actor_options
from pipeline.driver.runner import run_job
from pipeline.errors import PipelineError, ResumeConflictError
from pipeline.worker.hooks import Hooks
from pipeline.worker.shard import ShardWorker
from tests.support import hooked_cli
from tests.support.images import png_header_only
from tests.support.rayhead import connected, kill_session
from tests.support.shards import make_spec, png, write_job, write_shards

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def local_ray(ray_head):
    """This module's tests are drivers of the session's Ray head (2 CPUs), not of a Ray of
    their own (starting and stopping one cost about 6 s)."""
    with connected(ray_head):
        yield


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return write_shards(tmp_path_factory.mktemp("in"), n_shards=3, per_shard=4)


@pytest.fixture(scope="module")
def reference(tiny_vp, tiny_vp_dir, inputs, tmp_path_factory) -> dict[str, bytes]:
    """Output tars of an uninterrupted run, made by the worker without Ray."""
    out = tmp_path_factory.mktemp("ref")
    spec = make_spec(tiny_vp_dir, inputs, out, sdedit={"samples_per_input": 2})
    worker = ShardWorker(spec, model=tiny_vp)
    for url in inputs:
        worker.process(url)
    return {p.name: p.read_bytes() for p in sorted((out / "shards").iterdir())}


def _check_complete(out: Path, reference: dict[str, bytes]) -> None:
    """Every key once per output index, each shard committed once, tars as the reference."""
    rows = pads.dataset(str(out / "manifests"), format="parquet").to_table().to_pylist()
    pairs = [(r["key"], r["sample_index"]) for r in rows]
    assert len(pairs) == len(set(pairs)) == 12 * 2
    markers = sorted(p.name for p in (out / "done").iterdir())
    assert markers == ["part-000000.json", "part-000001.json", "part-000002.json"]
    tars = {p.name: p.read_bytes() for p in (out / "shards").iterdir() if p.suffix == ".tar"}
    assert tars == reference


def test_end_to_end_rerun_does_nothing_resume_redoes_only_a_damaged_shard(
        local_ray, tiny_vp_dir, inputs, reference, tmp_path, caplog):
    """A whole run; the same run again does nothing; a shard whose manifest was cut short is
    said and redone alone, with a changed batch size (warned); a changed t0 is refused."""
    out = tmp_path / "out"
    spec = make_spec(tiny_vp_dir, inputs, out, sdedit={"samples_per_input": 2})
    summary = run_job(spec, progress=False)
    assert (summary.shards_done, summary.samples) == (3, 12)
    assert (summary.outputs_ok, summary.outputs_error) == (20, 4) and summary.exit_code == 0
    assert summary.errors_by_kind == {"decode": 2, "missing": 2}
    assert summary.keys_in_several_shards == 0
    _check_complete(out, reference)
    job = json.loads((out / "job.json").read_text())
    assert job["fingerprint"] == spec.fingerprint() and job["versions"]["ray"] == ray.__version__
    assert job["compute"] == {"device": "cpu", "dtype": "fp32", "threads": 1, "batch_size": 3}
    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump(spec.to_dict()))
    again = CliRunner().invoke(main, ["run", str(job_file), "--no-progress"])
    assert again.exit_code == 0, again.output
    assert "nothing to do: all 3 of 3 shards are already done" in again.stdout
    assert not (out / "lease.json").exists()  # each run released it
    manifest = out / "manifests" / "part-000001.parquet"  # committed, then cut short
    size = manifest.stat().st_size
    manifest.write_bytes(manifest.read_bytes()[:100])
    before = {p.name: p.stat().st_mtime_ns for p in (out / "done").iterdir()
              if p.name != "part-000001.json"}
    # a resume may change the batch size (not output-affecting), with a warning
    resumed = make_spec(tiny_vp_dir, inputs, out, sdedit={"samples_per_input": 2},
                        compute={"batch_size": 2})
    assert resumed.fingerprint() == spec.fingerprint()
    caplog.set_level(logging.WARNING, logger="pipeline")
    summary = run_job(resumed, progress=False)
    assert "already done (batch_size 3 -> 2)" in caplog.text
    assert summary.damaged == {inputs[1]: f"manifests/part-000001.parquet has 100 bytes, its "
                                          f"commit marker records {size:,}"}
    assert "1 committed shard(s) are damaged and are made again: part-000001: manifests/" \
        in caplog.text
    assert json.loads((out / "job.json").read_text())["compute"]["batch_size"] == 2
    assert (summary.shards_done, summary.shards_already_done) == (1, 2)
    after = {p.name: p.stat().st_mtime_ns for p in (out / "done").iterdir()}
    assert all(after[name] == stamp for name, stamp in before.items())
    _check_complete(out, reference)
    changed = make_spec(tiny_vp_dir, inputs, out, sdedit={"samples_per_input": 2, "t0": 0.05})
    with pytest.raises(ResumeConflictError, match=r"sdedit\.t0: 0\.04 -> 0\.05"):
        run_job(changed, progress=False)


def test_failed_attempts_lose_nothing_and_their_shards_are_retried(
        local_ray, tiny_vp_dir, inputs, reference, tmp_path, monkeypatch):
    """In one run: the actor process exits after 3 outputs of part-000001, and writing the
    first output of part-000002 raises OSError (each once)."""
    out = tmp_path / "out"
    crashed, failed_write = tmp_path / "crashed", tmp_path / "failed-write"
    hooks = Hooks(crash=f"part-000001:3:{crashed}", fail_write=f"part-000002:{failed_write}")
    monkeypatch.setattr(schedule, "RETRY_BASE_DELAY", 0.1)
    # part-000002 may be in flight when the actor dies, then fail its write: 2 retries
    spec = make_spec(tiny_vp_dir, inputs, out, sdedit={"samples_per_input": 2},
                     compute={"shard_retries": 2})
    summary = run_job(spec, progress=False, hooks=hooks)
    assert crashed.exists() and failed_write.exists(), "a test hook did not fire"
    assert summary.shards_done == 3 and not summary.failed
    _check_complete(out, reference)


def test_truncated_shard_is_retried_then_reported(local_ray, tiny_vp_dir, inputs, tmp_path,
                                                  monkeypatch):
    monkeypatch.setattr(schedule, "RETRY_BASE_DELAY", 0.1)
    data = Path(inputs[0]).read_bytes()
    bad = tmp_path / "bad-000009.tar"
    bad.write_bytes(data[: len(data) // 2])
    out = tmp_path / "out"
    spec = make_spec(tiny_vp_dir, [inputs[0], str(bad)], out, compute={"shard_retries": 1})
    summary = run_job(spec, progress=False)
    assert summary.shards_done == 1 and list(summary.failed) == [str(bad)]
    assert summary.exit_code == 1
    failed = json.loads((out / "failed" / "bad-000009.json").read_text())
    assert failed["attempts"] == 2 and "truncated" in failed["error"]
    assert not (out / "done" / "bad-000009.json").exists()


def test_driver_killed_mid_run_then_rerun(ray_head, tiny_vp_dir, inputs, reference, tmp_path):
    """The CLI in its own session, a driver of the session's Ray head, SIGKILLed after the
    first commit (Ray ends its actors with it); a rerun completes the job."""
    out = tmp_path / "out"
    job = tmp_path / "job.yaml"
    spec = make_spec(tiny_vp_dir, inputs, out, sdedit={"samples_per_input": 2})
    data = spec.to_dict()
    data["compute"]["actors"] = {"min": 1, "max": 1}
    job.write_text(yaml.safe_dump(data))
    args = ["run", str(job), "--no-progress", "--address", ray_head.address]
    cmd = [sys.executable, "-m", "pipeline.cli", *args]
    env = {**os.environ, **ray_head.driver_env()}
    proc = subprocess.Popen(hooked_cli.command(Hooks(batch_delay=1.0), *args),
                            start_new_session=True, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        while not (out / "done").exists() or not any((out / "done").iterdir()):
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
            assert time.monotonic() < deadline, "no shard committed in time"
            time.sleep(0.2)
    finally:
        os.kill(proc.pid, signal.SIGKILL)  # the driver dies at once, without cleanup
        proc.wait(timeout=30)
        kill_session(proc.pid, grace=0.5)  # and anything it started
    committed = len(list((out / "done").iterdir()))
    assert 1 <= committed < 3, "the driver should have died mid-run"
    assert (out / "lease.json").exists()  # a killed driver cannot release its lease
    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env,
                           start_new_session=True)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert "took over the lease of " in rerun.stderr  # its process is gone: no waiting
    assert f"stale: its process {proc.pid} on " in rerun.stderr
    assert f"{3 - committed} done now, {committed} done before" in rerun.stdout
    _check_complete(out, reference)
    status = CliRunner().invoke(main, ["status", str(out)])
    assert status.exit_code == 0, status.output
    assert "shards: 3 done, 0 pending, 0 failed (of 3)" in status.output
    assert "samples: 12; outputs 20 ok, 4 error" in status.output


def test_two_runs_started_together_one_runs_the_other_is_refused(ray_head, tiny_vp_dir,
                                                                  inputs, reference, tmp_path):
    """The issue's case: two drivers on one output deleted each other's temporary tars and
    computed each shard two or three times. Both CLIs start at once; the one holding the lease
    is held at a gate (`Hooks.hold_read`) until the other has ended: refused, before Ray."""
    out, gate = tmp_path / "out", tmp_path / "gate"
    job = write_job(tmp_path / "job.yaml", tiny_vp_dir, inputs, out,
                    sdedit={"samples_per_input": 2})
    args = ["run", str(job), "--no-progress", "--address", ray_head.address]
    env = {**os.environ, **ray_head.driver_env()}
    hooks = Hooks(hold_read=f"part-000000:{gate}")
    procs = [subprocess.Popen(hooked_cli.command(hooks, *args), start_new_session=True, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    try:
        deadline = time.monotonic() + 180
        while all(p.poll() is None for p in procs):
            assert time.monotonic() < deadline, "neither run ended"
            time.sleep(0.1)
        refused = next(p for p in procs if p.poll() is not None)
        running = next(p for p in procs if p is not refused)
        stdout, stderr = refused.communicate()
        assert refused.returncode == 2, stdout + stderr
        assert f"error: output {out} is being written by another run: " in stderr, stderr
        assert f"(pid {running.pid}, job test-job) since " in stderr
        assert "last heartbeat " in stderr and "Traceback" not in stderr
        assert running.poll() is None  # still held at the gate
        gate.touch()
        stdout, stderr = running.communicate(timeout=300)
        assert running.returncode == 0, stdout[-3000:] + stderr[-3000:]
        assert "shards 3 done now, 0 done before, 0 failed (of 3)" in stdout
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            kill_session(proc.pid, grace=0.5)
    _check_complete(out, reference)  # every output once, each shard committed once
    rows = pads.dataset(str(out / "manifests"), format="parquet").to_table().to_pylist()
    assert len({r["worker"] for r in rows if r["worker"]}) == 1  # one run's one actor made all
    assert not (out / "lease.json").exists()


def test_a_model_that_cannot_load_stops_the_job_without_retries(local_ray, tiny_vp_dir, inputs,
                                                                 tmp_path):
    broken = tmp_path / "broken-model"
    shutil.copytree(tiny_vp_dir, broken)
    config = json.loads((broken / "config.json").read_text())  # weights of another network:
    config["block_out_channels"] = [16, 32]                    # whole, but they cannot load
    (broken / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    spec = make_spec(broken, inputs, out)
    with pytest.raises(PipelineError, match=r"cannot load model .*broken-model.*cannot load "
                                            r"diffusion_pytorch_model\.safetensors") as info:
        run_job(spec, progress=False)
    assert isinstance(info.value.__cause__, ray.exceptions.RayTaskError)
    assert not (out / "failed").exists() and not (out / "done").exists()


def test_cpu_actors_wait_passively_unless_told_otherwise(local_ray, tiny_vp_dir, inputs,
                                                        tmp_path, monkeypatch):
    spec = make_spec(tiny_vp_dir, inputs, tmp_path, compute={"cpus_per_actor": None})
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    options, threads = actor_options(spec.compute)
    assert options["runtime_env"]["env_vars"]["OMP_WAIT_POLICY"] == "PASSIVE"
    assert (options["num_cpus"], threads) == (2, 2)  # the cluster's 2 CPUs, one actor
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert actor_options(spec.compute)[0]["runtime_env"]["env_vars"]["OMP_WAIT_POLICY"] == "ACTIVE"


def test_run_cli_counts_error_kinds_repeated_keys_and_exits_1_on_a_failed_shard(
        local_ray, tiny_vp_dir, tmp_path):
    """Bad samples of every reader kind and a broken shard through the CLI: the run's last
    lines count error rows by kind and keys repeated across shards; exit codes tell."""
    good = np.zeros((16, 16, 3), np.uint8)
    a, b = tmp_path / "in" / "a-000000.tar", tmp_path / "in" / "b-000001.tar"
    a.parent.mkdir()
    with wds.TarWriter(str(a)) as writer:
        writer.write({"__key__": "k1", "png": png(good)})
        writer.write({"__key__": "k1", "png": png(good)})
        writer.write({"__key__": "k2", "png": b"not an image"})
    with wds.TarWriter(str(b)) as writer:
        writer.write({"__key__": "k1", "png": png(good)})
        writer.write({"__key__": "k3", "png": png_header_only(5000, 5000)})
    broken = tmp_path / "in" / "c-000002.tar"
    broken.write_bytes(b.read_bytes()[:700])
    out = tmp_path / "out"
    job = write_job(tmp_path / "job.yaml", tiny_vp_dir, [str(a), str(b), str(broken)], out,
                    compute={"shard_retries": 0})
    result = CliRunner().invoke(main, ["run", str(job), "--no-progress"])
    assert result.exit_code == 1, result.output
    assert "shards 2 done now, 0 done before, 1 failed (of 3); samples 5, outputs 2 ok / 3 " \
        "error" in result.stdout
    assert "error rows by kind: decode 1, duplicate 1, size 1\nwarnings: " in result.stdout
    assert "keys in more than one shard: 1\n" in result.stdout
    assert f"FAILED {broken}: " in result.stderr
    status = CliRunner().invoke(main, ["status", str(out), "--errors"])
    assert status.exit_code == 1 and "\nwarnings: " in status.output
    assert "error rows: 3\n  k1  a-000000  duplicate  duplicate key k1" in status.output
    assert "  k2  a-000000  decode  cannot decode k2.png" in status.output
    assert "  k3  b-000001  size  image k3.png is 5000x5000 (25,000,000 pixels)" in status.output


def test_limit_shards_says_what_is_left_and_a_log_gets_progress_lines(local_ray, tiny_vp_dir,
                                                                       tmp_path):
    """--limit-shards ended without a word on the shards left; progress written to a file
    or pipe (here the CLI runner's stderr) is plain lines, never '\\r'-redrawn bars."""
    shards = write_shards(tmp_path / "in", n_shards=3, per_shard=1, bad=False)
    job = write_job(tmp_path / "job.yaml", tiny_vp_dir, shards, tmp_path / "out")
    result = CliRunner().invoke(main, ["run", str(job), "--limit-shards", "1"])
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[-1] == (
        "2 shards of 3 not processed yet (--limit-shards 1): run the same command again for "
        "the next 1, or without --limit-shards for all of them")
    assert "\r" not in result.stderr
    lines = result.stderr.splitlines()
    assert lines[0].startswith("test-job: images 0, ") and lines[0].endswith(
        ", starting 1 actor (loading the model)")
    assert lines[-1].startswith("test-job: images 1/1, ") and "shards 1/1 done" in lines[-1]


def test_rays_notice_of_token_authentication_is_dropped_and_its_warnings_kept():
    """A local run began with Ray's "Token authentication is enabled ..." notice, which asks
    nothing of the user (tests/test_quickstart.py checks a whole run's output)."""
    from ray._private.authentication import authentication_token_setup as setup

    pool._quiet_token_notice()
    pool._quiet_token_notice()  # installed once
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())  # type: ignore[method-assign]
    setup.logger.addHandler(handler)
    try:
        setup._warn_token_auth_enabled()
        setup._warn_token_auth_disabled()
    finally:
        setup.logger.removeHandler(handler)
    assert len(seen) == 1 and seen[0].startswith("Token authentication is disabled"), seen
    assert sum(isinstance(f, pool._TokenNotice) for f in setup.logger.filters) == 1


def test_actors_that_fail_while_starting_stop_the_job_with_the_cause(local_ray, tiny_vp_dir,
                                                                     inputs, tmp_path):
    """The issue's case: an actor whose constructor failed for a reason other than its model
    was replaced once per shard attempt, with no limit, and every shard was reported failed."""
    out = tmp_path / "out"
    spec = make_spec(tiny_vp_dir, inputs, out, compute={"shard_retries": 5})
    with pytest.raises(PipelineError, match=r"actors failed to start 3 times in a row; the "
                                            r"last: RuntimeError: test hook: no usable device"):
        run_job(spec, progress=False, hooks=Hooks(fail_start="no usable device"))
    assert not (out / "failed").exists() and not (out / "done").exists()


def test_an_unwritable_failure_record_stops_the_run_with_what_is_left(local_ray, tiny_vp_dir,
                                                                      inputs, tmp_path):
    """The issue's case (18, item 4): writing failed/ raised and the driver died with a
    traceback, the remaining shards neither processed nor recorded."""
    data = Path(inputs[0]).read_bytes()
    bad = tmp_path / "bad-000009.tar"
    bad.write_bytes(data[: len(data) // 2])
    out = tmp_path / "out"
    out.mkdir()
    (out / "failed").write_text("a file where the failed/ folder goes")
    job = write_job(tmp_path / "job.yaml", tiny_vp_dir, [str(bad), *inputs], out,
                    compute={"shard_retries": 0, "actors": 1})
    result = CliRunner().invoke(main, ["run", str(job), "--no-progress"])
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    message = result.stderr
    assert message.startswith("error: cannot write the failure record ")
    assert f"{out}/failed/bad-000009.json: " in message
    assert re.search(r"the run stopped: \d shard\(s\) done now, 1 failed, \d not done "
                     r"\((part-00000\d(, )?)+\); run the same command again", message), message
