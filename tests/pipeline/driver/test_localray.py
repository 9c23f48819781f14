"""pipeline.driver.localray: a run whose driver was SIGKILLed leaves Ray's per-node agents behind;
the next run ends them, by pid, and touches nothing of a driver that still runs."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from pipeline.driver import localray
from pipeline.worker.hooks import Hooks
from tests.support import hooked_cli
from tests.support.rayhead import kill_session
from tests.support.shards import write_job, write_shards

pytestmark = pytest.mark.slow


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return ""


def test_the_next_run_ends_the_agents_a_killed_driver_left(tiny_vp_dir, tmp_path):
    temp = Path(tempfile.mkdtemp(prefix="lr", dir="/tmp"))  # short: Ray's unix socket paths
    shards = write_shards(tmp_path / "in", n_shards=2, per_shard=2, bad=False)
    job = write_job(tmp_path / "job.yaml", tiny_vp_dir, shards, tmp_path / "out")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["TMPDIR"] = str(temp)  # this run's Ray and its record live under it
    records = temp / f"sdedit-batch-{os.getuid()}" / "local-ray"
    driver = subprocess.Popen(hooked_cli.command(Hooks(batch_delay=30.0), "run", str(job),
                                                 "--no-progress"),
                              env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        agents: list[int] = []
        while len(agents) < 2:
            assert driver.poll() is None, "the driver ended early"
            assert time.monotonic() < deadline, "no local Ray with its agents in time"
            time.sleep(0.5)
            found = list(records.glob("*.json")) if records.exists() else []
            if found:
                session = json.loads(found[0].read_text())["session_dir"]
                agents = [p for p in localray.holders(session)
                          if _cmdline(p).startswith(("ray::DashboardAgent",
                                                     "ray::RuntimeEnvAgent"))]
        os.kill(driver.pid, signal.SIGKILL)  # the driver dies at once, without cleanup
        driver.wait(timeout=30)
        time.sleep(2)  # the GCS and raylet end with their driver (Ray ties their fate)...
        assert all(localray._start_time(p) is not None for p in agents), \
            "the agents ended by themselves: Ray no longer leaves them"  # ...its agents not
        ended = localray.reap(records, grace=0.5)  # what the next run does before it starts Ray
        assert set(agents) <= set(ended)
        assert localray.holders(session) == [] and not list(records.glob("*.json"))
    finally:
        kill_session(driver.pid, grace=0.5, leader=driver)
        shutil.rmtree(temp, ignore_errors=True)


def test_a_record_of_a_driver_that_still_runs_is_left_alone(tmp_path):
    path = localray.record(str(tmp_path / "session"), tmp_path)
    assert path is not None and json.loads(path.read_text())["pid"] == os.getpid()
    (tmp_path / "session").mkdir()
    with open(tmp_path / "session" / "held.log", "w"):  # this process holds a file there
        assert localray.reap(tmp_path) == [] and path.exists()
    localray.forget(path)
    assert not path.exists()
