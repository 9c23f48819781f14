"""Secrets never reach a log line, a message or a file: redaction of mappings, URLs and text.

Credentials travel in fsspec `storage_options`, in URLs (`user:password@`, signed query strings)
and in environment variables. This module knows which names are secret, remembers the secret
values it is shown (every `storage.url_fs` call shows it its options) and scrubs them: `redact`
for job.json, `redact_url` for URLs, `scrub` for text, `SecretFilter` for log handlers."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

REDACTED = "***"
SECRET_KEY_PATTERN = re.compile(r"key|secret|token|password|credential|session", re.IGNORECASE)
"""Names of mapping keys, env vars and query parameters whose values are secret."""

_MIN_SECRET_LENGTH = 6
_KNOWN_SECRETS: set[str] = set()


def redact_url(url: str) -> str:
    """`url` without `user:password@` and secret-looking query values."""
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


def _is_secret_name(name: str) -> bool:
    return bool(SECRET_KEY_PATTERN.search(name))


def _hidden_param(name: str) -> bool:
    return _is_secret_name(name) or "signature" in name.lower()


def redact(obj: Any) -> Any:
    """A copy of nested dicts / lists / tuples with values under secret-looking keys as `***`;
    None and empty values are kept, other strings scrubbed."""
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
    """Every string of at least 6 characters under a secret-looking key of a nested dict / list."""
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
    """`text` without known secrets (remembered, `extra`, secret env vars) and URL credentials."""
    secrets = sorted(_KNOWN_SECRETS | _env_secrets() | set(extra), key=len, reverse=True)
    for secret in secrets:
        if secret and secret in text:
            text = text.replace(secret, REDACTED)
    return re.sub(r"(\w+://)[^/@\s:]+:[^/@\s]+@", rf"\1{REDACTED}@", text)


class SecretFilter(logging.Filter):
    """A logging filter that scrubs known secrets from each record; attach it to handlers."""

    def __init__(self, extra_secrets: Iterable[str] = ()) -> None:
        super().__init__()
        self.extra_secrets = {s for s in extra_secrets if s}

    def filter(self, record: logging.LogRecord) -> bool:
        """Rewrite `record.msg` to its scrubbed, formatted text; never drops a record."""
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
