"""Committed shards verified: the commit marker records each file's size and digest; `status`
names damaged, deleted and unreadable files (exit 2, no traceback), `--verify` reads them
through, `plan` leaves damaged commits pending; markers from before sizes count as done."""

from __future__ import annotations

import json
import shutil
import time

import pytest
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.output.folder import OutputFolder
from pipeline.output.jobrecord import prepare_output
from pipeline.output.status import job_status
from pipeline.worker.shard import ShardWorker
from tests.support.shards import make_spec, write_shards


@pytest.fixture(scope="module")
def committed_once(tiny_vp, tiny_vp_dir, tmp_path_factory):
    """Three committed shards of two samples each (shards, output folder), made once."""
    root = tmp_path_factory.mktemp("committed")
    shards = write_shards(root / "in", n_shards=3, per_shard=2, bad=False)
    spec = make_spec(tiny_vp_dir, shards, root / "out")
    prepare_output(spec, overwrite=False)
    worker = ShardWorker(spec, model=tiny_vp)
    for url in shards:
        worker.process(url)
    return shards, root / "out"


@pytest.fixture
def committed(committed_once, tmp_path):
    """A copy of `committed_once` for this test to damage."""
    shards, out = committed_once
    shutil.copytree(out, tmp_path / "out")
    return shards, tmp_path / "out"


def test_damaged_and_deleted_files_are_named_by_status_and_left_pending_by_plan(committed):
    shards, out = committed
    assert job_status(str(out)).damaged == {}
    manifest = out / "manifests" / "part-000000.parquet"
    size = manifest.stat().st_size
    manifest.write_bytes(manifest.read_bytes()[: size // 2])  # cut short
    (out / "shards" / "part-000001.tar").unlink()
    result = CliRunner().invoke(main, ["status", str(out)])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert "shards: 3 done, 0 pending, 0 failed (of 3)" in result.output
    assert "damaged committed shards: 2 (`run` makes them again)" in result.output
    assert (f"  DAMAGED part-000000: manifests/part-000000.parquet has {size // 2:,} bytes, its "
            f"commit marker records {size:,}") in result.output
    assert "  DAMAGED part-000001: shards/part-000001.tar is missing" in result.output
    errors = CliRunner().invoke(main, ["status", str(out), "--errors"])
    assert errors.exit_code == 2 and "Traceback" not in errors.output, errors.output
    assert "error rows: 0, from the readable manifests (1 cannot be read)" in errors.output
    assert "  UNREADABLE manifests/part-000000.parquet: " in errors.output
    plan = OutputFolder(str(out)).plan(shards)
    assert plan.done == [shards[2]] and plan.pending == shards[:2]
    assert set(plan.damaged) == set(shards[:2])
    assert plan.markers_read == 1  # the manifest written after its marker; no request per shard


def test_verify_reads_through_what_a_listing_cannot_see(committed):
    """A tar of the right size with other bytes: sizes agree, the CRC-32 does not."""
    _, out = committed
    tar = out / "shards" / "part-000002.tar"
    data = bytearray(tar.read_bytes())
    data[600] ^= 0xFF
    tar.write_bytes(bytes(data))
    assert CliRunner().invoke(main, ["status", str(out)]).exit_code == 0
    result = CliRunner().invoke(main, ["status", str(out), "--verify"])
    assert result.exit_code == 2, result.output
    assert "  DAMAGED part-000002: shards/part-000002.tar: CRC-32 " in result.output
    assert "its commit marker records" in result.output
    tar.write_bytes(bytes(data[:600]) + bytes([data[600] ^ 0xFF]) + bytes(data[601:]))
    result = CliRunner().invoke(main, ["status", str(out), "--verify"])
    assert result.exit_code == 0, result.output
    assert "verified: 3 committed shards read through, digests as recorded" in result.output


def test_markers_from_before_sizes_count_as_done_and_unreadable_manifests_are_named(committed):
    """A marker without `files` (written by an older version): its files' presence is
    checked; a manifest that is no Parquet file is named when status reads it (the key count),
    never a pyarrow traceback."""
    shards, out = committed
    for stem in ("part-000000", "part-000001"):
        marker = out / "done" / f"{stem}.json"
        old = json.loads(marker.read_text())
        del old["files"]
        marker.write_text(json.dumps(old))
    (out / "manifests" / "part-000001.parquet").write_bytes(b"PAR1 cut")
    plan = OutputFolder(str(out)).plan(shards)
    assert plan.done == shards and plan.markers_read == 1  # as before: presence only
    result = CliRunner().invoke(main, ["status", str(out)])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert "done markers written before file sizes were recorded: 2" in result.output
    assert "  DAMAGED part-000001: manifests/part-000001.parquet cannot be read: " \
        in result.output
    (out / "shards" / "part-000000.tar").write_bytes(b"")
    assert "DAMAGED part-000000: shards/part-000000.tar is empty" in CliRunner().invoke(
        main, ["status", str(out)]).output


@pytest.mark.s3
def test_on_s3_the_listings_vouch_for_untouched_shards(s3_bucket):
    """Planning reads no marker of a shard whose files are older than it (S3 LastModified),
    and reads the marker of one whose manifest was written over since."""
    from pipeline.output.writer import files_record
    from pipeline.storage import join, url_fs

    out = join(s3_bucket.url, "out")
    fs, root = url_fs(out, s3_bucket.storage_options)
    tar, manifest = b"t" * 2048, b"PAR1" + b"m" * 100
    for stem in ("a", "b"):
        fs.pipe_file(f"{root}/shards/{stem}.tar", tar)
        fs.pipe_file(f"{root}/manifests/{stem}.parquet", manifest)
        fs.pipe_file(f"{root}/done/{stem}.json", json.dumps(
            {"files": files_record(len(tar), 0, manifest)}).encode())
    shards = ["/in/a.tar", "/in/b.tar"]
    folder = OutputFolder(out, s3_bucket.storage_options)
    plan = folder.plan(shards)
    assert (plan.done, plan.markers_read) == (shards, 0)
    time.sleep(1.1)  # S3 times are whole seconds: the rewrite must be later than the marker
    fs.pipe_file(f"{root}/manifests/b.parquet", manifest[:50])
    plan = folder.plan(shards)
    assert plan.markers_read == 1 and plan.done == shards[:1]
    assert plan.damaged == {shards[1]: "manifests/b.parquet has 50 bytes, its commit marker "
                                       "records 104"}
