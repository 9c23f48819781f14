"""The real-cluster test infrastructure: a Ray head child process that requires its token.
(Ray's fake multi-node autoscaler adding and removing GPU worker nodes is tested with a real
job: tests/pipeline/driver/test_autoscale_job.py.)"""

from __future__ import annotations

import os
import urllib.error
import urllib.request

import pytest
import ray

from tests.support.rayhead import RayHeadInfo

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
