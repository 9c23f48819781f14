"""pipeline.output.lease: one run per output. A second run is refused naming the first; a stale
lease (old heartbeat, ended process, unreadable file) is taken over with a warning; the lease
goes at the end, on errors too; on S3 by conditional writes (the tests' SeaweedFS honours
If-None-Match and If-Match). Clocks are injected: nothing here waits for a timeout."""

from __future__ import annotations

import json
import logging
import os
import time

import pytest
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.errors import OutputBusyError
from pipeline.output.folder import OutputFolder
from pipeline.output.lease import Holder
from pipeline.output.leasestore import S3, ConflictError, Plain
from pipeline.storage import join, machine_id, url_fs
from tests.support.fixtures import S3Bucket

GONE_PID = 2**31 - 1
"""A pid no process has (above any pid_max)."""


class Clock:
    """A clock a test moves by hand."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _lease_of(out: str, **holder: object) -> None:
    """A lease file written by another run (fields over a live one of this process)."""
    now = time.time()
    data = {"token": "other", "holder": "bob@elsewhere", "host": "elsewhere", "pid": os.getpid(),
            "machine": machine_id(), "job": "theirs", "started_at": now, "heartbeat_at": now,
            **holder}
    fs, path = url_fs(join(out, "lease.json"))
    fs.makedirs(fs._parent(path), exist_ok=True)
    fs.pipe_file(path, json.dumps(data).encode())


def test_a_second_run_is_refused_naming_the_first_and_its_heartbeat(tmp_path):
    clock = Clock()
    first = OutputFolder(str(tmp_path)).lease("job-a", clock=clock)
    first.acquire()
    clock.now += 12
    with pytest.raises(OutputBusyError) as refused:
        OutputFolder(str(tmp_path)).lease("job-b", clock=clock).acquire()
    message = str(refused.value)
    assert message.startswith(f"output {tmp_path} is being written by another run: ")
    assert f"(pid {os.getpid()}, job job-a) since " in message
    assert "last heartbeat 12 s ago" in message and "older than 300 s is taken over" in message
    state = OutputFolder(str(tmp_path)).lease_state(clock=clock)
    assert state is not None and state.stale is None and state.holder.job == "job-a"
    first.release()
    assert not (tmp_path / "lease.json").exists()
    assert OutputFolder(str(tmp_path)).lease_state() is None


def test_a_stale_lease_is_taken_over_and_its_run_learns_it_lost_it(tmp_path, caplog):
    clock = Clock()
    first = OutputFolder(str(tmp_path)).lease("job-a", clock=clock)
    first.acquire()
    clock.now += 301  # no heartbeat for longer than the timeout (a hung driver)
    second = OutputFolder(str(tmp_path)).lease("job-b", clock=clock)
    with caplog.at_level(logging.WARNING, logger="pipeline.output.lease"):
        second.acquire()
    assert f"output {tmp_path}: took over the lease of " in caplog.text
    assert "last heartbeat 5 min ago; stale: no heartbeat within the 300 s timeout" \
        in caplog.text
    first.renew()  # the first run wakes up: it must stop
    assert first.lost is not None and "this run lost its lease: " in first.lost
    assert "job job-b" in first.lost
    first.release()  # leaves the new holder's lease alone
    assert Holder.from_json((tmp_path / "lease.json").read_bytes()).job == "job-b"
    second.renew()
    assert second.lost is None
    assert Holder.from_json((tmp_path / "lease.json").read_bytes()).heartbeat_at == clock.now
    second.release()
    assert not (tmp_path / "lease.json").exists()


@pytest.mark.parametrize(("holder", "why"), [
    ({"pid": GONE_PID}, f"its process {GONE_PID} on elsewhere has ended"),
    ({"pid": "12"}, "its lease file cannot be read"),
])
def test_a_lease_whose_run_is_gone_is_taken_over_at_once(tmp_path, caplog, holder, why):
    """A driver killed on this machine (its pid gone) need not wait for the timeout."""
    _lease_of(str(tmp_path), **holder)
    with caplog.at_level(logging.WARNING, logger="pipeline.output.lease"), \
            OutputFolder(str(tmp_path)).lease("mine"):
        assert Holder.from_json((tmp_path / "lease.json").read_bytes()).job == "mine"
    assert why in caplog.text
    assert not (tmp_path / "lease.json").exists()


def test_the_lease_goes_on_errors_and_ctrl_c(tmp_path):
    with pytest.raises(KeyboardInterrupt), OutputFolder(str(tmp_path)).lease("job"):
        assert (tmp_path / "lease.json").exists()
        raise KeyboardInterrupt
    assert not (tmp_path / "lease.json").exists()


def test_the_heartbeat_thread_renews_the_lease(tmp_path):
    with OutputFolder(str(tmp_path)).lease("job", heartbeat_s=0.01) as lease:
        first = lease.mine.heartbeat_at
        deadline = time.monotonic() + 30
        while Holder.from_json((tmp_path / "lease.json").read_bytes()).heartbeat_at == first:
            assert time.monotonic() < deadline, "no heartbeat written"
            time.sleep(0.01)
    assert not (tmp_path / "lease.json").exists()


def test_a_store_without_conditional_writes_reads_compares_and_reads_back(memory_root):
    clock = Clock()
    first = OutputFolder(f"{memory_root}/out").lease("a", clock=clock)
    assert isinstance(first.store, Plain)
    first.acquire()
    with pytest.raises(OutputBusyError, match="job a"):
        OutputFolder(f"{memory_root}/out").lease("b", clock=clock).acquire()
    first.release()


@pytest.mark.s3
def test_s3_conditional_writes_make_one_holder(s3_bucket: S3Bucket):
    """SeaweedFS answers 412 to If-None-Match: * on an existing key and to a stale If-Match
    (s3fs maps that 412 to OSError(EINVAL), not FileExistsError: the store reads the status)."""
    out = join(s3_bucket.url, "out")
    options = s3_bucket.storage_options
    fs, path = url_fs(join(out, "lease.json"), options)
    store = S3(fs, path)
    tag = store.write(b"one", None)
    with pytest.raises(ConflictError):
        store.write(b"two", None)  # If-None-Match: * on an existing object
    newer = store.write(b"two", tag)  # If-Match: the ETag read
    with pytest.raises(ConflictError):
        store.write(b"three", tag)  # a stale ETag
    with pytest.raises(ConflictError):
        store.delete(tag)
    store.delete(newer)
    assert store.read() == (None, None) and not store.plain
    clock = Clock()
    first = OutputFolder(out, options).lease("a", clock=clock)
    first.acquire()
    with pytest.raises(OutputBusyError, match=r"job a\) since .* last heartbeat 0 s ago"):
        OutputFolder(out, options).lease("b", clock=clock).acquire()
    clock.now += 400
    second = OutputFolder(out, options).lease("b", clock=clock)
    second.acquire()  # taken over by If-Match on the stale lease's ETag
    first.renew()
    assert first.lost is not None
    second.release()
    assert OutputFolder(out, options).lease_state() is None


def test_status_shows_a_live_lease_and_validate_and_run_refuse_it(tiny_vp_dir, tmp_path):
    from tests.support.shards import write_job, write_shards

    shards = write_shards(tmp_path / "in", n_shards=1, per_shard=1, bad=False)
    out = tmp_path / "out"
    job = write_job(tmp_path / "job.yaml", tiny_vp_dir, shards, out)
    _lease_of(str(out))  # a run of this machine's live process (this one) holds it
    validate = CliRunner().invoke(main, ["validate", str(job)])
    assert validate.exit_code == 2
    assert f"  - output.path: another run is writing to {out}: bob@elsewhere (pid " \
        in validate.output
    run = CliRunner().invoke(main, ["run", str(job), "--no-progress"])
    assert run.exit_code == 2 and "Traceback" not in run.output
    assert run.stderr.startswith(f"error: output {out} is being written by another run: "
                                 "bob@elsewhere (pid ")
    assert not (out / "job.json").exists()  # refused before it wrote anything
    (out / "job.json").write_text(json.dumps({"spec": {"name": "theirs"}, "fingerprint": "f",
                                              "output_affecting": {"fingerprint_version": 1}}))
    status = CliRunner().invoke(main, ["status", str(out)])
    assert "running: bob@elsewhere (pid " in status.output
    _lease_of(str(out), heartbeat_at=time.time() - 3600)
    status = CliRunner().invoke(main, ["status", str(out)])
    assert "lease: bob@elsewhere" in status.output
    assert "last heartbeat 60 min ago; stale: no heartbeat within the 300 s timeout" \
        in status.output
    assert "(the next run takes it over)" in status.output
    validate = CliRunner().invoke(main, ["validate", str(job)])
    assert "# output.path: a stale lease (bob@elsewhere" in validate.output
