"""Every fsspec access of `pipeline/`: URL handling, retries of transient errors, atomic writes.

URLs may be local or remote, credentials in `storage_options` or the environment. Transient
failures are retried, anything else raised at once, and no message carries a credential. See
docs/cluster.md and docs/architecture.md, "the commit protocol"."""

from __future__ import annotations

import errno
import functools
import hashlib
import logging
import os
import random
import socket
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import fsspec
from fsspec.implementations.local import LocalFileSystem

from pipeline.errors import StorageError
from pipeline.redaction import redact_url, remember_secrets, scrub

logger = logging.getLogger(__name__)

T = TypeVar("T")

_TRANSIENT_ERRNOS = frozenset({
    errno.ECONNREFUSED, errno.ECONNRESET, errno.ECONNABORTED, errno.ETIMEDOUT, errno.EHOSTUNREACH,
    errno.ENETUNREACH, errno.ENETDOWN, errno.EPIPE, errno.EAGAIN,
})
_TRANSIENT_CODES = frozenset({
    "InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout", "RequestTimeoutException",
    "Throttling", "ThrottlingException", "TooManyRequestsException", "OperationAborted",
})
_PERMANENT_TYPES: tuple[type[BaseException], ...] = (
    FileNotFoundError, PermissionError, FileExistsError, IsADirectoryError, NotADirectoryError,
    ValueError, TypeError, KeyError, NotImplementedError,
)


def url_fs(
    url: str, storage_options: Mapping[str, Any] | None = None
) -> tuple[fsspec.AbstractFileSystem, str]:
    """`(filesystem, path inside it)` for `url`; secret option values are remembered for `scrub`."""
    options = dict(storage_options or {})
    remember_secrets(options)
    return fsspec.core.url_to_fs(url, **options)


FileSystem = fsspec.AbstractFileSystem
"""The filesystem type `url_fs` returns."""


@functools.lru_cache(maxsize=32)
def _strip_protocol(protocol: str) -> Callable[[str], str]:
    try:
        return fsspec.get_filesystem_class(protocol)._strip_protocol
    except (ImportError, ValueError):  # not installed: fails later, on open
        return lambda url: url.split("://", 1)[-1]


def canonical_path(url: str) -> str:
    """The path fsspec uses for `url`: `file:///a/b` and `/a/b` give the same one."""
    head, sep, _ = url.partition("://")
    return _strip_protocol(head.split("::")[-1] if sep else "file")(url)


def absolute_url(url: str) -> str:
    """`url` readable from any folder and without credentials: local paths made absolute, other
    URLs passed through `redact_url`."""
    head, sep, _ = url.partition("://")
    if not sep:
        return os.path.abspath(os.path.expanduser(url))
    if head == "file":
        return "file://" + os.path.abspath(os.path.expanduser(url[len("file://"):]))
    return redact_url(url)


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    """True for the local filesystem (where directories exist and rename is atomic)."""
    return isinstance(fs, LocalFileSystem)


def join(url: str, *parts: str) -> str:
    """Join path segments onto a URL or local path, keeping its protocol; skips empty parts."""
    base = url
    if not base.endswith("://"):
        base = base.rstrip("/") or "/"
    for part in parts:
        piece = part.strip("/")
        if not piece:
            continue
        base = base + piece if base.endswith("/") else base + "/" + piece
    return base


def is_transient(exc: BaseException) -> bool:
    """Whether `exc` is worth retrying: a network failure, timeout, 5xx or throttling answer.

    Missing objects and permission errors never are, whatever their cause; the `__cause__` /
    `__context__` chain is read because s3fs wraps botocore errors in `OSError`."""
    if isinstance(exc, _PERMANENT_TYPES):
        return False
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        verdict = _classify_one(current)
        if verdict is not None:
            return verdict
        current = current.__cause__ or current.__context__
    return False


def _classify_one(exc: BaseException) -> bool | None:
    """True/False when `exc` alone decides, None when its cause should."""
    status, code = _http_status_and_code(exc)
    if code in _TRANSIENT_CODES:
        return True
    if status is not None:
        return status >= 500 or status in (408, 429)
    module = type(exc).__module__
    name = type(exc).__name__
    if module.startswith("botocore"):
        # EndpointConnectionError, ConnectionClosedError, ConnectTimeoutError, ReadTimeoutError, ...
        if any(word in name for word in ("Connection", "Timeout", "HTTPClientError")):
            return True
        if name in ("ResponseStreamingError", "IncompleteReadError"):
            return True
    if module.startswith("aiohttp"):
        # ClientConnectionError, ServerDisconnectedError, ClientPayloadError, ... (not 4xx).
        return True
    if module.startswith(("urllib3", "requests")) and any(
        word in name for word in ("Connection", "Timeout", "ProtocolError", "IncompleteRead")
    ):
        return True
    if "FSTimeoutError" in name or isinstance(exc, TimeoutError | ConnectionError):
        return True
    if isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNOS:
        return True
    return None


def _http_status_and_code(exc: BaseException) -> tuple[int | None, str | None]:
    """HTTP status and error code carried by botocore ClientError, aiohttp or gcsfs errors."""
    response = getattr(exc, "response", None)
    if isinstance(response, Mapping):
        error = response.get("Error") or {}
        meta = response.get("ResponseMetadata") or {}
        status = meta.get("HTTPStatusCode")
        code = error.get("Code")
        if isinstance(code, str) and code.isdigit() and status is None:
            status = int(code)
        return (int(status) if status is not None else None), (str(code) if code else None)
    for attr in ("status", "status_code", "code"):
        value = getattr(exc, attr, None)
        if isinstance(value, int) and 100 <= value <= 599:
            return value, None
    return None, None


def describe_error(exc: BaseException) -> str:
    """One scrubbed line naming an error: `"AccessDenied: Access Denied."` for S3 errors."""
    current: BaseException | None = exc
    seen: set[int] = set()
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        _status, code = _http_status_and_code(current)
        if code:
            message = (getattr(current, "response", {}) or {}).get("Error", {}).get("Message")
            return scrub(f"{code}: {message or exc}")
        current = current.__cause__
    text = str(exc) or repr(exc)
    return scrub(f"{type(exc).__name__}: {text}")


def with_retries(
    fn: Callable[[], T],
    *,
    what: str,
    url: str = "",
    attempts: int = 5,
    base_delay: float = 0.5,
    max_delay: float = 8.0,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """`fn()`, retrying transient storage errors with exponential backoff and jitter.

    `attempts` counts every call; delays start at `base_delay` seconds, double up to `max_delay`
    and are scaled by a random factor in [0.5, 1). A permanent error is raised at once,
    unchanged; `StorageError` naming `what` and `url` when every attempt failed transiently."""
    if attempts < 1:
        raise ValueError(f"attempts: value {attempts} is below 1")
    last: BaseException | None = None
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as exc:
            if not is_transient(exc):
                raise
            last = exc
            if attempt == attempts:
                break
            delay = min(max_delay, base_delay * 2 ** (attempt - 1)) * (0.5 + random.random() / 2)
            logger.warning(
                "%s %s: transient error (attempt %d/%d), retrying in %.1fs: %s",
                what, redact_url(url), attempt, attempts, delay, describe_error(exc),
            )
            sleep(delay)
    assert last is not None
    raise StorageError(
        scrub(f"{what} {redact_url(url)}: failed after {attempts} attempts: {describe_error(last)}")
    ) from last


def check_writable(
    url: str,
    storage_options: Mapping[str, Any] | None = None,
    *,
    what: str = "output.path",
    attempts: int = 3,
) -> None:
    """Write, read back and delete a probe under `url`, raising `StorageError` if that fails.

    Local directories are created if missing; no bucket is ever created."""
    probe_url = join(url, f".sdedit-write-probe-{uuid.uuid4().hex}")
    payload = b"sdedit-batch write probe\n"
    prefix = f"{what} {redact_url(url)}: cannot write"
    try:
        fs, path = url_fs(probe_url, storage_options)
        if is_local(fs):
            fs.makedirs(fs._parent(path), exist_ok=True)
        for step, call in (
            ("write probe", lambda: fs.pipe_file(path, payload)),
            ("read probe", lambda: fs.cat_file(path)),
            ("delete probe", lambda: fs.rm_file(path)),
        ):
            result = with_retries(call, what=f"{what} {step}", url=url, attempts=attempts)
            if step == "read probe" and result != payload:
                raise StorageError(f"{prefix}: the probe object read back differs")
    except StorageError as exc:
        if str(exc).startswith(prefix):
            raise
        cause = exc.__cause__
        detail = describe_error(cause) if cause is not None else str(exc)
        raise StorageError(f"{prefix}: {detail} (gave up after {attempts} attempts)") from exc
    except Exception as exc:
        raise StorageError(f"{prefix}: {describe_error(exc)}") from exc
    logger.debug("%s %s is writable", what, redact_url(url))


def put_bytes_atomic(
    url: str,
    data: bytes,
    storage_options: Mapping[str, Any] | None = None,
    *,
    attempts: int = 5,
    what: str = "",
) -> None:
    """Write `data` to `url` so that readers see either nothing or the whole object.

    Local: a `temp_name` file in the same folder, fsync, rename. Object stores: one PUT, visible
    only when complete, retried on transient errors. Raises `StorageError` naming the file."""
    where = f"cannot write {what + ' ' if what else ''}{redact_url(url)}"
    fs, path = url_fs(url, storage_options)
    if is_local(fs):
        path = fs._strip_protocol(path)
        directory = os.path.dirname(path) or "."
        tmp = os.path.join(directory, temp_name(os.path.basename(path)))
        try:
            os.makedirs(directory, exist_ok=True)
            with open(tmp, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except OSError as exc:
            raise StorageError(f"{where}: {describe_error(exc)} (writing its temporary file "
                               f"{tmp})") from exc
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return
    try:
        with_retries(lambda: fs.pipe_file(path, data), what="write", url=url, attempts=attempts)
    except StorageError:
        raise  # "write URL: failed after N attempts: ..."
    except Exception as exc:
        raise StorageError(f"{where}: {describe_error(exc)}") from exc


_TEMP = ".tmp-"
"""Temporary files name their writer, `.{name}.tmp-{machine}-{pid}-{random}`, so that a driver
removes only those whose writer is gone, never another run's in the middle of a write."""


@functools.lru_cache(maxsize=1)
def machine_id() -> str:
    """12 hex digits naming this machine's process space (host name, boot id, pid namespace), so
    that a pid recorded here can be checked with `process_alive`."""
    parts = [socket.gethostname()]
    for read, source in ((_read_text, "/proc/sys/kernel/random/boot_id"),
                         (os.readlink, "/proc/self/ns/pid")):
        try:
            parts.append(read(source))
        except OSError:
            parts.append("?")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:12]


def _read_text(path: str) -> str:
    with open(path) as handle:
        return handle.read().strip()

def process_alive(machine: str, pid: int) -> bool | None:
    """Whether process `pid` of `machine` still runs; None when it ran on another machine."""
    if machine != machine_id():
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by another user
        return True
    return True


def temp_name(name: str) -> str:
    """A hidden temporary name for `name` carrying this process, never taken for a result."""
    return f".{name}{_TEMP}{machine_id()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def stale_temp(name: str, age_s: float, max_age_s: float) -> bool:
    """Whether `name`, last written `age_s` seconds ago, is a temporary file whose writer is
    gone: one of an ended process of this machine, or any temporary file untouched for over
    `max_age_s`."""
    if not name.startswith(".") or _TEMP not in name:
        return False
    owner = name.rsplit(_TEMP, 1)[1].split("-")
    if len(owner) == 3 and owner[1].isdigit():
        alive = process_alive(owner[0], int(owner[1]))
        if alive is not None:
            return not alive
    return age_s > max_age_s
