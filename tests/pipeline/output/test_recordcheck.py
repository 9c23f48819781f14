"""pipeline.output.recordcheck: every job.json shape is refused clearly, and the same way, by
`status`, `validate` and `run` (before Ray); a record of a newer version names the versions."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.output.recordcheck import newer_version, record_problems
from tests.support.shards import write_job, write_shards

GOOD = {"record_version": 1, "spec": {"name": "j", "input": {"shards": ["a.tar"]},
                                      "output": {"path": "/o"}, "model": {"source": "m"}},
        "fingerprint": "f" * 64, "output_affecting": {"fingerprint_version": 1},
        "versions": {"sdedit-batch": "0.4.0"}, "model": "m",
        "compute": {"device": "cpu", "dtype": "fp32", "threads": 2, "batch_size": 8}}


def _with(path: str, value: object) -> dict:
    record = json.loads(json.dumps(GOOD))
    *parents, last = path.split(".")
    node = record
    for key in parents:
        node = node[key]
    if value is KeyError:
        del node[last]
    else:
        node[last] = value
    return record


@pytest.mark.parametrize(("record", "problem"), [
    (_with("spec.input", "x" * 10_000), "spec.input: a string, expected an object"),
    (_with("spec.input.shards", [1]), "spec.input.shards[0]: an integer, expected a string"),
    (_with("spec", None), "spec: null, expected an object"),
    (_with("fingerprint", KeyError), "fingerprint: missing"),
    (_with("output_affecting", []), "output_affecting: a list, expected an object"),
    (_with("output_affecting.fingerprint_version", True),
     "output_affecting.fingerprint_version: true or false, expected an integer"),
    (_with("compute.threads", 2.5), "compute.threads: a number, expected an integer"),
    ([GOOD], "job.json: a list, expected an object"),
])
def test_record_problems_name_the_key_and_types_never_the_value(record, problem):
    assert record_problems(record) == [problem]


def test_a_record_of_today_and_of_the_first_version_have_no_problem():
    assert record_problems(GOOD) == []
    first = {"spec": {"name": "old-job"}, "fingerprint": "f", "output_affecting": {
        "fingerprint_version": 1}, "versions": {"sdedit-batch": "0.1.0"}, "model": "m"}
    assert record_problems(first) == [] and newer_version(first) is None


def test_a_newer_record_names_its_version():
    assert newer_version(_with("record_version", 2)) == (
        "it was written by a newer version (sdedit-batch 0.4.0): record version 2, this "
        "version reads up to 1")
    assert "fingerprint version 3, this version knows up to 1" in newer_version(
        _with("output_affecting.fingerprint_version", 3))


@pytest.mark.parametrize(("record", "says"), [
    (_with("spec.input", "abc"), "cannot be read as a job record (spec.input: a string, "
                                 "expected an object)"),
    (_with("record_version", 7), "it was written by a newer version (sdedit-batch 0.4.0): "
                                 "record version 7"),
])
def test_status_validate_and_run_refuse_it_alike(tiny_vp_dir, tmp_path, record, says):
    shards = write_shards(tmp_path / "in", n_shards=1, per_shard=1, bad=False)
    out = tmp_path / "out"
    out.mkdir()
    (out / "job.json").write_text(json.dumps(record))
    job = write_job(tmp_path / "job.yaml", tiny_vp_dir, shards, out)
    for args in (["status", str(out)], ["validate", str(job)], ["run", str(job)]):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 2, (args, result.output)
        assert result.exception is None or isinstance(result.exception, SystemExit)
        assert "Traceback" not in result.output
        assert f"output {out}: its job.json" in result.output and says in result.output
    assert json.loads((out / "job.json").read_text()) == record  # run wrote nothing
    assert not (out / "lease.json").exists()
