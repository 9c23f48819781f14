"""Storage helpers over fsspec: URL handling, retries of transient errors, atomic writes, redaction.

Used by the reader and writer; no click, no ray. Every URL may be local (``/data/x``,
``file:///data/x``) or remote (``s3://bucket/x``, ``gs://...``, ``https://...``); remote credentials
travel as fsspec ``storage_options`` (for s3fs: ``key``, ``secret``, ``client_kwargs``...) or come
from the environment (``AWS_ACCESS_KEY_ID``...).

Error policy: transient failures (connection refused/reset, timeouts, HTTP 5xx, throttling) are
retried by :func:`with_retries`; anything else (missing object, permission denied) is raised at
once. Messages never contain credentials: :func:`scrub` removes every secret this module has seen
(see :func:`remember_secrets`) and the user:password part of URLs.
"""

from __future__ import annotations

import errno
import logging
import os
import random
import re
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import fsspec
from fsspec.implementations.local import LocalFileSystem

from pipeline.errors import StorageError

logger = logging.getLogger(__name__)

T = TypeVar("T")

REDACTED = "***"
SECRET_KEY_PATTERN = re.compile(r"key|secret|token|password|credential|session", re.IGNORECASE)
"""Mapping keys (and env var / query parameter names) whose values are treated as secrets."""

_MIN_SECRET_LENGTH = 6
_KNOWN_SECRETS: set[str] = set()

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
    """Resolve ``url`` to ``(filesystem, path inside it)`` with ``fsspec.core.url_to_fs``.

    Secret-looking values of ``storage_options`` are remembered so that logs and error messages
    can be scrubbed of them (see :func:`scrub`).
    """
    options = dict(storage_options or {})
    remember_secrets(options)
    return fsspec.core.url_to_fs(url, **options)


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    """True for the local filesystem (where directories exist and rename is atomic)."""
    return isinstance(fs, LocalFileSystem)


def join(url: str, *parts: str) -> str:
    """Join path segments onto a URL or local path, keeping its protocol.

    ``join("s3://b/out/", "shards", "a.tar") == "s3://b/out/shards/a.tar"``;
    ``join("/data", "x") == "/data/x"``; empty parts are skipped.
    """
    base = url
    if not base.endswith("://"):
        base = base.rstrip("/") or "/"
    for part in parts:
        piece = part.strip("/")
        if not piece:
            continue
        base = base + piece if base.endswith("/") else base + "/" + piece
    return base


def redact_url(url: str) -> str:
    """Drop ``user:password@`` and secret-looking query values (signatures, tokens) from a URL."""
    try:
        split = urlsplit(url)
    except ValueError:
        return url
    if not split.scheme or not split.netloc:
        return url
    netloc = split.netloc
    if "@" in netloc:
        netloc = REDACTED + "@" + netloc.rsplit("@", 1)[1]
    query = split.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode([(k, REDACTED if _hidden_param(k) else v) for k, v in pairs])
    return urlunsplit((split.scheme, netloc, split.path, query, split.fragment))


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` is worth retrying: a network failure, timeout, 5xx or throttling answer.

    ``FileNotFoundError``, ``PermissionError`` (403 / AccessDenied) and other permanent errors are
    never transient, even when caused by a transient-looking error. The ``__cause__`` /
    ``__context__`` chain is inspected because s3fs wraps botocore errors in ``OSError``.
    """
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
    """True/False when ``exc`` alone decides transience, None when its cause should decide."""
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
    """One scrubbed line naming an error: ``"AccessDenied: Access Denied."`` for S3 errors."""
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
    """Call ``fn()``; retry transient storage errors with exponential backoff and jitter.

    Args:
        fn: the operation, without arguments (use a lambda or functools.partial).
        what: what is being done, for messages: ``"write manifest"``, ``"output.path"``.
        url: the location involved, for messages (credentials are scrubbed).
        attempts: total number of calls, at least 1.
        base_delay: seconds before the 2nd call; doubles each time, capped at ``max_delay``,
            then multiplied by a random factor in [0.5, 1).
        max_delay: cap of one delay, in seconds.
        sleep: the sleep function (tests pass a fake).

    Returns:
        What ``fn`` returns.

    Raises:
        The original exception at once if it is not transient (``FileNotFoundError``,
        ``PermissionError``, ...), so that callers can act on it; ``StorageError`` naming ``what``
        and ``url`` when every attempt failed with a transient error.
    """
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
    """Write, read back and delete a tiny probe object under ``url``; refuse early if that fails.

    Local directories are created if missing; no bucket is ever created. Transient errors are
    retried ``attempts`` times in all.

    Raises:
        StorageError: ``"output.path s3://b/out: cannot write: AccessDenied: Access Denied."``.
    """
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
) -> None:
    """Write ``data`` to ``url`` so that readers see either nothing or the complete object.

    Local files: write ``<name>.tmp-<random>`` in the same directory, fsync, ``os.replace``.
    Object stores: ``fs.pipe_file``, one PUT (s3fs: a multipart upload above 50 MiB, completed at
    the end), visible only when complete; transient errors are retried (a PUT is idempotent).

    Raises:
        StorageError: after ``attempts`` transient failures; permanent errors (e.g.
        ``PermissionError``) propagate unchanged.
    """
    fs, path = url_fs(url, storage_options)
    if is_local(fs):
        path = fs._strip_protocol(path)
        directory = os.path.dirname(path) or "."
        os.makedirs(directory, exist_ok=True)
        tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex[:12]}")
        try:
            with open(tmp, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return
    with_retries(lambda: fs.pipe_file(path, data), what="write", url=url, attempts=attempts)


def _is_secret_name(name: str) -> bool:
    return bool(SECRET_KEY_PATTERN.search(name))


def _hidden_param(name: str) -> bool:
    return _is_secret_name(name) or "signature" in name.lower()


def redact(obj: Any) -> Any:
    """A copy of nested dicts/lists/tuples; values under secret-looking keys become ``***``.

    Keys matching ``key|secret|token|password|credential|session`` (any case, anywhere in the
    name) are secret; ``None`` and empty values stay as they are. Strings elsewhere are scrubbed of
    known secrets and URL credentials.
    """
    if isinstance(obj, Mapping):
        out: dict[Any, Any] = {}
        for key, value in obj.items():
            if isinstance(key, str) and _is_secret_name(key) and value not in (None, "", {}, []):
                out[key] = REDACTED
            else:
                out[key] = redact(value)
        return out
    if isinstance(obj, list):
        return [redact(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(redact(v) for v in obj)
    if isinstance(obj, str):
        return scrub(obj)
    return obj


def secret_values(obj: Any, *, under_secret: bool = False) -> set[str]:
    """Every string (at least 6 chars) under a secret-looking key anywhere in a nested dict/list."""
    if isinstance(obj, str):
        return {obj} if under_secret and len(obj) >= _MIN_SECRET_LENGTH else set()
    found: set[str] = set()
    if isinstance(obj, Mapping):
        for key, value in obj.items():
            secret = under_secret or (isinstance(key, str) and _is_secret_name(key))
            found |= secret_values(value, under_secret=secret)
    elif isinstance(obj, list | tuple):
        for value in obj:
            found |= secret_values(value, under_secret=under_secret)
    return found


def remember_secrets(obj: Any) -> None:
    """Add the secret values of a nested dict (e.g. storage_options) to the scrub list."""
    _KNOWN_SECRETS.update(secret_values(obj))


def _env_secrets() -> set[str]:
    return {
        value
        for name, value in os.environ.items()
        if _is_secret_name(name) and not name.endswith("_ID") and len(value) >= _MIN_SECRET_LENGTH
    }


def scrub(text: str, extra: Iterable[str] = ()) -> str:
    """Replace known secrets (remembered, ``extra``, secret env vars) and URL credentials."""
    secrets = sorted(_KNOWN_SECRETS | _env_secrets() | set(extra), key=len, reverse=True)
    for secret in secrets:
        if secret and secret in text:
            text = text.replace(secret, REDACTED)
    return re.sub(r"(\w+://)[^/@\s:]+:[^/@\s]+@", rf"\1{REDACTED}@", text)


class SecretFilter(logging.Filter):
    """A logging filter that scrubs known secret strings from each record's message.

    Attach it to handlers (handler filters see records from every logger):
    ``handler.addFilter(SecretFilter())``. Secrets come from :func:`remember_secrets` (every
    ``storage_options`` passed to :func:`url_fs`), secret-looking environment variables, and
    ``extra_secrets``.
    """

    def __init__(self, extra_secrets: Iterable[str] = ()) -> None:
        super().__init__()
        self.extra_secrets = {s for s in extra_secrets if s}

    def filter(self, record: logging.LogRecord) -> bool:
        """Rewrite ``record.msg`` to its scrubbed, formatted text; never drops a record."""
        try:
            message = record.getMessage()
        except Exception:
            return True
        cleaned = scrub(message, self.extra_secrets)
        if cleaned != message or record.args:
            record.msg = cleaned
            record.args = None
        if record.exc_info and record.exc_info[1] is not None and not record.exc_text:
            formatter = logging.Formatter()
            record.exc_text = scrub(formatter.formatException(record.exc_info), self.extra_secrets)
        elif record.exc_text:
            record.exc_text = scrub(record.exc_text, self.extra_secrets)
        return True
