"""pipeline.output.jobrecord: OUT/job.json, resume refusal, resolved compute values and the
warning on a
resume that changes what byte-identical outputs depend on."""

from __future__ import annotations

import copy
import json
import logging

import pytest

from pipeline.errors import ResumeConflictError
from pipeline.job.load import parse_spec
from pipeline.output.jobrecord import prepare_output, record_compute, resolved_compute
from tests.pipeline.job.test_spec import OLD_FINGERPRINT, OLD_JOB

OLD_OUTPUT_AFFECTING = {
    "fingerprint_version": 1, "model": {"source": "/models/rooms-64"},
    "input": {"image": None, "mask": "mask.png"},
    "output": {"image_format": "png", "include_guide": True},
    "sdedit": {"t0": 0.04, "sampler": "ddpm", "steps": None, "repeats": 1,
               "samples_per_input": 1, "seed": 7, "eta": 0.0}}
"""output_affecting() of OLD_JOB as the code before input.max_pixels wrote it to job.json."""


def _old_job(tmp_path):
    """OLD_JOB with its output in tmp_path, and the job.json the older code wrote there."""
    data = copy.deepcopy(OLD_JOB)
    data["output"]["path"] = str(tmp_path / "out")
    (tmp_path / "out").mkdir()
    spec = parse_spec(data)
    old = {"spec": {"name": "old-job"}, "fingerprint": OLD_FINGERPRINT,
           "output_affecting": OLD_OUTPUT_AFFECTING,
           "versions": {"sdedit-batch": "0.1.0"}, "model": "/models/rooms-64"}
    (tmp_path / "out" / "job.json").write_text(json.dumps(old))
    return data, spec, old


def test_a_job_started_before_max_pixels_existed_resumes(tmp_path):
    data, spec, old = _old_job(tmp_path)
    assert prepare_output(spec, overwrite=False) == old
    record = json.loads((tmp_path / "out" / "job.json").read_text())
    assert record["fingerprint"] == OLD_FINGERPRINT
    assert record["output_affecting"] == OLD_OUTPUT_AFFECTING
    assert record["spec"]["input"]["max_pixels"] == 4096 * 4096
    changed = parse_spec(data, overrides=["input.max_pixels=1000000"])
    with pytest.raises(ResumeConflictError, match=r"input\.max_pixels: None -> 1000000"):
        prepare_output(changed, overwrite=False)


def test_resolved_compute_values():
    spec = parse_spec(OLD_JOB)
    assert resolved_compute(spec, use_gpu=False, threads=2) == {
        "device": "cpu", "dtype": "fp32", "threads": 2, "batch_size": 3}
    half = parse_spec(OLD_JOB, overrides=["compute.dtype=bf16"])
    assert resolved_compute(half, use_gpu=True, threads=1)["dtype"] == "bf16"
    cpu_fp16 = parse_spec(OLD_JOB, overrides=["compute.dtype=fp16"])
    assert resolved_compute(cpu_fp16, use_gpu=False, threads=1)["dtype"] == "fp32"


def test_compute_values_are_recorded_and_a_changing_resume_warns(tmp_path, caplog):
    _, spec, _ = _old_job(tmp_path)
    first = {"device": "cpu", "dtype": "fp32", "threads": 2, "batch_size": 8}
    assert record_compute(spec, first, None, shards_done=0) == []
    record = json.loads((tmp_path / "out" / "job.json").read_text())
    assert record["compute"] == first and record["fingerprint"] == OLD_FINGERPRINT
    # prepare_output of the resume keeps the section until the new values are known
    previous = prepare_output(spec, overwrite=False)
    assert json.loads((tmp_path / "out" / "job.json").read_text())["compute"] == first
    caplog.set_level(logging.WARNING, logger="pipeline.output.jobrecord")
    second = {**first, "threads": 1, "batch_size": 3}
    assert record_compute(spec, second, previous, shards_done=2) == [
        "threads 2 -> 1", "batch_size 8 -> 3"]
    assert ("resuming with compute settings that differ from those of the 2 shard(s) already "
            "done (threads 2 -> 1, batch_size 8 -> 3): byte-identical outputs need the same "
            "batch size, device, dtype and threads") in caplog.text
    assert json.loads((tmp_path / "out" / "job.json").read_text())["compute"] == second
    caplog.clear()
    assert record_compute(spec, first, {"compute": second}, shards_done=0) == []
    assert caplog.text == ""  # nothing done yet: nothing to differ from
