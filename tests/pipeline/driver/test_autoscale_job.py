"""A real job on Ray's fake multi-node autoscaler: GPU worker nodes appear for the job's GPU
actors and are removed once it ended. This is also the test of the fake autoscaler itself
(worker nodes of one GPU each added for GPU actors, idle ones removed, every process of the
cluster ended with it): a bare-Ray test of the same cost proved nothing more.

The head has no GPU; the worker type is {CPU: 1, GPU: 1}, min 0, max 2. The job asks for
`compute.device: cuda` with one GPU per actor and up to two actors (4 shards, 2 per actor: the
driver asks for both at once); the fake_gpu test hook (handed to the actors) makes the model run
on CPU, since the GPUs are Ray resources only. The driver is the CLI (with hooks:
tests/support/hooked_cli.py) in its own session, joined to the cluster by address and token.

What autoscaling promises, and what is checked: both pending GPU actors get a GPU node (the
gate hook holds every shard read until the test has seen two GPU nodes, so the second actor is
still pending, and needed, whatever the machine's load); never more nodes than max_workers, of
one GPU each; all the work is done, in the cluster's actor processes; every node that served
is removed once idle; no process of the cluster survives it. How the actors share the shards
once the gate opens depends on timing and is not checked.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import ray

from tests.support import hooked_cli
from tests.support.gated_hooks import GatedHooks
from tests.support.rayhead import (
    connected,
    fake_cluster,
    is_alive,
    kill_session,
    pids_mentioning,
    session_pids,
)
from tests.support.shards import write_job, write_shards

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


def _gpu_nodes() -> dict[str, dict[str, Any]]:
    """Alive nodes with a GPU (dead nodes report no resources)."""
    return {n["NodeID"]: n for n in ray.nodes()
            if n["Alive"] and n["Resources"].get("GPU", 0) > 0}


def _done(out: Path) -> list[str]:
    """Names of the shards committed so far."""
    return sorted(p.name for p in (out / "done").iterdir()) if (out / "done").exists() else []


@pytest.mark.timeout(420)
def test_job_scales_gpu_nodes_up_and_back_down(tiny_vp_dir: Path, tmp_path: Path) -> None:
    inputs = write_shards(tmp_path / "in", n_shards=4, per_shard=2, bad=False)
    out = tmp_path / "out"
    job = write_job(tmp_path / "job.yaml", tiny_vp_dir, inputs, out, "autoscaled",
                    compute={"device": "cuda", "gpus_per_actor": 1, "actors": {"min": 1, "max": 2},
                             "batch_size": 2})
    gate = tmp_path / "gate"
    seen: set[str] = set()
    worker_pids: set[int] = set()
    most_at_once = 0
    with fake_cluster(head_cpus=1, max_workers=2, idle_timeout_minutes=0.1) as info:
        env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_TOKEN_PATH"}
        env.update(info.driver_env())
        with connected(info):
            assert _gpu_nodes() == {} and ray.cluster_resources().get("GPU", 0) == 0
            driver = subprocess.Popen(
                hooked_cli.command(GatedHooks(fake_gpu=True, gate=str(gate)), "run", str(job),
                                   "--address", info.address, "--no-progress"),
                cwd=hooked_cli.ROOT, env=env, stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT, text=True, start_new_session=True)
            try:
                deadline = time.monotonic() + 300
                while driver.poll() is None:
                    assert time.monotonic() < deadline, \
                        (f"the job did not finish in time ({len(seen)} GPU node(s) came up, "
                         f"gate {'open' if gate.exists() else 'closed: two were awaited'})")
                    alive = _gpu_nodes()
                    seen |= alive.keys()
                    most_at_once = max(most_at_once, len(alive))
                    assert all(n["Resources"]["GPU"] == 1 for n in alive.values()), alive
                    worker_pids |= set(pids_mentioning(str(info.temp_dir)))
                    if not gate.exists() and len(alive) == 2:
                        # the gate held the work: nothing is done, so both actors were needed
                        assert _done(out) == [], _done(out)
                        gate.touch()
                    time.sleep(0.5)
                output = driver.stdout.read() if driver.stdout else ""
            finally:
                kill_session(driver.pid, grace=0.5, leader=driver)
            assert driver.returncode == 0, output[-3000:]
            assert gate.exists(), "the job ended before two GPU nodes came up"
            # Idle nodes go away: idle timeout 6 s, autoscaler update every 1 s.
            deadline = time.monotonic() + 90
            while alive := _gpu_nodes():
                seen |= alive.keys()
                assert time.monotonic() < deadline, "idle GPU nodes were not removed"
                time.sleep(0.5)
            removed = {n["NodeID"] for n in ray.nodes() if not n["Alive"]}
    assert "4 done now, 0 done before, 0 failed (of 4)" in output
    markers = [json.loads(p.read_text()) for p in sorted((out / "done").iterdir())]
    assert [m["stem"] for m in markers] == [f"part-{i:06d}" for i in range(4)]
    assert sum(m["outputs_ok"] for m in markers) == 8
    # the work ran in the cluster's actor processes (worker is host:pid), not in the driver
    assert {int(m["worker"].rsplit(":", 1)[1]) for m in markers} <= worker_pids, markers
    assert len(seen) == 2 and most_at_once == 2, (seen, most_at_once)  # never above max 2
    assert seen <= removed, "a GPU node that served the job was not removed"
    assert session_pids(info.pid) == [], "processes of the fake cluster survived"
    assert pids_mentioning(str(info.temp_dir)) == []
    assert worker_pids and not [p for p in worker_pids if is_alive(p)]
