"""Compare-and-swap of one small object (the lease file), with what each store offers.

`Local`: an exclusive `flock`; `S3`: conditional requests; `Plain`: read, compare, write (not
atomic). `write(data, tag)` and `delete(tag)` raise `ConflictError` unless the object is still
the one `read()` gave with `tag` (None: absent). See docs/outputs.md, "one writer per output"."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from collections.abc import Iterator, Mapping
from typing import Any

from pipeline.storage import FileSystem, is_local, temp_name

logger = logging.getLogger(__name__)

__all__ = ["S3", "ConflictError", "Local", "Plain", "store_for"]


class ConflictError(Exception):
    """The object is not what the compare-and-swap expected (it exists, or changed)."""


class Local:
    """Compare-and-swap under an exclusive `flock` of the output folder."""

    def __init__(self, path: str) -> None:
        self.path, self.folder = path, os.path.dirname(path) or "."

    def read(self) -> tuple[bytes | None, Any]:
        try:
            with open(self.path, "rb") as handle:
                data = handle.read()
        except FileNotFoundError:
            return None, None
        return data, data

    @contextlib.contextmanager
    def _locked(self, expected: Any) -> Iterator[None]:
        os.makedirs(self.folder, exist_ok=True)
        fd = os.open(self.folder, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if self.read()[0] != expected:
                raise ConflictError
            yield
        finally:
            os.close(fd)  # releases the lock

    def write(self, data: bytes, expected: Any) -> Any:
        with self._locked(expected):
            tmp = os.path.join(self.folder, temp_name(os.path.basename(self.path)))
            try:
                with open(tmp, "wb") as handle:
                    handle.write(data)
                    handle.flush()
                    os.fsync(handle.fileno())
                os.replace(tmp, self.path)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        return data

    def delete(self, expected: Any) -> None:
        with self._locked(expected):
            os.unlink(self.path)


class Plain:
    """Read, compare, write: for stores without conditional writes (not atomic)."""

    def __init__(self, fs: FileSystem, path: str) -> None:
        self.fs, self.path = fs, path

    def read(self) -> tuple[bytes | None, Any]:
        self.fs.invalidate_cache(self.path)
        try:
            data = self.fs.cat_file(self.path)
        except FileNotFoundError:
            return None, None
        return data, data

    def write(self, data: bytes, expected: Any) -> Any:
        if self.read()[0] != expected:
            raise ConflictError
        self.fs.pipe_file(self.path, data)
        return data

    def delete(self, expected: Any) -> None:
        if self.read()[0] != expected:
            raise ConflictError
        self.fs.rm_file(self.path)


class S3(Plain):
    """S3 conditional writes; tags are ETags. Falls back to `Plain` for good, with a warning,
    when the store does not implement them."""

    def __init__(self, fs: FileSystem, path: str) -> None:
        super().__init__(fs, path)
        self.bucket, self.key, _ = fs.split_path(path)
        self.plain = False

    def read(self) -> tuple[bytes | None, Any]:
        if self.plain:
            return super().read()
        self.fs.invalidate_cache(self.path)
        try:
            etag = self.fs.info(self.path)["ETag"]
            return self.fs.cat_file(self.path), etag
        except FileNotFoundError:
            return None, None

    def write(self, data: bytes, expected: Any) -> Any:
        if self.plain:
            return super().write(data, expected)
        condition = {"IfNoneMatch": "*"} if expected is None else {"IfMatch": expected}
        try:
            answer = self.fs.call_s3("put_object", Bucket=self.bucket, Key=self.key, Body=data,
                                     **condition)
            return answer["ETag"]
        except Exception as exc:
            if not self._unsupported(exc):
                raise
            self._check(expected)
            self.fs.pipe_file(self.path, data)
            return data  # from now on tags are contents (`Plain`)
        finally:
            self.fs.invalidate_cache(self.path)

    def delete(self, expected: Any) -> None:
        if self.plain:
            return super().delete(expected)
        try:
            self.fs.call_s3("delete_object", Bucket=self.bucket, Key=self.key, IfMatch=expected)
        except Exception as exc:
            if not self._unsupported(exc):
                raise
            self._check(expected)
            self.fs.rm_file(self.path)
        finally:
            self.fs.invalidate_cache(self.path)
        return None

    def _check(self, etag: Any) -> None:
        """Raise `ConflictError` unless the object's ETag is `etag` (None: it must not exist)."""
        try:
            current = self.fs.info(self.path)["ETag"]
        except FileNotFoundError:
            current = None
        if current != etag:
            raise ConflictError

    def _unsupported(self, exc: BaseException) -> bool:
        """Raise `ConflictError` for a failed condition; True when the store has no conditions."""
        if isinstance(exc, FileExistsError):
            raise ConflictError from exc
        for status, code in _answers(exc):
            if status in (409, 412) or code in ("PreconditionFailed",
                                                "ConditionalRequestConflict"):
                raise ConflictError from exc
            if status == 501 or code == "NotImplemented":
                logger.warning("s3://%s: the store does not implement conditional writes "
                               "(If-None-Match / If-Match); the lease is read, compared and "
                               "written instead, then read back (docs/outputs.md)", self.bucket)
                self.plain = True
                return True
        return False


def store_for(fs: FileSystem, path: str) -> Local | Plain:
    """The compare-and-swap store of `path` on `fs`."""
    if is_local(fs):
        return Local(fs._strip_protocol(path))
    if hasattr(fs, "call_s3") and hasattr(fs, "split_path"):
        return S3(fs, path)
    return Plain(fs, path)


def _answers(exc: BaseException) -> Iterator[tuple[int | None, str | None]]:
    """(HTTP status, error code) of `exc` and its causes (s3fs wraps botocore's errors)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        response = getattr(current, "response", None)
        if isinstance(response, Mapping):
            status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
            yield status, (response.get("Error") or {}).get("Code")
        current = current.__cause__ or current.__context__
