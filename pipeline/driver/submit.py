"""Submit a job to a Ray cluster through the Ray Jobs API; follow its logs; query its status.

The job is validated here and its resolved YAML is the submission's whole `working_dir`; the
cluster runs `sdedit-batch run job.yaml --address auto`, whose exit code the submission reports.
See docs/cluster.md."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shlex
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from pipeline.errors import PipelineError
from pipeline.job.load import apply_overrides, load_spec
from pipeline.job.spec import JobSpec
from pipeline.redaction import redact_url, scrub

logger = logging.getLogger(__name__)

JOB_FILE = "job.yaml"
"""Name of the resolved job file inside the submission's working_dir."""
SUBMISSION_PREFIX = "raysubmit_"
"""Prefix of the submission ids that Ray generates."""
ENV_PREFIX = "SDEDIT_BATCH_"
"""Local environment variables with this prefix are passed to the submitted driver."""
_ADDRESS_ENV = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")
_TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


@dataclass(frozen=True)
class SubmissionStatus:
    """What the Jobs API knows about one submission, and the job's `job_name` and `output` from
    its metadata (None when not made by `sdedit-batch submit`); `status` is PENDING, RUNNING,
    SUCCEEDED, FAILED or STOPPED; exit code, Ray job id and times are None until known."""

    submission_id: str
    status: str
    message: str | None = None
    entrypoint: str = ""
    driver_exit_code: int | None = None
    ray_job_id: str | None = None
    job_name: str | None = None
    output: str | None = None
    start_time: float | None = None
    end_time: float | None = None

    @property
    def terminal(self) -> bool:
        """Whether the submission has ended (SUCCEEDED, FAILED or STOPPED)."""
        return self.status in _TERMINAL

    @property
    def exit_code(self) -> int:
        """0 when it succeeded; the driver's exit status when it failed (1 if unknown)."""
        if self.status == "SUCCEEDED":
            return 0
        return self.driver_exit_code or 1


def is_submission_id(text: str) -> bool:
    """Whether `text` looks like a Ray submission id (`raysubmit_...`)."""
    return text.startswith(SUBMISSION_PREFIX) and "/" not in text


@contextlib.contextmanager
def _explicit_address(address: str | None) -> Iterator[None]:
    """An explicit `address` wins over RAY_API_SERVER_ADDRESS / RAY_ADDRESS, which Ray's client
    would let override it (they are hidden while the client is built)."""
    if address is None:
        yield
        return
    saved = {name: os.environ.pop(name) for name in _ADDRESS_ENV if name in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def job_client(address: str | None) -> Any:
    """A `JobSubmissionClient` for the dashboard at `address` (`http://HEAD:8265`; None: from
    RAY_API_SERVER_ADDRESS / RAY_ADDRESS). PipelineError when there is none, it cannot be reached
    or it refused the token."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    if address is None and not any(os.environ.get(name) for name in _ADDRESS_ENV):
        raise PipelineError("no Ray Jobs API address: pass --address http://HEAD:8265 or set "
                            "RAY_API_SERVER_ADDRESS")
    where = redact_url(address) if address else "RAY_API_SERVER_ADDRESS/RAY_ADDRESS"
    try:
        with _explicit_address(address):
            return JobSubmissionClient(address)
    except (ConnectionError, RuntimeError, ValueError, OSError, AuthenticationError) as exc:
        hint = (" Set RAY_AUTH_TOKEN (and RAY_AUTH_MODE=token) to the cluster's token."
                if isinstance(exc, AuthenticationError) else "")
        raise PipelineError(f"cannot reach the Ray Jobs API at {where}: "
                            f"{_one_line(exc).rstrip('.')}.{hint}") from exc


def stage_job(job: str, overrides: Sequence[str], directory: Path) -> JobSpec:
    """Validate `job` with `overrides` and write the resolved YAML to `directory/job.yaml`, so
    that `--set` values never show in the entrypoint; SpecError lists every problem."""
    spec = load_spec(job, overrides)
    data = yaml.safe_load(Path(job).read_text(encoding="utf-8")) or {}
    resolved = apply_overrides(data, overrides)
    target = directory / JOB_FILE
    target.write_text(yaml.safe_dump(resolved, sort_keys=False), encoding="utf-8")
    target.chmod(0o600)
    for url in (*spec.input.shards, spec.output.path):
        if "://" not in url and not os.path.isabs(url):
            logger.warning("%s is a relative path: on the cluster it resolves against the "
                           "submission's working directory; use an absolute path or a URL",
                           url)
    return spec


def entrypoint_command() -> str:
    """The shell command the cluster runs for a submission."""
    return shlex.join(["sdedit-batch", "run", JOB_FILE, "--address", "auto", "--no-progress"])


def submit(job: str, address: str | None, overrides: Sequence[str] = (), *,
           submission_id: str | None = None) -> tuple[str, JobSpec]:
    """Submit `job` to the Jobs API at `address`; returns (submission id, the validated spec).
    SpecError for an invalid job (nothing submitted), PipelineError when the Jobs API is
    unreachable or refuses."""
    with tempfile.TemporaryDirectory(prefix="sdedit-submit-") as folder:
        spec = stage_job(job, overrides, Path(folder))
        client = job_client(address)
        env = {k: v for k, v in os.environ.items() if k.startswith(ENV_PREFIX)}
        runtime_env: dict[str, Any] = {"working_dir": folder}
        if env:
            runtime_env["env_vars"] = env
        metadata = {"sdedit_job": spec.name, "sdedit_output": scrub(spec.output.path)}
        try:
            sid = client.submit_job(entrypoint=entrypoint_command(), runtime_env=runtime_env,
                                    metadata=metadata, submission_id=submission_id)
        except (RuntimeError, ConnectionError, OSError) as exc:
            raise PipelineError(f"the Ray Jobs API refused the submission: "
                                f"{_one_line(exc)}") from exc
    logger.info("submitted job %s as %s", spec.name, sid)
    return str(sid), spec


def submission_status(address: str | None, submission_id: str,
                      client: Any | None = None) -> SubmissionStatus:
    """The current status of `submission_id`; PipelineError when the Jobs API cannot be reached
    or knows no such submission."""
    client = client or job_client(address)
    try:
        info = client.get_job_info(submission_id)
    except RuntimeError as exc:
        raise PipelineError(f"submission {submission_id}: {_one_line(exc)}") from exc
    metadata = info.metadata or {}
    return SubmissionStatus(
        submission_id=submission_id, status=str(info.status), message=info.message,
        entrypoint=info.entrypoint, driver_exit_code=info.driver_exit_code,
        ray_job_id=info.job_id, job_name=metadata.get("sdedit_job"),
        output=metadata.get("sdedit_output"),
        start_time=info.start_time / 1000 if info.start_time else None,
        end_time=info.end_time / 1000 if info.end_time else None)


def follow(address: str | None, submission_id: str, write: Callable[[str], None], *,
           poll_seconds: float = 1.0, timeout: float | None = None) -> SubmissionStatus:
    """Stream the driver's output to `write` until the submission ends and return its status,
    polling when the log stream breaks; PipelineError when unreachable or after `timeout`
    seconds."""
    client = job_client(address)
    deadline = None if timeout is None else time.monotonic() + timeout

    async def tail() -> None:
        async for chunk in client.tail_job_logs(submission_id):
            write(chunk)

    try:
        asyncio.run(asyncio.wait_for(tail(), timeout))
    except asyncio.TimeoutError as exc:
        raise PipelineError(f"submission {submission_id}: still running after {timeout} s"
                            ) from exc
    except Exception as exc:  # the stream broke; the job itself may be fine
        logger.warning("log stream of %s ended early (%s); polling its status",
                       submission_id, _one_line(exc))
    while True:
        status = submission_status(address, submission_id, client)
        if status.terminal:
            return status
        if deadline is not None and time.monotonic() > deadline:
            raise PipelineError(f"submission {submission_id}: still {status.status} after "
                                f"{timeout} s")
        time.sleep(poll_seconds)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return scrub(text[:500])


def describe(status: SubmissionStatus) -> list[str]:
    """Lines for `sdedit-batch status SUBMISSION_ID`."""
    ended = f" (exit code {status.exit_code})" if status.terminal else ""
    lines = [f"submission {status.submission_id}: {status.status}{ended}"]
    if status.job_name or status.output:
        lines.append(f"job {status.job_name or '?'} -> {status.output or '?'}")
    if status.message:
        lines.append(f"message: {status.message}")
    if status.start_time:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(status.start_time))
        seconds = (status.end_time or time.time()) - status.start_time
        verb = "ran" if status.terminal else "running for"
        lines.append(f"started {started}, {verb} {seconds:.0f} s")
    return lines
