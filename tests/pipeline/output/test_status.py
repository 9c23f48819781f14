"""pipeline.output.status: counts from the output folder alone (job.json, done/ and failed/ markers,
manifests for error rows and repeated keys); the status command's exit codes."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.driver.runner import prepare_output
from pipeline.errors import PipelineError
from pipeline.output.manifest import MANIFEST_SCHEMA
from pipeline.output.status import error_rows, job_status
from pipeline.worker.shard import ShardWorker
from tests.support.shards import make_spec, png, write_shards


def test_status_counts_done_failed_and_pending(tiny_vp, tiny_vp_dir, tmp_path):
    shards = write_shards(tmp_path / "in", n_shards=3, per_shard=3)
    out = tmp_path / "out"
    spec = make_spec(tiny_vp_dir, shards, out)
    prepare_output(spec, overwrite=False)
    ShardWorker(spec, model=tiny_vp).process(shards[1])  # holds one undecodable sample
    (out / "failed").mkdir()
    (out / "failed" / "part-000002.json").write_text(json.dumps(
        {"stem": "part-000002", "input_shard": shards[2], "error": "truncated tar"}))
    status = job_status(str(out))
    assert (status.name, status.shards_total, status.done, status.pending) == ("test-job", 3, 1, 1)
    assert status.failed == {shards[2]: "truncated tar"}
    assert (status.samples, status.outputs_ok, status.outputs_error) == (3, 2, 1)
    # a failed marker of a shard that is done since is not counted as failed
    (out / "failed" / "part-000001.json").write_text(json.dumps(
        {"stem": "part-000001", "input_shard": shards[1], "error": "old"}))
    assert set(job_status(str(out)).failed) == {shards[2]}


def test_status_of_a_folder_without_a_job_is_an_error(tmp_path):
    with pytest.raises(PipelineError, match=r"no job\.json"):
        job_status(str(tmp_path))


def _bad_job(tiny_vp, tiny_vp_dir, tmp_path):
    """Two committed shards (one undecodable sample in part-000001, a missing guide in
    part-000002, key s0_000 repeated in part-000002) and one failed shard."""
    shards = write_shards(tmp_path / "in", n_shards=3, per_shard=3)
    with wds.TarWriter(shards[2]) as writer:  # rewrite part-000002 with a key of part-000000
        writer.write({"__key__": "s0_000", "png": png(np.zeros((16, 16, 3), np.uint8))})
        writer.write({"__key__": "s2_002", "txt": b"no guide"})
    out = tmp_path / "out"
    spec = make_spec(tiny_vp_dir, shards, out)
    prepare_output(spec, overwrite=False)
    worker = ShardWorker(spec, model=tiny_vp)
    worker.process(shards[1])
    worker.process(shards[2])
    (out / "failed").mkdir()
    (out / "failed" / "part-000000.json").write_text(json.dumps(
        {"stem": "part-000000", "input_shard": shards[0], "error": "truncated tar"}))
    return shards, out


def test_status_counts_error_kinds_and_keys_repeated_across_shards(tiny_vp, tiny_vp_dir,
                                                                   tmp_path):
    shards, out = _bad_job(tiny_vp, tiny_vp_dir, tmp_path)
    status = job_status(str(out))
    assert status.errors_by_kind == {"decode": 1, "missing": 1}
    assert status.keys_in_several_shards == 0  # part-000000 failed: no manifest of it
    ShardWorker(make_spec(tiny_vp_dir, shards, out), model=tiny_vp).process(shards[0])
    status = job_status(str(out))
    assert status.keys_in_several_shards == 1 and not status.failed
    marker = out / "done" / "part-000001.json"  # a marker written before error kinds existed
    old = json.loads(marker.read_text())
    del old["errors_by_kind"]
    marker.write_text(json.dumps(old))
    assert job_status(str(out)).errors_by_kind == {"missing": 1, "unknown": 1}


def test_error_rows_are_listed_by_shard_with_a_limit(tiny_vp, tiny_vp_dir, tmp_path):
    shards, out = _bad_job(tiny_vp, tiny_vp_dir, tmp_path)
    rows, total, unreadable = error_rows(str(out), limit=1)
    assert total == 2 and len(rows) == 1 and unreadable == {}
    assert rows[0] == {"key": "s1_001", "output_key": "s1_001", "input_shard": shards[1],
                       "error_kind": "decode", "error": rows[0]["error"]}
    assert rows[0]["error"].startswith("cannot decode s1_001.png")
    assert [r["key"] for r in error_rows(str(out))[0]] == ["s1_001", "s2_002"]
    # a manifest written before error_kind existed reads with the others (kind null)
    old_schema = pa.schema([MANIFEST_SCHEMA.field(i) for i in range(19)])
    pq.write_table(pa.Table.from_pylist([{"key": "z", "output_key": "z", "status": "error",
                                          "error": "old", "input_shard": "/zz.tar"}],
                                        schema=old_schema), out / "manifests" / "zz.parquet")
    rows, total, _ = error_rows(str(out))
    assert total == 3 and rows[-1]["error_kind"] is None and rows[-1]["error"] == "old"


def test_status_cli_exit_codes_and_error_listing(tiny_vp, tiny_vp_dir, tmp_path):
    """The issue's case: status exited 0 while shards had failed, nothing listed the rows."""
    shards, out = _bad_job(tiny_vp, tiny_vp_dir, tmp_path)
    result = CliRunner().invoke(main, ["status", str(out), "--errors", "--limit", "1"])
    assert result.exit_code == 1, result.output
    assert "shards: 2 done, 0 pending, 1 failed (of 3)" in result.output
    assert f"  FAILED {shards[0]}: truncated tar" in result.output
    assert "error rows by kind: decode 1, missing 1" in result.output
    assert "keys in more than one shard: 0" in result.output
    assert "error rows: 2 (first 1)\n  s1_001  part-000001  decode  cannot decode s1_001.png" \
        in result.output
    assert "  ... and 1 more (--limit 2 shows all)" in result.output
    (out / "failed" / "part-000000.json").unlink()
    ShardWorker(make_spec(tiny_vp_dir, shards, out), model=tiny_vp).process(shards[0])
    result = CliRunner().invoke(main, ["status", str(out)])
    assert result.exit_code == 0, result.output
    assert "keys in more than one shard: 1" in result.output
    assert "error rows:" not in result.output  # listed only with --errors


def _fake_job(out, markers: dict[str, object]) -> None:
    """job.json and done markers (stem -> content, a dict or raw bytes), no manifests."""
    (out / "done").mkdir(parents=True)
    (out / "job.json").write_text(json.dumps({"spec": {"name": "fake", "input": {}},
                                              "fingerprint": "f", "output_affecting": {
                                                  "fingerprint_version": 1}}))
    for stem, content in markers.items():
        data = content if isinstance(content, bytes) else json.dumps(content).encode()
        (out / "done" / f"{stem}.json").write_bytes(data)


def test_status_adds_up_many_markers_read_a_chunk_at_a_time(tmp_path):
    markers = {f"p-{i:06d}": {"samples": 3, "outputs_ok": 2, "outputs_error": 1,
                              "errors_by_kind": {"decode": 1}} for i in range(700)}
    markers["p-000007"] = b"{not json"  # a marker cut or overwritten: done, counts unknown
    markers[".hidden"] = {"samples": 1, "outputs_ok": 1, "outputs_error": 0}
    _fake_job(tmp_path, markers)
    (tmp_path / "done" / ".p-000001.json.tmp-0123456789ab").write_text("{}")  # not a marker
    status = job_status(str(tmp_path), repeated_keys=False)
    assert (status.done, status.unreadable) == (701, 1)
    assert (status.samples, status.outputs_ok, status.outputs_error) == (699 * 3 + 1,
                                                                         699 * 2 + 1, 699)
    assert status.errors_by_kind == {"decode": 699} and status.keys_in_several_shards is None
    result = CliRunner().invoke(main, ["status", str(tmp_path)])
    assert "shards: 701 done" in result.output
    assert "done markers that are not JSON objects: 1" in result.output


def test_repeated_keys_are_counted_in_passing_only_for_small_jobs(tiny_vp, tiny_vp_dir, tmp_path,
                                                                  monkeypatch):
    """The issue's case: status and the end of every run read the key and input_shard of
    every row ever written (~330 bytes a row on the driver: 33 GB at 10^8 rows)."""
    from pipeline.output import status as status_module

    shards, out = _bad_job(tiny_vp, tiny_vp_dir, tmp_path)
    ShardWorker(make_spec(tiny_vp_dir, shards, out), model=tiny_vp).process(shards[0])
    monkeypatch.setattr(status_module, "AUTO_ROWS", 5)  # the job holds 6 rows
    assert job_status(str(out)).keys_in_several_shards is None
    assert job_status(str(out), repeated_keys=True).keys_in_several_shards == 1
    plain = CliRunner().invoke(main, ["status", str(out)])
    assert f"keys in more than one shard: not counted (sdedit-batch status {out} " \
        "--repeated-keys counts them)" in plain.output
    asked = CliRunner().invoke(main, ["status", str(out), "--repeated-keys"])
    assert "keys in more than one shard: 1\n" in asked.output


def test_an_unreadable_job_record_is_a_clear_error_not_a_traceback(tmp_path):
    _fake_job(tmp_path, {})
    (tmp_path / "job.json").write_text('{"spec": ')
    result = CliRunner().invoke(main, ["status", str(tmp_path)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.output.startswith(f"error: output {tmp_path}: its job.json ")
    assert "cannot be read as a job record" in result.output


def test_status_and_run_count_a_shard_whose_name_starts_with_a_dot(tiny_vp, tiny_vp_dir,
                                                                   tmp_path):
    """A done marker `.hidden.json` (input shard `.hidden.tar`) was ignored by `status`
    (pending forever) but counted by `run`'s planning."""
    from pipeline.output.folder import OutputFolder

    shards = write_shards(tmp_path / "in", n_shards=1, per_shard=1, bad=False)
    hidden = tmp_path / "in" / ".hidden.tar"
    (tmp_path / "in" / "part-000000.tar").rename(hidden)
    out = tmp_path / "out"
    spec = make_spec(tiny_vp_dir, [str(hidden)], out)
    prepare_output(spec, overwrite=False)
    ShardWorker(spec, model=tiny_vp).process(str(hidden))
    assert (out / "done" / ".hidden.json").exists() and shards
    status = job_status(str(out))
    assert (status.done, status.pending, status.samples) == (1, 0, 1)
    assert OutputFolder(str(out)).plan([str(hidden)]).done == [str(hidden)]
