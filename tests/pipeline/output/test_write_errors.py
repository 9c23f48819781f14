"""Storage errors name the location: a full disk while writing a shard's tar (its temporary
file), manifest or commit marker, job.json or the lease says which file, never only "No space
left on device"; temporary files carry their writer, and a writer or driver removes only its
own or those whose writer is gone."""

from __future__ import annotations

import errno
import os
import re
import time

import pytest

from pipeline.errors import StorageError
from pipeline.output.folder import OutputFolder
from pipeline.storage import machine_id, put_bytes_atomic, stale_temp, temp_name
from tests.pipeline.output.test_writer import _fill

FULL = OSError(errno.ENOSPC, "No space left on device")
TEMP = r"\.[\w.-]+\.tmp-[0-9a-f]{12}-\d+-[0-9a-f]{8}"
"""A temporary file's name: `.{name}.tmp-{machine}-{pid}-{random}`."""


def _disk_full_for(monkeypatch: pytest.MonkeyPatch, folder: str) -> None:
    """fsync of any file under a folder named `folder` fails as a full disk does."""
    real = os.fsync

    def fsync(fd: int) -> None:
        if f"/{folder}/" in os.readlink(f"/proc/self/fd/{fd}"):
            raise FULL
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)


class _FullFile:
    def write(self, data: bytes) -> int:
        raise FULL


def test_a_full_disk_while_writing_the_tar_names_it_and_its_temporary_file(tmp_path):
    out = OutputFolder(str(tmp_path)).shard_writer("part-7")
    out._digest.handle = _FullFile()  # the disk is full from here on
    with pytest.raises(StorageError) as full:
        _fill(out)
        out.commit({})
    assert re.fullmatch(rf"cannot write {tmp_path}/shards/part-7\.tar: OSError: \[Errno 28\] No "
                        rf"space left on device \(writing its temporary file {tmp_path}/shards/"
                        rf"{TEMP}\)", str(full.value)), str(full.value)
    out.abort()
    assert os.listdir(tmp_path / "shards") == [] and not (tmp_path / "done").exists()


@pytest.mark.parametrize(("folder", "what"), [("manifests", "the manifest"),
                                              ("done", "the commit marker")])
def test_a_full_disk_at_commit_names_the_file(tmp_path, monkeypatch, folder, what):
    out = OutputFolder(str(tmp_path)).shard_writer("part-7")
    _fill(out)
    _disk_full_for(monkeypatch, folder)
    with pytest.raises(StorageError, match=rf"^cannot write {what} {tmp_path}/{folder}/part-7\."
                                           rf"(parquet|json): OSError: \[Errno 28\] No space "
                                           rf"left on device \(writing its temporary file "):
        out.commit({})
    assert not (tmp_path / "done" / "part-7.json").exists()
    assert not [p for p in tmp_path.rglob(".*.tmp-*")]


def test_a_full_disk_names_job_json_and_the_lease(tmp_path, monkeypatch):
    _disk_full_for(monkeypatch, tmp_path.name)
    folder = OutputFolder(str(tmp_path / "out"))
    with pytest.raises(StorageError, match=rf"^cannot write {tmp_path}/out/job\.json: OSError: "
                                           r"\[Errno 28\] No space left on device \(writing"):
        folder.write_record({"spec": {}})
    with pytest.raises(StorageError, match=rf"^cannot write the lease {tmp_path}/out/lease\.json: "
                                           r"OSError: \[Errno 28\] No space left on device"):
        folder.lease("job").acquire()
    with pytest.raises(StorageError, match=r"^cannot write the failure record .*/failed/p\.json"):
        folder.record_failure("p", {})


def test_temporary_files_carry_their_writer_and_only_stale_ones_go(tmp_path):
    name = temp_name("part-1.tar")
    assert re.fullmatch(TEMP, name) and name.startswith(".part-1.tar.tmp-")
    assert not stale_temp(name, age_s=10**6, max_age_s=1)  # this process is alive
    dead = f".part-1.tar.tmp-{machine_id()}-{2**31 - 1}-0123abcd"
    assert stale_temp(dead, age_s=0, max_age_s=300)  # its process on this machine has ended
    other = ".part-1.tar.tmp-0123456789ab-12-0123abcd"  # another machine: by age
    assert not stale_temp(other, age_s=299, max_age_s=300)
    assert stale_temp(other, age_s=301, max_age_s=300)
    assert stale_temp(".part-1.tar.tmp-0123456789ab", age_s=301, max_age_s=300)  # old name
    assert not stale_temp("part-1.tar", age_s=10**6, max_age_s=1)

    shards = tmp_path / "shards"
    shards.mkdir()
    for stale in (dead, other, ".part-2.json.tmp-0123456789ab"):
        (shards / stale).write_bytes(b"x")
    (shards / other).touch()  # fresh: a writer elsewhere may still be at it
    os.utime(shards / ".part-2.json.tmp-0123456789ab", (time.time() - 400,) * 2)
    writer = OutputFolder(str(tmp_path)).shard_writer("part-1")  # never removes another's
    _fill(writer)
    writer.commit({})
    assert sorted(p.name for p in shards.iterdir()) == sorted(
        [dead, other, ".part-2.json.tmp-0123456789ab", "part-1.tar"])
    assert OutputFolder(str(tmp_path)).remove_stale_temps(max_age_s=300) == 2
    assert sorted(p.name for p in shards.iterdir()) == sorted([other, "part-1.tar"])


def test_put_bytes_atomic_names_the_file_when_the_folder_cannot_be_made(tmp_path):
    (tmp_path / "done").write_text("a file where a folder goes")
    with pytest.raises(StorageError, match=rf"^cannot write the commit marker {tmp_path}/done/"
                                           r"a\.json: FileExistsError: "):
        put_bytes_atomic(str(tmp_path / "done" / "a.json"), b"{}", what="the commit marker")
