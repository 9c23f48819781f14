"""A real Ray head (and a fake autoscaling multi-node cluster) as a child of the test process.

How a driver on the same machine joins (Ray 2.60, observed):
- `ray start --head` resolves 127.0.0.1 to the node's IP: GCS, raylet and agents listen on the node
  IP or on all interfaces; only the dashboard honours ``--dashboard-host=127.0.0.1``. A driver may
  still pass ``address="127.0.0.1:PORT"`` (or ``info.node_address``); Ray maps it to the node IP.
- Token authentication is on by default. Here the head gets an explicit token
  (``RAY_AUTH_MODE=token``, ``RAY_AUTH_TOKEN=...``), so it never depends on ``~/.ray/auth_token``,
  which other engineers' clusters on this machine share. A driver must have the same two variables
  in its environment (``info.env``) before ``ray.init``; :func:`ray_auth_env` sets them in-process.
  Without them ``ray.init`` fails with "Authentication token is missing or incorrect"; the
  dashboard / Jobs API answers 401 unless sent ``Authorization: Bearer TOKEN``.
- Never use ``address="auto"`` here: it reads ``/tmp/ray/ray_current_cluster`` and otherwise scans
  ``ps`` for any ``gcs_server``, so it can join another engineer's cluster. (``ray.init("auto",
  _temp_dir=info.temp_dir)`` would read this head's own file.)

Process hygiene: the head runs ``ray start --head --block`` with ``start_new_session=True``. Ray's
workers call ``setpgid`` (own process groups) and the fake provider starts worker nodes from the
autoscaler monitor, but none of them leave the session, so :func:`kill_session` ends everything
by session id; processes whose command line names the head's private temp dir are killed too.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

logger = logging.getLogger(__name__)

FAKE_HEAD_TYPE = "ray.head.default"
FAKE_CLUSTER_TEMPLATE = Path(__file__).with_name("fake_cluster.yaml")
MiB = 1024 * 1024


def free_port() -> int:
    """A TCP port free on all interfaces right now (Ray binds some listeners on 0.0.0.0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("0.0.0.0", 0))
        return int(sock.getsockname()[1])


def _proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, session id) of a process from /proc, or None if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2 :].split()
    return fields[0], int(fields[1]), int(fields[3])


def _all_pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def session_pids(sid: int) -> list[int]:
    """Live (non-zombie) processes of session ``sid``."""
    out = []
    for pid in _all_pids():
        stat = _proc_stat(pid)
        if stat is not None and stat[2] == sid and stat[0] != "Z":
            out.append(pid)
    return out


def pids_mentioning(text: str) -> list[int]:
    """Live processes whose command line contains ``text`` (e.g. a private temp dir)."""
    out = []
    needle = text.encode()
    for pid in _all_pids():
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        stat = _proc_stat(pid)
        if needle in cmdline and stat is not None and stat[0] != "Z" and pid != os.getpid():
            out.append(pid)
    return out


def kill_session(
    sid: int,
    *,
    grace: float = 1.0,
    also: Iterable[int] = (),
    leader: subprocess.Popen[bytes] | None = None,
) -> None:
    """End every process of session ``sid`` (plus pids in ``also``): SIGTERM, grace, SIGKILL.

    Zombies count as ended (their parent or pid 1 reaps them); ``leader``, our own child, is
    waited for.
    """
    targets = set(session_pids(sid)) | set(also)
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
        for pid in targets:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while targets and time.monotonic() < deadline:
            time.sleep(0.1)
            if leader is not None:
                leader.poll()
            targets = {p for p in targets if is_alive(p)} | set(session_pids(sid))
        if not targets:
            break
    if leader is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            leader.wait(timeout=5)
    if targets:
        logger.warning("processes still alive after SIGKILL: %s", sorted(targets))


def is_alive(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie."""
    stat = _proc_stat(pid)
    return stat is not None and stat[0] != "Z"


@dataclass(frozen=True)
class RayHeadInfo:
    """Where a started head listens and how to join it.

    Attributes:
        address: GCS address for ``ray.init(address=...)``: ``"127.0.0.1:PORT"``.
        node_address: the same on the node IP Ray advertises (``"192.0.2.2:PORT"``).
        dashboard_url: ``http://127.0.0.1:PORT`` (Jobs API; send the token as a Bearer header).
        token: the cluster's auth token.
        env: ``RAY_AUTH_MODE`` and ``RAY_AUTH_TOKEN`` for any driver / CLI subprocess.
        temp_dir: the head's private ``--temp-dir`` (session logs under ``session_latest``).
        pid: pid of ``ray start --block`` (also its process group and session id).
    """

    address: str
    node_address: str
    dashboard_url: str
    token: str
    env: Mapping[str, str]
    temp_dir: Path
    pid: int

    def driver_env(self) -> dict[str, str]:
        """``env`` plus ``RAY_ADDRESS`` and ``RAY_API_SERVER_ADDRESS``, for a subprocess driver."""
        return {**self.env, "RAY_ADDRESS": self.address,
                "RAY_API_SERVER_ADDRESS": self.dashboard_url}


class RayHead:
    """``ray start --head --block`` in its own session, private temp dir and explicit ports."""

    def __init__(
        self,
        *,
        num_cpus: int = 1,
        num_gpus: int = 0,
        resources: Mapping[str, float] | None = None,
        object_store_memory: int = 128 * MiB,
        autoscaling_config: Mapping[str, Any] | None = None,
        extra_env: Mapping[str, str] | None = None,
        keep_temp: bool = False,
    ) -> None:
        self.num_cpus = num_cpus
        self.num_gpus = num_gpus
        self.resources = dict(resources or {})
        self.object_store_memory = object_store_memory
        self.autoscaling_config = autoscaling_config
        self.extra_env = dict(extra_env or {})
        self.keep_temp = keep_temp
        self.token = secrets.token_hex(16)
        self.gcs_port = free_port()
        self.dashboard_port = free_port()
        # Short path: Ray puts unix sockets under it (107-byte limit).
        self.temp_dir = Path(tempfile.mkdtemp(prefix="rh", dir="/tmp"))
        self.info: RayHeadInfo | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: Any = None

    def command(self) -> list[str]:
        """The ``ray start`` command line."""
        ray_exe = shutil.which("ray") or str(Path(sys.executable).parent / "ray")
        cmd = [
            ray_exe, "start", "--head", "--block",
            f"--port={self.gcs_port}",
            "--include-dashboard=true", "--dashboard-host=127.0.0.1",
            f"--dashboard-port={self.dashboard_port}",
            # These default to fixed ports (10001, 52365): pick free ones to coexist.
            f"--ray-client-server-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}",
            f"--num-cpus={self.num_cpus}", f"--num-gpus={self.num_gpus}",
            f"--object-store-memory={self.object_store_memory}",
            f"--temp-dir={self.temp_dir}",
            "--disable-usage-stats",
        ]
        if self.resources:
            cmd.append(f"--resources={json.dumps(self.resources)}")
        if self.autoscaling_config is not None:
            path = self.temp_dir / "autoscaling.yaml"
            path.write_text(json.dumps(self.autoscaling_config, indent=1))
            cmd.append(f"--autoscaling-config={path}")
        return cmd

    def environment(self) -> dict[str, str]:
        """The head's environment: ours minus RAY_ADDRESS, plus the token and ``extra_env``."""
        dropped = ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH")
        env = {k: v for k, v in os.environ.items() if k not in dropped}
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=self.token, RAY_USAGE_STATS_ENABLED="0")
        env.update(self.extra_env)
        return env

    def start(self, timeout: float = 120.0) -> RayHeadInfo:
        """Start the head and wait until the GCS accepts connections and the dashboard answers.

        Raises:
            RuntimeError: it exited or was not ready in time (everything started is stopped;
                the message holds the log tail).
        """
        log_path = self.temp_dir / "head.log"
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        self._proc = subprocess.Popen(
            self.command(), env=self.environment(), stdout=self._log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )
        started = time.monotonic()
        try:
            self._wait_ready(started + timeout)
        except BaseException:
            tail = self.log_tail()
            self.stop(grace=0.5)
            logger.error("Ray head failed to start; log tail:\n%s", tail)
            raise
        node_address = (self.temp_dir / "ray_current_cluster").read_text().strip()
        self.info = RayHeadInfo(
            address=f"127.0.0.1:{self.gcs_port}",
            node_address=node_address,
            dashboard_url=f"http://127.0.0.1:{self.dashboard_port}",
            token=self.token,
            env={"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token},
            temp_dir=self.temp_dir,
            pid=self._proc.pid,
        )
        logger.info("Ray head %s ready in %.1fs", node_address, time.monotonic() - started)
        return self.info

    def _wait_ready(self, deadline: float) -> None:
        assert self._proc is not None
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"ray start exited with {self._proc.returncode}:\n"
                                   f"{self.log_tail()}")
            if (
                "Ray runtime started" in self.log_tail(200)
                and (self.temp_dir / "ray_current_cluster").exists()
                and self._dashboard_ok()
            ):
                return
            time.sleep(0.3)
        raise RuntimeError(f"Ray head not ready in time:\n{self.log_tail()}")

    def _dashboard_ok(self) -> bool:
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.dashboard_port}/api/version",
            headers={"Authorization": f"Bearer {self.token}"},
        )
        try:
            with urllib.request.urlopen(request, timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def log_tail(self, lines: int = 40) -> str:
        """Last lines of the ``ray start`` output and, if present, of the autoscaler log."""
        parts = []
        for path in [self.temp_dir / "head.log",
                     self.temp_dir / "session_latest" / "logs" / "monitor.log"]:
            if path.exists():
                text = path.read_text(errors="replace").splitlines()[-lines:]
                parts.append(f"--- {path.name}\n" + "\n".join(text))
        return "\n".join(parts)

    def stop(self, grace: float = 1.0) -> None:
        """End every process of the head's session (fake worker nodes included); remove temp."""
        if self._proc is not None:
            stray = pids_mentioning(str(self.temp_dir))
            kill_session(self._proc.pid, grace=grace, also=stray, leader=self._proc)
            leftovers = pids_mentioning(str(self.temp_dir))
            if leftovers:
                kill_session(self._proc.pid, grace=0.0, also=leftovers)
            self._proc = None
        if self._log is not None:
            self._log.close()
            self._log = None
        if not self.keep_temp:
            shutil.rmtree(self.temp_dir, ignore_errors=True)

    def __enter__(self) -> RayHeadInfo:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


@contextlib.contextmanager
def patched_environ(updates: Mapping[str, str], remove: Iterable[str] = ()) -> Iterator[None]:
    """``os.environ`` with `updates` set and `remove` unset inside the block; restored after."""
    saved = {k: os.environ.get(k) for k in (*updates, *remove)}
    for key in remove:
        os.environ.pop(key, None)
    os.environ.update(updates)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def ray_auth_env(info: RayHeadInfo) -> Iterator[None]:
    """Put the head's auth variables into ``os.environ`` (for an in-process driver); restore after.

    Also drops Ray's cached token, which the C++ loader keeps per process.
    """
    with patched_environ(info.env, remove=["RAY_AUTH_TOKEN_PATH"]):
        _reset_ray_token_cache()
        try:
            yield
        finally:
            _reset_ray_token_cache()


def _reset_ray_token_cache() -> None:
    try:
        from ray._raylet import AuthenticationTokenLoader, Config

        AuthenticationTokenLoader.instance().reset_cache()
        Config.initialize("")
    except (ImportError, AttributeError):  # other Ray versions: nothing cached to drop
        pass


@contextlib.contextmanager
def connected(info: RayHeadInfo, **init_kwargs: Any) -> Iterator[Any]:
    """``ray.init(address=info.address)`` with the head's token; ``ray.shutdown()`` after."""
    import ray

    with ray_auth_env(info):
        init_kwargs.setdefault("log_to_driver", False)
        init_kwargs.setdefault("logging_level", logging.WARNING)
        context = ray.init(address=info.address, **init_kwargs)
        try:
            yield context
        finally:
            ray.shutdown()


def fake_cluster_config(
    *,
    gcs_address: str,
    head_cpus: int = 1,
    worker_types: Mapping[str, Mapping[str, Any]] | None = None,
    max_workers: int = 2,
    idle_timeout_minutes: float = 0.1,
    upscaling_speed: float = 1.0,
) -> dict[str, Any]:
    """The ``fake_multinode`` autoscaling config: ``fake_cluster.yaml`` with these values.

    ``worker_types`` replaces the template's worker types (default: ``gpu_worker`` with
    ``{CPU: 1, GPU: 1}``, min 0, max 2); each needs ``resources``, ``node_config``,
    ``min_workers`` and ``max_workers``.
    """
    config: dict[str, Any] = yaml.safe_load(FAKE_CLUSTER_TEMPLATE.read_text())
    config["provider"]["gcs_address"] = gcs_address
    node_types = config["available_node_types"]
    node_types[FAKE_HEAD_TYPE]["resources"] = {"CPU": head_cpus}
    if worker_types is not None:
        config["available_node_types"] = {
            FAKE_HEAD_TYPE: node_types[FAKE_HEAD_TYPE],
            **{name: dict(spec) for name, spec in worker_types.items()},
        }
    config.update(max_workers=max_workers, idle_timeout_minutes=idle_timeout_minutes,
                  upscaling_speed=upscaling_speed)
    return config


@contextlib.contextmanager
def fake_cluster(
    *,
    head_cpus: int = 1,
    worker_types: Mapping[str, Mapping[str, Any]] | None = None,
    max_workers: int = 2,
    idle_timeout_minutes: float = 0.1,
    extra_env: Mapping[str, str] | None = None,
    timeout: float = 120.0,
) -> Iterator[RayHeadInfo]:
    """A head with no GPU whose autoscaler adds / removes fake worker nodes on this machine.

    Worker nodes are real raylets started by the head's autoscaler (``RAY_FAKE_CLUSTER=1``,
    provider ``fake_multinode``), with the resources of their node type. Everything ends with the
    head's session on exit, even on failure. Yields the head's :class:`RayHeadInfo`.
    """
    import ray._private.services as services

    head = RayHead(num_cpus=head_cpus, num_gpus=0, extra_env={
        "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1", **(extra_env or {})})
    try:
        node_ip = services.resolve_ip_for_localhost("127.0.0.1")  # what the head advertises
        head.autoscaling_config = fake_cluster_config(
            gcs_address=f"{node_ip}:{head.gcs_port}", head_cpus=head_cpus,
            worker_types=worker_types, max_workers=max_workers,
            idle_timeout_minutes=idle_timeout_minutes,
        )
        yield head.start(timeout=timeout)
    finally:
        head.stop()
