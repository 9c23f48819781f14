"""The real-cluster test infrastructure: a Ray head child process, and Ray's fake multi-node
autoscaler adding GPU worker nodes for GPU actors and removing them when idle."""

from __future__ import annotations

import os
import time
import urllib.error
import urllib.request
from typing import Any

import pytest
import ray

from tests.support.rayhead import (
    RayHeadInfo,
    connected,
    fake_cluster,
    is_alive,
    pids_mentioning,
    session_pids,
)

pytestmark = pytest.mark.cluster


def _http_status(url: str, token: str | None) -> int:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=5) as r:
            return int(r.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


@pytest.mark.timeout(120)
def test_ray_head_fixture_runs_tasks_and_requires_the_token(ray_connected: RayHeadInfo) -> None:
    info = ray_connected

    @ray.remote(num_cpus=1)
    def where() -> tuple[int, int]:
        return os.getpid(), os.getsid(0)

    pid, sid = ray.get(where.remote(), timeout=60)
    assert sid == info.pid, "workers must stay in the head's session (that is how they are killed)"
    assert pid != os.getpid()
    assert ray.cluster_resources().get("CPU") == 2
    assert ray.cluster_resources().get("GPU", 0) == 0
    assert _http_status(f"{info.dashboard_url}/api/version", info.token) == 200
    assert _http_status(f"{info.dashboard_url}/api/version", None) == 401
    assert info.node_address.endswith(info.address.rsplit(":", 1)[1])


def _alive_gpu_nodes() -> list[dict[str, Any]]:
    return [n for n in ray.nodes() if n["Alive"] and n["Resources"].get("GPU", 0) > 0]


def _wait(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.5)


@pytest.mark.timeout(200)
def test_fake_autoscaler_adds_gpu_nodes_then_removes_idle_ones() -> None:
    started = time.monotonic()
    worker_pids: set[int] = set()
    cluster = fake_cluster(head_cpus=1, max_workers=2, idle_timeout_minutes=0.1)
    with cluster as info, connected(info):
        head_node = ray.get_runtime_context().get_node_id()
        assert ray.cluster_resources().get("GPU", 0) == 0
        assert _alive_gpu_nodes() == []

        @ray.remote(num_gpus=1, num_cpus=1)
        class GpuProbe:
            def node(self) -> str:
                return ray.get_runtime_context().get_node_id()

        actors = [GpuProbe.remote() for _ in range(2)]
        nodes = ray.get([a.node.remote() for a in actors], timeout=120)
        assert len(set(nodes)) == 2 and head_node not in nodes
        gpu_nodes = _alive_gpu_nodes()
        assert {n["NodeID"] for n in gpu_nodes} == set(nodes)
        assert all(n["Resources"]["GPU"] == 1 for n in gpu_nodes)
        worker_pids = set(pids_mentioning(str(info.temp_dir)))

        for actor in actors:
            ray.kill(actor)
        _wait(lambda: not _alive_gpu_nodes(), 90, "idle GPU nodes to be removed")
    assert session_pids(info.pid) == [], "processes of the fake cluster survived"
    assert pids_mentioning(str(info.temp_dir)) == []
    assert worker_pids and not [p for p in worker_pids if is_alive(p)]
    assert time.monotonic() - started < 180
