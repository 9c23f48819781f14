"""Tests of pipeline.job.spec: validation messages, defaults, overrides, fingerprint, redaction."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.errors import SpecError
from pipeline.job.load import apply_overrides, load_spec, parse_spec
from pipeline.job.spec import ActorsSpec, JobSpec

GOOD: dict[str, Any] = {
    "name": "bedrooms-v1",
    "model": {"source": "google/ddpm-ema-bedroom-256"},
    "input": {"shards": "s3://bucket/in/p-{000000..000127}.tar"},
    "output": {"path": "s3://bucket/out"},
}


def _with(path: str, value: Any) -> dict[str, Any]:
    """GOOD with data[path] = value (dotted path; intermediate mappings created)."""
    data = copy.deepcopy(GOOD)
    *parents, last = path.split(".")
    node = data
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value
    return data


def _errors(data: Any, overrides: tuple[str, ...] = ()) -> list[str]:
    with pytest.raises(SpecError) as info:
        parse_spec(data, source="job.yaml", overrides=overrides)
    assert info.value.source == "job.yaml"
    return info.value.errors


BAD_CASES = [
    (_with("sdedit.t0", 1.5), (), "sdedit.t0: 1.5 is out of range; allowed: a number in (0, 1]"),
    (_with("sdedit.t0", 0), (), "sdedit.t0: 0 is out of range"),
    (_with("sdedit.t0", "half"), (), "sdedit.t0: 'half' is not a number"),
    (_with("sdedit.t0", [0.3, 0.5]), (), "sdedit.t0: [0.3, 0.5] is not a number"),
    (_with("compute.bach_size", 4), (), "compute.bach_size: unknown key; allowed keys: actors, "
                                        "batch_size"),
    (_with("compute.bach_size", 4), (), "did you mean batch_size?"),
    (_with("sdedit.sampler", "ddmp"), (), "sdedit.sampler: 'ddmp' is not allowed; allowed: one "
                                          "of ddpm, ddim, dpmpp2m, ve, euler, flow_ddpm; did "
                                          "you mean ddpm?"),
    (_with("name", "my job"), (), "name: 'my job' is not allowed"),
    (_with("name", 42), (), "name: 42 is not a non-empty string"),
    ({k: v for k, v in GOOD.items() if k != "model"}, (), "model.source: missing"),
    (_with("output.image_format", "jpeg"), (), "did you mean jpg?"),
    (_with("output.include_guide", "yes please"), (), "output.include_guide: 'yes please' is "
                                                       "not a boolean"),
    (_with("input.shards", []), (), "input.shards: [] is not a non-empty string"),
    (_with("input.shards", ["a.tar", 3]), (), "input.shards: ['a.tar', 3]"),
    (_with("input.storage_options", "anon"), (), "input.storage_options: 'anon' is not a "
                                                 "mapping"),
    (_with("sdedit.steps", 0), (), "sdedit.steps: 0 is out of range; allowed: an integer >= 1 "
                                   "or null"),
    (_with("sdedit.samples_per_input", 101), (), "sdedit.samples_per_input: 101 is out of "
                                                 "range; allowed: an integer in [1, 100]"),
    (_with("sdedit.repeats", 2.0), (), "sdedit.repeats: 2.0 is not an integer"),
    (_with("sdedit.seed", -1), (), "sdedit.seed: -1 is out of range"),
    (_with("sdedit.eta", 0.5), (), "sdedit.eta: 0.5 is only used by sampler ddim"),
    (_with("compute.batch_size", 5000), (), "compute.batch_size: 5000 is out of range; "
                                            "allowed: an integer in [1, 4096]"),
    (_with("compute.batch_size", True), (), "compute.batch_size: true is not an integer"),
    (_with("compute.gpus_per_actor", 9), (), "compute.gpus_per_actor: 9 is out of range"),
    (_with("compute.cpus_per_actor", 0), (), "compute.cpus_per_actor: 0 is out of range; "
                                             "allowed: a number > 0 or null"),
    (_with("compute.device", "gpu"), (), "compute.device: 'gpu' is not allowed; allowed: one "
                                         "of auto, cpu, cuda"),
    (_with("compute.dtype", "float16"), (), "compute.dtype: 'float16' is not allowed"),
    (_with("compute.actors", {"min": 3, "max": 2}), (), "compute.actors.max: 2 is out of range; "
                                                        "allowed: an integer >= "
                                                        "compute.actors.min (3)"),
    (_with("compute.actors", 0), (), "compute.actors: 0 is out of range"),
    (_with("compute.actors", {"mx": 2}), (), "compute.actors.mx: unknown key"),
    (_with("compute.shard_retries", 101), (), "compute.shard_retries: 101 is out of range"),
    (_with("output.png_compress_level", 10), (), "output.png_compress_level: 10 is out of range; "
                                                 "allowed: an integer in [0, 9]"),
    (_with("compute.host_threads", 0), (), "compute.host_threads: 0 is out of range; allowed: "
                                           "an integer in [1, 256]"),
    (_with("compute", {"device": "cuda", "gpus_per_actor": 0}), (),
     "compute.gpus_per_actor: 0.0 with compute.device cuda"),
    (_with("input.mask", "png"), (), "input.mask: 'png' is also the guide image (input.image: "
                                     "null)"),
    (_with("sdedit", 0.5), (), "sdedit: 0.5 is not a mapping"),
    (GOOD, ("sdedit.t0",), "--set sdedit.t0: missing '='"),
    (GOOD, ("sdedit.t00=0.3",), "--set sdedit.t00=0.3: unknown key sdedit.t00"),
    (GOOD, ("compute.actors.mx=2",), "did you mean max?"),
    (GOOD, ("sdedit.t0=[0.3",), "--set sdedit.t0=[0.3: value is not valid YAML"),
    (GOOD, ("sdedit.t0=1.5",), "sdedit.t0: 1.5 is out of range"),
    (GOOD, ("name.first=x",), "--set name.first=x: unknown key name.first"),
]


@pytest.mark.parametrize(("data", "overrides", "fragment"), BAD_CASES)
def test_bad_spec_message(data: dict[str, Any], overrides: tuple[str, ...],
                          fragment: str) -> None:
    errors = _errors(data, overrides)
    assert any(fragment in error for error in errors), errors


def test_mask_must_differ_from_image() -> None:
    data = _with("input.image", "mask.png")
    data["input"]["mask"] = ".mask.png"
    assert _errors(data) == ["input.mask: 'mask.png' is also the guide image (input.image: "
                             "'mask.png'); allowed: a different member, e.g. mask.png"]
    data["input"]["image"] = "png"
    assert parse_spec(data).input.mask == "mask.png"
    data["input"].update(image="guide.png", mask="png")  # no substring match
    assert parse_spec(data).input.mask == "png"


def test_all_errors_are_collected() -> None:
    data = _with("sdedit", {"t0": 2, "sampler": "x", "steps": 0})
    data["compute"] = {"batch_size": 0, "bach_size": 1}
    data["extra"] = 1
    errors = _errors(data, ("nope=1",))
    assert len(errors) == 7
    assert errors[0].startswith("--set nope=1")
    assert {e.split(":")[0] for e in errors} == {
        "--set nope=1", "extra", "sdedit.t0", "sdedit.sampler", "sdedit.steps",
        "compute.batch_size", "compute.bach_size"}


def test_good_spec_defaults() -> None:
    spec = parse_spec(GOOD, source="job.yaml")
    assert isinstance(spec, JobSpec)
    assert spec.name == "bedrooms-v1"
    assert spec.model.source == "google/ddpm-ema-bedroom-256"
    assert spec.model.storage_options == {}
    assert spec.input.shards == ("s3://bucket/in/p-{000000..000127}.tar",)
    assert (spec.input.image, spec.input.mask) == (None, None)
    assert spec.input.max_pixels == 4096 * 4096
    assert (spec.output.image_format, spec.output.include_guide) == ("png", True)
    s = spec.sdedit
    assert (s.t0, s.sampler, s.steps, s.repeats, s.samples_per_input, s.seed, s.eta) == (
        0.5, "ddpm", None, 1, 1, 0, 0.0)
    c = spec.compute
    assert (c.device, c.dtype, c.batch_size, c.gpus_per_actor, c.cpus_per_actor) == (
        "auto", "auto", 8, 1.0, None)
    assert c.actors == ActorsSpec(1, 1)
    assert c.shard_retries == 2
    with pytest.raises(AttributeError):
        spec.name = "other"  # type: ignore[misc]


def test_good_spec_values_and_normalisation() -> None:
    data = copy.deepcopy(GOOD)
    data["input"].update(shards=["a.tar", "b.tar"], image=".jpg", mask="mask.png")
    data["sdedit"] = {"t0": 1, "sampler": "ddim", "steps": 50, "eta": 0.5}
    data["compute"] = {"actors": 3, "gpus_per_actor": 0.5, "cpus_per_actor": 2}
    spec = parse_spec(data)
    assert spec.input.shards == ("a.tar", "b.tar")
    assert (spec.input.image, spec.input.mask) == ("jpg", "mask.png")
    assert spec.sdedit.t0 == 1.0 and isinstance(spec.sdedit.t0, float)
    assert spec.compute.actors == ActorsSpec(3, 3)
    assert spec.compute.cpus_per_actor == 2.0
    assert parse_spec(_with("compute.actors", {"min": 0, "max": 4})).compute.actors == \
        ActorsSpec(0, 4)
    assert parse_spec(_with("compute.actors", {"min": 3})).compute.actors == ActorsSpec(3, 3)
    assert parse_spec(_with("sdedit", {"sampler": "ve", "steps": 2000})).sdedit.steps == 2000
    assert parse_spec(_with("sdedit", {"t0": 0.0006, "steps": 1})).sdedit.steps == 1
    assert parse_spec(_with("output.storage_options", None)).output.storage_options == {}


def test_apply_overrides() -> None:
    data = _with("compute.actors", 2)
    out = apply_overrides(data, ["sdedit.t0=0.4", "compute.actors.max=4",
                                 "input.shards=[a.tar, b.tar]", "sdedit.steps=null",
                                 "input.storage_options.anon=true", "sdedit.eta=1e-3",
                                 "output.path=s3://b/x=y"])
    assert out["sdedit"] == {"t0": 0.4, "steps": None, "eta": 0.001}
    assert out["compute"]["actors"] == {"min": 2, "max": 4}
    assert out["input"]["shards"] == ["a.tar", "b.tar"]
    assert out["input"]["storage_options"] == {"anon": True}
    assert out["output"]["path"] == "s3://b/x=y"
    assert data == _with("compute.actors", 2)  # input untouched
    with pytest.raises(SpecError) as info:
        apply_overrides(GOOD, ["a", "sdedit.t0=0.1", "compute.nope=1"])
    assert info.value.source == "--set"
    assert [e.split(":")[0] for e in info.value.errors] == ["--set a", "--set compute.nope=1"]


def test_fingerprint_stability_and_fields() -> None:
    base = parse_spec(GOOD)
    assert base.fingerprint() == parse_spec(copy.deepcopy(GOOD)).fingerprint()
    assert len(base.fingerprint()) == 64
    same = ["name=other", "compute.batch_size=64", "compute.actors=4", "compute.device=cpu",
            "input.shards=[x.tar]", "output.path=/elsewhere",
            "output.png_compress_level=9",  # file size only: pixels are the same at every level
            "compute.host_threads=4",
            "input.storage_options={anon: true}", "model.storage_options={token: x}"]
    for override in same:
        assert parse_spec(GOOD, overrides=[override]).fingerprint() == base.fingerprint(), \
            override
    changed = ["model.source=other/model", "input.image=jpg", "input.mask=mask.png",
               "output.image_format=webp", "output.include_guide=false", "sdedit.t0=0.4",
               "sdedit.sampler=ve", "sdedit.steps=10", "sdedit.repeats=2",
               "sdedit.samples_per_input=2", "sdedit.seed=1"]
    prints = {parse_spec(GOOD, overrides=[o]).fingerprint() for o in changed}
    assert len(prints) == len(changed) and base.fingerprint() not in prints
    ddim = parse_spec(GOOD, overrides=["sdedit.sampler=ddim"])
    assert parse_spec(GOOD, overrides=["sdedit.sampler=ddim", "sdedit.eta=1"]).fingerprint() \
        != ddim.fingerprint()


# The fingerprint of OLD_JOB as the code before input.max_pixels existed computed it (main at
# 3c176e9): a job started then must resume unchanged (see also output/test_jobrecord.py).
OLD_JOB: dict[str, Any] = {
    "name": "old-job", "model": {"source": "/models/rooms-64"},
    "input": {"shards": "/data/in/part-{000000..000002}.tar", "mask": "mask.png"},
    "output": {"path": "/data/out"}, "sdedit": {"t0": 0.04, "sampler": "ddpm", "seed": 7},
    "compute": {"device": "cpu", "batch_size": 3}}
OLD_FINGERPRINT = "72d45b03de50b6a7a4d8796d5e8c447fff77c4c7431c1e98d0546984d046be85"


def test_max_pixels_joins_the_fingerprint_only_when_it_is_not_the_default() -> None:
    old = parse_spec(OLD_JOB)
    assert old.input.max_pixels == 4096 * 4096
    assert old.fingerprint() == OLD_FINGERPRINT
    assert "max_pixels" not in old.output_affecting()["input"]
    explicit = parse_spec(OLD_JOB, overrides=["input.max_pixels=16777216"])
    assert explicit.fingerprint() == OLD_FINGERPRINT
    smaller = parse_spec(OLD_JOB, overrides=["input.max_pixels=1000000"])
    assert smaller.output_affecting()["input"]["max_pixels"] == 1_000_000
    assert smaller.fingerprint() != OLD_FINGERPRINT
    assert _errors(_with("input.max_pixels", 0)) == [
        "input.max_pixels: 0 is out of range; allowed: an integer in [1, 1099511627776]"]


def test_lossy_quality_is_settable_checked_and_joins_the_fingerprint_only_off_default() -> None:
    jpg = parse_spec(GOOD, overrides=["output.image_format=jpg"])
    assert (jpg.output.jpeg_quality, jpg.output.webp_quality, jpg.output.quality()) == (95, 95, 95)
    assert parse_spec(GOOD).output.quality() is None  # png: no quality
    # the default is what jpg and webp outputs were encoded with before the setting existed
    for fmt in ("jpg", "webp"):
        at_default = parse_spec(GOOD, overrides=[f"output.image_format={fmt}",
                                                 f"output.{fmt.replace('jpg', 'jpeg')}_quality=95"])
        assert at_default.fingerprint() == parse_spec(
            GOOD, overrides=[f"output.image_format={fmt}"]).fingerprint()
    lower = parse_spec(GOOD, overrides=["output.image_format=jpg", "output.jpeg_quality=80"])
    assert lower.output.quality() == 80 and lower.fingerprint() != jpg.fingerprint()
    assert lower.output_affecting()["output"]["jpeg_quality"] == 80
    webp = parse_spec(GOOD, overrides=["output.image_format=webp", "output.webp_quality=70"])
    assert webp.output.quality() == 70
    assert _errors(_with("output.jpeg_quality", 101)) == [
        "output.jpeg_quality: 101 is out of range; allowed: an integer in [0, 100]"]
    # a quality the chosen format never uses is refused, not silently ignored
    assert _errors(_with("output.webp_quality", 80)) == [
        "output.webp_quality: 80 is only used with output.image_format webp (image_format is "
        "png); allowed: 95 (the default), or image_format webp"]


def test_problems_are_counted_in_one_wording() -> None:
    with pytest.raises(SpecError) as one:
        parse_spec(_with("sdedit.t0", 2), source="job.yaml")
    assert str(one.value).startswith("job.yaml: 1 problem\n  - sdedit.t0: 2 is out of range")
    with pytest.raises(SpecError) as two:
        parse_spec(_with("sdedit.t0", 2), source="job.yaml", overrides=["sdedit.seed=-1"])
    assert str(two.value).startswith("job.yaml: 2 problems\n  - ")


def test_to_dict_is_plain_and_redacted() -> None:
    data = copy.deepcopy(GOOD)
    data["input"]["storage_options"] = {
        "key": "AKIA", "secret": "s", "token": "t", "anon": False,
        "client_kwargs": {"endpoint_url": "http://h:1", "aws_secret_access_key": "x"}}
    data["model"]["storage_options"] = {"password": "p", "credentials": {"a": 1}}
    spec = parse_spec(data)
    plain = spec.to_dict()
    assert json.loads(json.dumps(plain)) == plain
    assert plain["input"]["storage_options"] == {
        "key": "***", "secret": "***", "token": "***", "anon": False,
        "client_kwargs": {"endpoint_url": "http://h:1", "aws_secret_access_key": "***"}}
    assert plain["model"]["storage_options"] == {"password": "***", "credentials": "***"}
    assert spec.input.storage_options["key"] == "AKIA"  # the spec itself keeps the secret
    assert plain["compute"]["actors"] == {"min": 1, "max": 1}
    assert plain["input"]["shards"] == ["s3://bucket/in/p-{000000..000127}.tar"]


def test_load_spec_file_and_yaml_errors(tmp_path: Path) -> None:
    job = tmp_path / "job.yaml"
    job.write_text("name: j\nmodel: {source: m}\ninput: {shards: a.tar}\noutput: {path: o}\n"
                   "sdedit:\n  t0: 3e-1\n")
    spec = load_spec(str(job), ["sdedit.seed=7"])
    assert (spec.sdedit.t0, spec.sdedit.seed) == (0.3, 7)

    job.write_text("name: j\nsdedit:\n  t0: [0.5\n")
    with pytest.raises(SpecError) as info:
        load_spec(str(job))
    assert info.value.source == str(job)
    assert "invalid YAML at line 4" in info.value.errors[0]

    job.write_text("name: j\nname: k\n")
    with pytest.raises(SpecError, match="line 2, column 1: found duplicate key 'name'"):
        load_spec(str(job))

    job.write_text("- a\n- b\n")
    with pytest.raises(SpecError, match=r"job: \['a', 'b'\] is not a mapping"):
        load_spec(str(job))

    job.write_text("")
    with pytest.raises(SpecError) as info:
        load_spec(str(job))
    assert {e.split(":")[0] for e in info.value.errors} == {
        "name", "model.source", "input.shards", "output.path"}

    with pytest.raises(SpecError, match="cannot read job file"):
        load_spec(str(tmp_path / "missing.yaml"))


def _job_file(tmp_path: Path, body: str) -> str:
    (tmp_path / "in").mkdir(exist_ok=True)
    for i in range(3):
        (tmp_path / "in" / f"p-{i:06d}.tar").write_bytes(b"x")
    job = tmp_path / "job.yaml"
    job.write_text(body)
    return str(job)


def test_validate_cli_ok(tmp_path: Path, tiny_vp_dir: Path) -> None:
    for folder, name in (("done", "p-000001.json"), ("shards", "p-000001.tar"),
                         ("manifests", "p-000001.parquet")):  # a commit (its files present)
        (tmp_path / "out" / folder).mkdir(parents=True)
        (tmp_path / "out" / folder / name).write_text("{}")
    job = _job_file(tmp_path, f"name: cli\nmodel: {{source: '{tiny_vp_dir}', "
                              "storage_options: {token: t}}\n"
                              f"input: {{shards: '{tmp_path}/in/p-*.tar'}}\n"
                              f"output: {{path: '{tmp_path}/out'}}\n")
    result = CliRunner().invoke(main, ["validate", job, "--set", "sdedit.t0=0.4",
                                       "--set", "compute.actors.max=3"])
    assert result.exit_code == 0, result.output
    resolved = yaml.safe_load(result.stdout)
    assert resolved["sdedit"]["t0"] == 0.4
    assert resolved["compute"]["actors"] == {"min": 1, "max": 3}
    assert resolved["model"]["storage_options"] == {"token": "***"}
    fingerprint = load_spec(job, ["sdedit.t0=0.4"]).fingerprint()
    assert f"# fingerprint: {fingerprint}" in result.stdout
    assert "# input shards: 3 (1 done, 2 pending)" in result.stdout


def test_validate_cli_lists_every_error(tmp_path: Path) -> None:
    job = _job_file(tmp_path, "name: cli\nmodel: {source: m}\ninput: {shards: in/p-*.tar}\n"
                              "output: {path: out}\nsdedit: {t0: 1.5}\ncompute: {bach_size: 2}\n")
    result = CliRunner().invoke(main, ["validate", job, "--set", "sdedit.sampler=ddmp",
                                       "--set", "oops"])
    assert result.exit_code == 2
    assert result.stdout == ""
    assert f"{job}: 4 problems" in result.stderr
    for fragment in ("--set oops: missing '='", "sdedit.t0: 1.5 is out of range",
                     "compute.bach_size: unknown key", "sdedit.sampler: 'ddmp' is not allowed"):
        assert fragment in result.stderr


def test_validate_cli_no_shards(tmp_path: Path) -> None:
    job = _job_file(tmp_path, f"name: cli\nmodel: {{source: m}}\n"
                              f"input: {{shards: '{tmp_path}/in/q-*.tar'}}\n"
                              f"output: {{path: '{tmp_path}/out'}}\n")
    result = CliRunner().invoke(main, ["validate", job])
    assert result.exit_code == 2
    assert "q-*.tar' matches no files" in result.stderr


# Fingerprints of job specs as the first released version computed them (commit a6a2ccb):
# a job started then must resume after any upgrade, so new settings at their defaults must
# leave these unchanged.
PINNED_FINGERPRINTS = [
    ({}, "5f3902098009a237b2218cac2807fc8432485989ed6ff294bcec9c46193d5308"),
    ({"input": {"shards": "a.tar", "mask": "mask.png"},
      "output": {"path": "o", "image_format": "jpg"},
      "sdedit": {"t0": 0.3, "sampler": "ddim", "steps": 20, "eta": 0.5, "repeats": 2,
                 "samples_per_input": 3, "seed": 11}},
     "314b6bcef1ba2ee49f4ab47c6901b36c5f204b629595763bcfb43c17bc90c55d"),
]


@pytest.mark.parametrize(("sections", "fingerprint"), PINNED_FINGERPRINTS)
def test_fingerprints_of_jobs_started_by_earlier_versions_do_not_change(sections, fingerprint):
    data = {"name": "x", "model": {"source": "m"}, "input": {"shards": "a.tar"},
            "output": {"path": "o"}, **sections}
    assert parse_spec(data).fingerprint() == fingerprint
