"""pipeline.storage against the local filesystem and a real S3 server (SeaweedFS on loopback)."""

from __future__ import annotations

import errno
import logging
import threading
import time
from pathlib import Path

import pytest
import s3fs

from pipeline.errors import StorageError
from pipeline.storage import (
    check_writable,
    is_transient,
    join,
    put_bytes_atomic,
    url_fs,
    with_retries,
)
from tests.support.fixtures import S3Bucket


def test_join_keeps_protocol_and_skips_empty_parts() -> None:
    assert join("s3://b/out/", "shards", "a.tar") == "s3://b/out/shards/a.tar"
    assert join("s3://b", "/done/", "x.json") == "s3://b/done/x.json"
    assert join("/data", "", "x") == "/data/x"
    assert join("memory://", "a", "b") == "memory://a/b"
    assert join("file:///tmp/o", "m") == "file:///tmp/o/m"


def test_transient_classification() -> None:
    assert is_transient(ConnectionRefusedError(errno.ECONNREFUSED, "refused"))
    assert is_transient(TimeoutError("slow"))
    assert is_transient(OSError(errno.ECONNRESET, "reset"))
    assert not is_transient(FileNotFoundError("x"))
    assert not is_transient(PermissionError("Access Denied."))
    wrapped = OSError(errno.EIO, "oops")
    wrapped.__cause__ = _client_error("InternalError", 500)
    assert is_transient(wrapped)
    forbidden = OSError(errno.EIO, "no")
    forbidden.__cause__ = _client_error("AccessDenied", 403)
    assert not is_transient(forbidden)


def _client_error(code: str, status: int) -> Exception:
    from botocore.exceptions import ClientError

    response = {"Error": {"Code": code, "Message": code},
                "ResponseMetadata": {"HTTPStatusCode": status}}
    return ClientError(response, "GetObject")  # type: ignore[arg-type]


def test_with_retries_retries_transient_then_succeeds() -> None:
    calls: list[int] = []
    sleeps: list[float] = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionResetError(errno.ECONNRESET, "reset by peer")
        return "ok"

    result = with_retries(flaky, what="read", url="s3://b/k", base_delay=1.0, sleep=sleeps.append)
    assert result == "ok" and len(calls) == 3
    assert len(sleeps) == 2 and 0.5 <= sleeps[0] <= 1.0 and 1.0 <= sleeps[1] <= 2.0


def test_with_retries_raises_permanent_errors_at_once() -> None:
    calls: list[int] = []

    def denied() -> None:
        calls.append(1)
        raise PermissionError("Access Denied.")

    with pytest.raises(PermissionError):
        with_retries(denied, what="write", url="s3://b/k", sleep=lambda _: None)
    assert calls == [1]


def test_with_retries_final_failure_is_storage_error() -> None:
    def down() -> None:
        raise ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")

    with pytest.raises(StorageError, match=r"read manifest s3://b/m\.parquet: failed after 3"):
        with_retries(down, what="read manifest", url="s3://b/m.parquet", attempts=3,
                     sleep=lambda _: None)


def test_put_bytes_atomic_local_leaves_no_temp_files(tmp_path: Path) -> None:
    target = tmp_path / "out" / "done" / "a.json"
    put_bytes_atomic(str(target), b"{}")
    put_bytes_atomic(f"file://{target}", b'{"v": 2}')
    assert target.read_bytes() == b'{"v": 2}'
    assert [p.name for p in target.parent.iterdir()] == ["a.json"]


def test_check_writable_local_creates_directory(tmp_path: Path) -> None:
    check_writable(str(tmp_path / "new" / "out"))
    assert list((tmp_path / "new" / "out").iterdir()) == []


@pytest.mark.s3
def test_s3_round_trip_with_storage_options(s3_bucket: S3Bucket) -> None:
    url = join(s3_bucket.url, "out", "shards", "a.tar")
    put_bytes_atomic(url, b"tar-bytes", s3_bucket.storage_options)
    fs, path = url_fs(url, s3_bucket.storage_options)
    assert path == f"{s3_bucket.name}/out/shards/a.tar"
    assert fs.cat_file(path) == b"tar-bytes"
    assert fs.ls(f"{s3_bucket.name}/out/shards", detail=False) == [path]


@pytest.mark.s3
def test_s3_round_trip_with_env_vars_only(
    s3_bucket: S3Bucket, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in s3_bucket.env.items():
        monkeypatch.setenv(name, value)
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        url = join(s3_bucket.url, "env", "x.bin")
        put_bytes_atomic(url, b"\x00\x01", None)
        fs, path = url_fs(url)
        assert fs.cat_file(path) == b"\x00\x01"
    finally:
        s3fs.S3FileSystem.clear_instance_cache()


@pytest.mark.s3
def test_check_writable_admin_passes_and_cleans_up(s3_bucket: S3Bucket) -> None:
    out = join(s3_bucket.url, "job1")
    check_writable(out, s3_bucket.storage_options)
    fs, _ = url_fs(out, s3_bucket.storage_options)
    fs.invalidate_cache()
    assert fs.find(s3_bucket.name) == []  # no probe object left behind


@pytest.mark.s3
def test_check_writable_readonly_identity_is_refused(s3_bucket: S3Bucket) -> None:
    out = join(s3_bucket.url, "job1")
    with pytest.raises(StorageError) as info:
        check_writable(out, s3_bucket.readonly_storage_options)
    message = str(info.value)
    assert message.startswith(f"output.path {out}: cannot write: AccessDenied")
    assert s3_bucket.server.readonly_secret not in message
    assert s3_bucket.server.readonly_key not in message


@pytest.mark.s3
def test_check_writable_missing_bucket_is_refused(s3_bucket: S3Bucket) -> None:
    with pytest.raises(StorageError, match="cannot write: NoSuchBucket"):
        check_writable("s3://no-such-bucket-here/out", s3_bucket.storage_options)


@pytest.mark.s3
@pytest.mark.timeout(120)
def test_with_retries_gives_up_while_the_server_is_down_and_survives_its_restart(
    s3_bucket: S3Bucket, caplog: pytest.LogCaptureFixture
) -> None:
    """One outage of the real server (each stop and start costs seconds): while it is down a
    read gives up after its attempts; a read that outlasts the restart succeeds."""
    server = s3_bucket.server
    options = server.storage_options(fast_fail=True)
    url = join(s3_bucket.url, "restart", "obj")
    put_bytes_atomic(url, b"survives", options)
    fs, path = url_fs(url, options)
    server.stop(grace=0.2)
    errors: list[BaseException] = []

    def restart() -> None:
        try:
            time.sleep(1.0)
            server.start()
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    thread: threading.Thread | None = None
    try:
        with pytest.raises(StorageError) as info:   # gives up after its 3 attempts
            with_retries(lambda: fs.cat_file(path), what="read", url=url,
                         attempts=3, base_delay=0.1)
        thread = threading.Thread(target=restart)
        thread.start()
        with caplog.at_level(logging.WARNING, logger="pipeline.storage"):
            data = with_retries(lambda: fs.cat_file(path), what="read", url=url,
                                attempts=10, base_delay=0.5, max_delay=4.0)
    finally:
        if thread is not None:
            thread.join(60)
        server.start()  # no-op when it runs
    message = str(info.value)
    assert url in message and "failed after 3 attempts" in message
    assert server.admin_secret not in message and server.admin_key not in message
    assert not errors
    assert data == b"survives"
    retries = [r for r in caplog.records if "transient error" in r.getMessage()]
    assert retries, "the server was down, so at least one retry must have been logged"
    assert all(server.admin_secret not in r.getMessage() for r in caplog.records)
