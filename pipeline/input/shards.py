"""Input shard listing: the job's `input.shards` patterns as shard URLs, and each shard's stem.

Brace ranges and lists are expanded without touching storage, globs and folders are listed
through fsspec, plain URLs are kept; `shard_stem` names a shard's outputs. See docs/inputs.md."""

from __future__ import annotations

import logging
import posixpath
from collections.abc import Mapping, Sequence
from typing import Any

from braceexpand import UnbalancedBracesError, braceexpand

from pipeline.errors import PipelineError, StorageError
from pipeline.storage import canonical_path, describe_error, url_fs
from sdedit import quoted

logger = logging.getLogger(__name__)

_GLOB_CHARS = ("*", "?", "[")
_NO_GLOB_PROTOCOLS = ("http", "https")  # '?' starts a query string there, and no listing
_TAR_SUFFIXES = (".tar.gz", ".tgz", ".tar")


def _protocol(url: str) -> str | None:
    """The protocol of `url` ("s3", "memory", ...) or None for a plain local path."""
    head, sep, _ = url.partition("://")
    return head.split("::")[-1] if sep else None


def _is_glob(url: str) -> bool:
    return _protocol(url) not in _NO_GLOB_PROTOCOLS and any(c in url for c in _GLOB_CHARS)


def _glob(pattern: str, storage_options: Mapping[str, Any]) -> list[str]:
    """Sorted files matching `pattern`, as URLs with the pattern's protocol prefix."""
    try:
        fs, path = url_fs(pattern, storage_options)
        found = fs.glob(path, detail=True)
    except Exception as error:  # botocore's NoCredentialsError is no OSError
        raise StorageError(f"cannot list input shards {quoted(pattern)}: "
                           f"{describe_error(error)}") from error
    files = sorted(name for name, info in found.items() if info.get("type") != "directory")
    if _protocol(pattern) is None:
        return files  # LocalFileSystem returns absolute plain paths
    return [fs.unstrip_protocol(name) for name in files]


def _folder_or_file(name: str, storage_options: Mapping[str, Any]) -> list[str]:
    """The `*.tar` of folder `name`, or [name]; only names without a tar suffix are looked at, so
    a list of `.tar` URLs costs no request."""
    if name.endswith(_TAR_SUFFIXES) or _protocol(name) in _NO_GLOB_PROTOCOLS:
        return [name]
    try:
        fs, path = url_fs(name, storage_options)
        folder = fs.isdir(path)
    except Exception as error:
        raise StorageError(f"cannot look at input shards {quoted(name)}: "
                           f"{describe_error(error)}") from error
    return _glob(name.rstrip("/") + "/*.tar", storage_options) if folder else [name]


def _canonical(url: str) -> str:
    """A key under which two spellings of the same object compare equal."""
    protocol = _protocol(url)
    path = canonical_path(url)
    return path if protocol in (None, "file") else f"{protocol}://{path}"


def expand_shards(spec_or_patterns: str | Sequence[str],
                  storage_options: Mapping[str, Any] | None = None) -> list[str]:
    """Shard patterns expanded into URLs, in pattern order, duplicates removed (first kept).

    Each pattern may be a brace range / list, a glob (sorted, folders skipped), a folder (its
    `*.tar`, sorted) or a plain URL or path (kept, not checked); local paths come back absolute,
    for actors in other working directories. PipelineError when a pattern matches nothing or two
    stems collide, StorageError when a glob cannot be listed."""
    patterns = [spec_or_patterns] if isinstance(spec_or_patterns, str) else spec_or_patterns
    options = dict(storage_options or {})
    result: dict[str, str] = {}  # canonical -> url, in insertion order
    if not patterns:
        raise PipelineError("input.shards: no patterns given")
    for pattern in patterns:
        try:
            names = list(braceexpand(pattern))
        except UnbalancedBracesError as error:
            raise PipelineError(f"input.shards: {quoted(pattern)}: {error}") from error
        matched = 0
        for name in names:
            urls = _glob(name, options) if _is_glob(name) else _folder_or_file(name, options)
            for url in urls:
                key = _canonical(url)
                result.setdefault(key, key if _protocol(url) is None else url)
            matched += len(urls)
        if matched == 0:
            raise PipelineError(f"input.shards: {quoted(pattern)} matches no files")
        logger.debug("input pattern %s: %d shard(s)", pattern, matched)
    shards = list(result.values())
    unique_stems(shards)
    return shards


def shard_stem(url: str) -> str:
    """The name a shard's outputs get: no folders, query string or .tar / .tar.gz / .tgz suffix."""
    if _protocol(url) in _NO_GLOB_PROTOCOLS:
        url = url.split("?", 1)[0].split("#", 1)[0]
    name = posixpath.basename(url.rstrip("/"))
    for suffix in _TAR_SUFFIXES:
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return name


def unique_stems(shards: Sequence[str]) -> dict[str, str]:
    """stem -> shard URL; PipelineError lists every group of shards whose stems collide (their
    outputs would overwrite each other)."""
    by_stem: dict[str, list[str]] = {}
    for url in shards:
        by_stem.setdefault(shard_stem(url), []).append(url)
    clashes = {stem: urls for stem, urls in by_stem.items() if len(urls) > 1}
    if clashes:
        lines = [f"  {stem}: {', '.join(urls)}" for stem, urls in sorted(clashes.items())]
        raise PipelineError("input shards must have unique names (output names derive from "
                            "them); these collide:\n" + "\n".join(lines))
    return {stem: urls[0] for stem, urls in by_stem.items()}
