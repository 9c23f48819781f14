"""Whole jobs on a real S3 server (SeaweedFS on loopback): inputs, model and output on s3://.

Covers: end to end + resume + pyarrow reading the manifests from S3 + no credentials anywhere;
the server restarted mid-job (transient errors retried, nothing lost or duplicated); shards that
stay unreachable (failed/{stem}.json, exit code 1, the rest completes); a read-only output refused
before any model work. In-process jobs share one private local Ray (its own temp dir, so its
actors' logs can be searched); CLI jobs run in their own session with a private RAY_TMPDIR.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pytest
import ray
import yaml

from pipeline.driver import schedule
from pipeline.driver.runner import RunSummary, run_job
from pipeline.job.load import parse_spec
from pipeline.job.spec import JobSpec
from pipeline.output.status import job_status
from pipeline.worker.hooks import Hooks
from tests.support.cli import run_cli_in_session
from tests.support.fixtures import S3Bucket
from tests.support.rayhead import patched_environ, pids_mentioning
from tests.support.seaweed import SeaweedS3
from tests.support.shards import write_shards

pytestmark = [pytest.mark.s3, pytest.mark.slow]

MODEL_CACHE = Path.home() / ".cache" / "sdedit-batch" / "models"


@pytest.fixture(scope="module")
def private_ray(s3_server: SeaweedS3) -> Iterator[Path]:
    """One local Ray for this module in a private temp dir (actor logs under it).

    Its processes are started with the server's AWS_* variables (admin identity), as on a
    cluster whose nodes carry credentials in their environment; this process gets them back
    as they were.
    """
    temp = Path(tempfile.mkdtemp(prefix="rs3", dir="/tmp"))  # short: unix socket paths
    try:
        with patched_environ(s3_server.env()):
            ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                     logging_level=logging.WARNING, _temp_dir=str(temp))
        yield temp
    finally:
        ray.shutdown()
        for pid in pids_mentioning(str(temp)):  # anything ray.shutdown() left behind
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(temp, ignore_errors=True)


def upload_inputs(bucket: S3Bucket, local: Path, prefix: str, n_shards: int,
                  per_shard: int) -> list[str]:
    """Write `n_shards` shards locally and upload them as s3://bucket/in/{prefix}-00000i.tar."""
    paths = write_shards(local, n_shards=n_shards, per_shard=per_shard, bad=False)
    fs = bucket.server.filesystem()
    urls = []
    for i, path in enumerate(paths):
        url = f"{bucket.url}/in/{prefix}-{i:06d}.tar"
        fs.put_file(path, url)
        urls.append(url)
    return urls


def upload_model(bucket: S3Bucket, model_dir: Path) -> str:
    """Copy a local diffusers model directory to s3://bucket/models/tiny."""
    fs = bucket.server.filesystem()
    url = f"{bucket.url}/models/tiny"
    for path in sorted(model_dir.rglob("*")):
        if path.is_file():
            fs.put_file(str(path), f"{url}/{path.relative_to(model_dir).as_posix()}")
    return url


def s3_spec(name: str, model: str, shards: list[str], out: str, options: dict[str, Any],
            model_options: dict[str, Any] | None = None, **compute: Any) -> JobSpec:
    """A tiny CPU job (t0 0.04, one actor); `options` for input and output."""
    return parse_spec({
        "name": name,
        "model": {"source": model, "storage_options": model_options or {}},
        "input": {"shards": shards, "storage_options": options},
        "output": {"path": out, "storage_options": options},
        "sdedit": {"t0": 0.04, "seed": 3},
        "compute": {"device": "cpu", "batch_size": 3, "actors": 1, **compute},
    }, source="test")


def objects_under(bucket: S3Bucket, prefix: str) -> dict[str, bytes]:
    """Every object below s3://bucket/prefix, key relative to prefix -> bytes."""
    fs = bucket.server.filesystem()
    root = f"{bucket.name}/{prefix}".rstrip("/")
    try:
        keys = fs.find(root)
    except FileNotFoundError:
        return {}
    return {key[len(root) + 1:]: fs.cat_file(key) for key in keys}


def ray_logs(temp: Path) -> str:
    """The text of every log file of the private Ray (driver, raylet, actors)."""
    files = {p.resolve() for p in temp.glob("session_*/logs/**/*") if p.is_file()}
    return "\n".join(p.read_text(errors="replace") for p in sorted(files))  # no session_latest


def check_manifests(bucket: S3Bucket, out_prefix: str, keys: set[str]) -> None:
    """Every input key exactly once (one output index) across the manifests, read by pyarrow's
    own S3 client straight from the server."""
    server = bucket.server
    s3 = pafs.S3FileSystem(access_key=server.admin_key, secret_key=server.admin_secret,
                           endpoint_override=server.endpoint_url, region=server.region,
                           scheme="http")
    table = pads.dataset(f"{bucket.name}/{out_prefix}/manifests", format="parquet",
                         filesystem=s3).to_table()
    rows = table.to_pylist()
    counts = collections.Counter((r["key"], r["sample_index"]) for r in rows)
    assert set(counts) == {(key, 0) for key in keys}
    assert set(counts.values()) == {1}, "a sample was written twice"
    assert {r["status"] for r in rows} == {"ok"}
    assert all(r["output_shard"].startswith(f"{bucket.url}/{out_prefix}/shards/") for r in rows)


def input_keys(n_shards: int, per_shard: int) -> set[str]:
    return {f"s{s}_{i:03d}" for s in range(n_shards) for i in range(per_shard)}


def test_s3_job_end_to_end_resume_and_no_credentials(
        private_ray: Path, s3_bucket: S3Bucket, tiny_vp_dir: Path, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    """run_job with storage_options; then a resume with AWS_* env credentials only."""
    caplog.set_level(logging.INFO)
    shards = upload_inputs(s3_bucket, tmp_path / "in", "e2e", n_shards=3, per_shard=3)
    model = upload_model(s3_bucket, tiny_vp_dir)
    out = f"{s3_bucket.url}/out"
    spec = s3_spec("s3-e2e", model, shards, out, s3_bucket.storage_options,
                   model_options=s3_bucket.storage_options)
    cached = MODEL_CACHE / hashlib.sha256(model.encode()).hexdigest()[:20]
    try:
        summary = run_job(spec, progress=False)
        assert (cached / ".complete").exists(), "the model was not copied from s3"
    finally:
        shutil.rmtree(cached, ignore_errors=True)
    assert (summary.shards_done, summary.samples, summary.outputs_ok) == (3, 9, 9)
    assert summary.exit_code == 0

    written = objects_under(s3_bucket, "out")
    stems = ["e2e-000000", "e2e-000001", "e2e-000002"]
    assert sorted(written) == sorted(
        ["job.json", *(f"{d}/{s}.{e}" for s in stems
                       for d, e in (("done", "json"), ("manifests", "parquet"),
                                    ("shards", "tar")))])
    marker = json.loads(written["done/e2e-000001.json"])
    assert marker["input_shard"] == shards[1] and marker["outputs_ok"] == 3
    job = json.loads(written["job.json"])
    assert job["spec"]["output"]["storage_options"]["secret"] == "***"
    check_manifests(s3_bucket, "out", input_keys(3, 3))

    # Resume: one shard's outputs and marker disappear; a rerun redoes exactly that shard.
    # The rerun's spec has no storage options: credentials come from AWS_* variables only.
    fs = s3_bucket.server.filesystem()

    def stamps() -> dict[str, tuple[Any, Any]]:
        fs.invalidate_cache()
        infos = {s: fs.info(f"{s3_bucket.name}/out/done/{s}.json") for s in stems}
        return {s: (i["ETag"], i["LastModified"]) for s, i in infos.items()}

    before = stamps()
    for key in ("done/e2e-000001.json", "shards/e2e-000001.tar",
                "manifests/e2e-000001.parquet"):
        fs.rm_file(f"{s3_bucket.name}/out/{key}")
    with pytest.MonkeyPatch.context() as env:
        for name, value in s3_bucket.env.items():
            env.setenv(name, value)
        try:
            again = run_job(s3_spec("s3-e2e", model, shards, out, {}), progress=False)
        finally:
            shutil.rmtree(cached, ignore_errors=True)
    assert (again.shards_done, again.shards_already_done, again.samples) == (1, 2, 3)
    after = stamps()
    assert after["e2e-000001"] != before["e2e-000001"]
    assert {s: after[s] for s in ("e2e-000000", "e2e-000002")} == {
        s: before[s] for s in ("e2e-000000", "e2e-000002")}, "a done shard was rewritten"
    rerun_written = objects_under(s3_bucket, "out")
    assert rerun_written["shards/e2e-000001.tar"] == written["shards/e2e-000001.tar"]
    check_manifests(s3_bucket, "out", input_keys(3, 3))

    # Credentials: in no log line (driver and actors) and in no object written.
    secret, key_id = s3_bucket.storage_options["secret"], s3_bucket.storage_options["key"]
    logs = ray_logs(private_ray)
    assert len(re.findall("committed shard e2e-000001", logs)) == 2, "actor logs not found"
    assert "starting up to 1 actors" in caplog.text
    assert secret not in caplog.text and secret not in logs
    for name, blob in rerun_written.items():
        assert secret.encode() not in blob and key_id.encode() not in blob, name


def test_s3_outage_mid_job_is_retried_without_loss_or_duplicates(
        private_ray: Path, s3_bucket: S3Bucket, tiny_vp_dir: Path, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    """The S3 server is killed after the first commit and comes back 9-15 s later."""
    caplog.set_level(logging.INFO)
    n_shards = 4
    shards = upload_inputs(s3_bucket, tmp_path / "in", "outage", n_shards=n_shards,
                           per_shard=2)
    # No botocore retries (a refused connection fails at once) and short timeouts (a request
    # to the restarting server gives up after 5 s): the pipeline's own retries carry the job.
    options = s3_bucket.server.storage_options(fast_fail=True)
    options["config_kwargs"].update(connect_timeout=1, read_timeout=5)
    spec = s3_spec("s3-outage", str(tiny_vp_dir), shards, f"{s3_bucket.url}/out", options,
                   batch_size=2, shard_retries=4)
    result: dict[str, Any] = {}

    def run() -> None:
        try:  # hooks handed to the actor: ~1 s a shard
            result["summary"] = run_job(spec, progress=False, hooks=Hooks(batch_delay=0.3))
        except BaseException as exc:
            result["error"] = exc

    probe = s3_bucket.server.filesystem(fast_fail=True)
    done_dir = f"{s3_bucket.name}/out/done"
    thread = threading.Thread(target=run, name="s3-outage-job")
    thread.start()
    try:
        deadline = time.monotonic() + 120
        while True:
            assert thread.is_alive(), f"the job ended before the outage: {result}"
            assert time.monotonic() < deadline, "no shard committed in time"
            try:
                if probe.ls(done_dir, refresh=True):
                    break
            except FileNotFoundError:
                pass
            time.sleep(0.1)
        s3_bucket.server.stop(grace=0.0)
        down_at = time.monotonic()
        time.sleep(5.0)  # refused connections: the job's next I/O fails and is retried
        s3_bucket.server.start()
        outage = time.monotonic() - down_at
    finally:
        thread.join(timeout=240)
        s3_bucket.server.start()
    assert not thread.is_alive(), "the job did not end"
    assert "error" not in result, repr(result.get("error"))
    summary: RunSummary = result["summary"]
    assert (summary.shards_done, summary.failed, summary.samples) == (n_shards, {}, 2 * n_shards)
    probe.invalidate_cache()
    stems = sorted(p.rsplit("/", 1)[1] for p in probe.ls(done_dir, refresh=True))
    assert stems == [f"outage-{i:06d}.json" for i in range(n_shards)]
    check_manifests(s3_bucket, "out", input_keys(n_shards, 2))
    logs = ray_logs(private_ray) + caplog.text
    commits = collections.Counter(re.findall(r"committed shard (outage-\d+)", logs))
    assert commits == {f"outage-{i:06d}": 1 for i in range(n_shards)}, "committed twice"
    retried = re.findall(r"transient error \(attempt|failed \(attempt \d+ of \d+\), retrying",
                         logs)
    assert retried, "no retry happened: the outage missed the job's I/O\n" + logs[-20000:]
    assert outage > 5.0


def test_a_read_that_never_returns_fails_its_attempt_at_the_deadline(
        private_ray: Path, s3_bucket: S3Bucket, tiny_vp_dir: Path, tmp_path: Path) -> None:
    """The issue's case: `ray.wait` had no per-shard deadline, so a hung read hung the job.
    The S3 server holding the input is paused (SIGSTOP: connections open, never answered);
    the output is local, so only the actor's read waits on it."""
    (shard,) = upload_inputs(s3_bucket, tmp_path / "in", "hang", n_shards=1, per_shard=2)
    out = tmp_path / "out"
    spec = parse_spec({
        "name": "hang", "model": {"source": str(tiny_vp_dir)},
        "input": {"shards": [shard], "storage_options": s3_bucket.storage_options},
        "output": {"path": str(out)}, "sdedit": {"t0": 0.04},
        "compute": {"device": "cpu", "actors": 1, "shard_retries": 0, "shard_timeout_s": 4},
    }, source="test")
    result: dict[str, Any] = {}

    def run() -> None:
        try:
            result["summary"] = run_job(spec, progress=False)
        except BaseException as exc:
            result["error"] = exc

    thread = threading.Thread(target=run, name="hung-read-job")
    with s3_bucket.server.paused():
        thread.start()
        thread.join(timeout=120)   # a hang bound, far above the 4 s deadline: not a speed check
        ended_while_paused = not thread.is_alive()
    thread.join(timeout=240)  # (the old code went on once the server answered again)
    assert ended_while_paused, "the job hung on a read that never returns"
    assert "error" not in result, repr(result.get("error"))
    summary: RunSummary = result["summary"]
    assert summary.exit_code == 1 and list(summary.failed) == [shard]
    assert "no result within 4 s (compute.shard_timeout_s)" in summary.failed[shard]
    record = json.loads((out / "failed" / "hang-000000.json").read_text())
    assert record["attempts"] == 1


def _cli_env(bucket: S3Bucket, ray_tmp: Path, readonly: bool = False) -> dict[str, str]:
    """This environment with AWS_* credentials only (no storage options) and a private Ray."""
    drop = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "AWS_PROFILE")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(bucket.server.env(readonly=readonly))
    env["RAY_TMPDIR"] = str(ray_tmp)
    return env


def _run_cli(args: list[str], env: dict[str, str], ray_tmp: Path,
             timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """`python -m pipeline.cli ARGS` in its own session; everything it started is ended."""
    return run_cli_in_session(args, env, timeout, also=pids_mentioning(str(ray_tmp)))


def _write_job(path: Path, spec: dict[str, Any]) -> str:
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def test_unreachable_shards_are_reported_failed_and_the_rest_completes(
        private_ray: Path, s3_bucket: S3Bucket, tiny_vp_dir: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """One input deleted after the job was written, one in a bucket that does not exist."""
    monkeypatch.setattr(schedule, "RETRY_BASE_DELAY", 0.1)  # the retries, not their wait
    ok, gone = upload_inputs(s3_bucket, tmp_path / "in", "part", n_shards=2, per_shard=2)
    s3_bucket.server.filesystem().rm_file(gone)
    lost = "s3://no-such-bucket-sdedit/in/lost-000002.tar"
    out = f"{s3_bucket.url}/out"
    spec = s3_spec("unreachable", str(tiny_vp_dir), [ok, gone, lost], out,
                   s3_bucket.storage_options, shard_retries=1)
    summary = run_job(spec, progress=False)
    assert summary.exit_code == 1 and summary.shards_done == 1
    assert sorted(summary.failed) == sorted([gone, lost])
    written = objects_under(s3_bucket, "out")
    assert sorted(k for k in written if k.startswith(("done/", "failed/"))) == [
        "done/part-000000.json", "failed/lost-000002.json", "failed/part-000001.json"]
    for name, reason in (("part-000001", "FileNotFoundError|NoSuchKey"),
                         ("lost-000002", "bucket does not exist|NoSuchBucket")):
        record = json.loads(written[f"failed/{name}.json"])
        assert record["attempts"] == 2 and re.search(reason, record["error"]), record
    status = job_status(out, s3_bucket.storage_options)
    assert (status.done, status.pending, sorted(status.failed)) == (1, 0, sorted([gone, lost]))
    secret = s3_bucket.storage_options["secret"]
    assert not [k for k, blob in written.items() if secret.encode() in blob]


def test_read_only_output_is_refused_before_any_model_work(
        s3_bucket: S3Bucket, tiny_vp_dir: Path, tmp_path: Path) -> None:
    (shard,) = upload_inputs(s3_bucket, tmp_path / "in", "part", n_shards=1, per_shard=1)
    job = _write_job(tmp_path / "job.yaml", {
        "name": "readonly", "model": {"source": str(tiny_vp_dir)},
        "input": {"shards": shard}, "output": {"path": f"{s3_bucket.url}/out"},
        "sdedit": {"t0": 0.04}, "compute": {"device": "cpu"}})
    ray_tmp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))
    try:
        run = _run_cli(["run", job, "--no-progress"],
                       _cli_env(s3_bucket, ray_tmp, readonly=True), ray_tmp, timeout=120)
        ray_started = (ray_tmp / "ray").exists()
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert run.returncode == 2, run.stdout + run.stderr
    assert re.search(r"output\.path s3://\S+/out: cannot write: AccessDenied", run.stderr)
    assert not ray_started, "Ray was started (and with it actors) for an unwritable output"
    assert objects_under(s3_bucket, "out") == {}
    assert s3_bucket.server.env(readonly=True)["AWS_SECRET_ACCESS_KEY"] not in run.stderr
