"""pipeline.driver.preflight: model source, inputs and output checked before any work, no weights
loaded; storage errors are listed problems; --offline skips remote checks only."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import fsspec
import pytest
from click.testing import CliRunner
from huggingface_hub import constants as hub_constants

from pipeline.cli import main
from pipeline.driver.preflight import check_model, preflight
from pipeline.driver.sources import model_problems
from pipeline.errors import PreflightError, ResumeConflictError
from pipeline.job.load import load_spec
from pipeline.output.jobrecord import prepare_output
from tests.support.cli import run_cli_in_session
from tests.support.shards import make_spec, write_job, write_shards

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty hub cache, and the hub itself unreachable (offline mode: no network)."""
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    return cache


def _cache_snapshot(cache: Path, repo: str, model_dir: Path, commit: str = "c0ffee" * 6 + "ab"
                    ) -> Path:
    """Put `model_dir`'s files into the hub cache layout as `repo` at `commit`."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    snapshot = folder / "snapshots" / commit
    shutil.copytree(model_dir, snapshot)
    return snapshot


def test_a_loadable_local_model_has_no_problem_and_is_named(tiny_vp_dir, tiny_sd_dir):
    assert model_problems(str(tiny_vp_dir), None) == ([], [
        f"model.source {tiny_vp_dir}: pixel model, VP noise process (samplers ddpm, ddim, "
        "dpmpp2m), no text, trained at 16x16, image sides multiples of 2"])
    assert model_problems(str(tiny_sd_dir), None) == ([], [
        f"model.source {tiny_sd_dir}: sd model, VP noise process (samplers ddpm, ddim, "
        "dpmpp2m), prompts, guidance cfg, trained at 16x16, image sides multiples of 4"])


def test_local_model_problems_name_what_is_wrong(tiny_vp_dir, tmp_path):
    missing = tmp_path / "nope"
    problems, _ = model_problems(str(missing), None)
    assert problems == [f"model.source: {str(missing)!r} not found (no directory {missing}); "
                        "allowed: a local diffusers model directory, a hub id such as "
                        "google/ddpm-ema-bedroom-256, or an fsspec URL (s3://, gs://, ...)"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no config.json or unet/config.json" in model_problems(str(empty), None)[0][0]
    model = tmp_path / "model"
    shutil.copytree(tiny_vp_dir, model)
    (model / "diffusion_pytorch_model.safetensors").unlink()
    assert "no weights in" in model_problems(str(model), None)[0][0]
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "_class_name": "VQModel"}))
    assert "network class 'VQModel' is not supported" in model_problems(str(model), None)[0][0]
    (model / "config.json").write_text("{not json")
    assert "config.json is not valid JSON" in model_problems(str(model), None)[0][0]
    (model / "config.json").write_text(json.dumps(config))
    (model / "scheduler_config.json").write_text(json.dumps({"_class_name": "Nope"}))
    assert "scheduler 'Nope' is not supported" in model_problems(str(model), None)[0][0]


def test_a_relative_path_that_does_not_exist_reads_as_a_hub_id(hub_cache, tmp_path,
                                                               monkeypatch):
    """The issue's case: validate passed a job whose model directory does not exist."""
    monkeypatch.chdir(tmp_path)
    problems, notes = model_problems("models/rooms-65", None)
    assert notes == [] and len(problems) == 1
    assert problems[0].startswith(f"model.source: 'models/rooms-65' is no local directory "
                                  f"({tmp_path}/models/rooms-65 does not exist), and as a hub "
                                  "id it is not in the hub cache")
    assert "OfflineModeIsEnabled" in problems[0]
    assert model_problems("models/rooms-65", None, offline=True) == ([], [
        "model.source models/rooms-65: not in the hub cache; the hub was not checked "
        "(--offline)"])


def test_a_hub_id_in_the_hub_cache_is_checked_there(hub_cache, tiny_vp_dir):
    snapshot = _cache_snapshot(hub_cache, "org/tiny", tiny_vp_dir)
    for offline in (False, True):
        assert model_problems("org/tiny", None, offline=offline) == ([], [
            f"model.source org/tiny: in the hub cache (revision {snapshot.name})",
            "model.source org/tiny: pixel model, VP noise process (samplers ddpm, ddim, "
            "dpmpp2m), no text, trained at 16x16, image sides multiples of 2"])
    (snapshot / "diffusion_pytorch_model.safetensors").unlink()
    problems, notes = model_problems("org/tiny", None, offline=True)
    assert problems == [] and "incomplete in the hub cache" in notes[0]
    assert "no weights in" in notes[0]


def test_a_url_model_needs_its_config_object(tiny_vp_dir):
    fs = fsspec.filesystem("memory")
    for path in Path(tiny_vp_dir).iterdir():
        fs.pipe_file(f"/pre-model/{path.name}", path.read_bytes())
    assert model_problems("memory://pre-model", None) == ([], [])
    problems, _ = model_problems("memory://pre-nothing", None)
    assert problems[0].startswith("model.source: no config.json or unet/config.json at "
                                  "memory://pre-nothing")
    assert model_problems("memory://pre-nothing", None, offline=True) == (
        [], ["model.source memory://pre-nothing: not checked (--offline)"])


def test_check_model_raises_listing_the_problem(tiny_vp_dir, tmp_path):
    spec = make_spec(tmp_path / "missing-model", [str(tmp_path / "a.tar")], tmp_path / "out")
    with pytest.raises(PreflightError) as info:
        check_model(spec)
    assert info.value.exit_code == 2
    assert str(info.value).startswith("test-job: 1 problem found before any work\n  - "
                                      "model.source: ")
    notes, check = check_model(make_spec(tiny_vp_dir, [str(tmp_path / "a.tar")],
                                         tmp_path / "o"), shards=[])
    assert notes[-1] == (f"model.source {tiny_vp_dir}: pixel model, VP noise process (samplers "
                         "ddpm, ddim, dpmpp2m), no text, trained at 16x16, image sides "
                         "multiples of 2")
    assert notes[0].startswith("memory per actor: about ") and check.precision.net == "fp32"
    assert "the largest input.max_pixels (16777216) allows" in notes[-2]  # no guide to read


def test_local_inputs_must_exist(tiny_vp_dir, tmp_path):
    shards = write_shards(tmp_path / "in", n_shards=2, per_shard=1, bad=False)
    spec = make_spec(tiny_vp_dir, [*shards, str(tmp_path / "in" / "gone.tar")],
                     tmp_path / "out")
    report = preflight(spec)
    assert report.problems == [f"input.shards: 1 of 3 local shard(s) do not exist: "
                               f"{tmp_path}/in/gone.tar"]
    assert report.shards is not None and len(report.shards) == 3 and report.done == 0


def test_validate_refuses_a_missing_model_with_exit_2(tmp_path):
    shards = write_shards(tmp_path / "in", n_shards=1, per_shard=1, bad=False)
    job = write_job(tmp_path / "job.yaml", tmp_path / "no-model", shards, tmp_path / "out")
    result = CliRunner().invoke(main, ["validate", str(job)])
    assert result.exit_code == 2
    assert f"error: {job}: 1 problem found before any work" in result.stderr
    assert f"model.source: '{tmp_path}/no-model' not found" in result.stderr
    assert "# input shards: 1 (0 done, 1 pending)" in result.stdout
    assert "Traceback" not in result.output


@pytest.mark.slow
def test_validate_of_the_readme_example_lists_problems_and_offline_passes(tmp_path):
    """The issue's case: `validate jobs/sketch2bedroom.yaml` crashed with a botocore
    NoCredentialsError traceback and exit 1. Here without AWS credentials (the S3 endpoint
    a closed loopback port, so nothing leaves this machine) and with the hub offline."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "HF_"))}
    env.update(AWS_EC2_METADATA_DISABLED="true", AWS_ENDPOINT_URL_S3="http://127.0.0.1:9",
               AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"),
               AWS_CONFIG_FILE=str(tmp_path / "none"), HF_HUB_OFFLINE="1",
               HF_HOME=str(tmp_path / "hf"))
    job = str(ROOT / "jobs" / "sketch2bedroom.yaml")
    online = run_cli_in_session(["validate", job], env, timeout=120)
    assert online.returncode == 2, online.stderr[-3000:]
    assert "Traceback" not in online.stderr
    assert f"error: {job}: 3 problems found before any work" in online.stderr
    for line in ("  - model.source: 'google/ddpm-ema-bedroom-256' is no local directory",
                 "  - input.shards: cannot read s3://my-bucket/sdedit/bedroom-strokes-256/"
                 "strokes-000000.tar: NoCredentialsError: Unable to locate credentials",
                 "  - output.path: cannot read s3://my-bucket/sdedit/runs/sketch2bedroom: "
                 "NoCredentialsError: Unable to locate credentials"):
        assert line in online.stderr, online.stderr
    offline = run_cli_in_session(["validate", job, "--offline"], env, timeout=120)
    assert offline.returncode == 0, offline.stderr[-3000:]
    assert "# input shards: not listed" in offline.stdout
    for note in ("# model.source google/ddpm-ema-bedroom-256: not in the hub cache; the hub "
                 "was not checked (--offline)",
                 "# input.shards: remote shards not listed or checked (--offline)",
                 "# output.path s3://my-bucket/sdedit/runs/sketch2bedroom: not checked "
                 "(--offline)"):
        assert note in offline.stdout, offline.stdout


@pytest.mark.s3
@pytest.mark.slow
def test_storage_errors_are_listed_problems(s3_bucket, tiny_vp_dir, tmp_path, monkeypatch):
    """No credentials and no bucket on a real S3 server: problems, never a traceback."""
    for name in [n for n in os.environ if n.startswith("AWS_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    admin = dict(s3_bucket.storage_options)
    anonymous = {"client_kwargs": admin["client_kwargs"], "skip_instance_cache": True}
    shards = f"{s3_bucket.url}/in/p-{{000000..000001}}.tar"
    spec = make_spec(tiny_vp_dir, shards, tmp_path, output={
        "path": f"{s3_bucket.url}/out", "storage_options": anonymous},
        input={"storage_options": anonymous})
    report = preflight(spec)
    assert report.problems == [
        f"input.shards: cannot read {s3_bucket.url}/in/p-000000.tar: NoCredentialsError: "
        "Unable to locate credentials",
        f"output.path: cannot read {s3_bucket.url}/out: NoCredentialsError: Unable to locate "
        "credentials"]
    spec = make_spec(tiny_vp_dir, shards, tmp_path, output={
        "path": "s3://no-such-bucket-here/out", "storage_options": admin},
        input={"storage_options": admin})
    report = preflight(spec)
    assert report.problems[0] == (f"input.shards: the first remote shard {s3_bucket.url}/in/"
                                  "p-000000.tar does not exist")
    assert report.problems[1] == ("output.path: cannot read s3://no-such-bucket-here/out: "
                                  "NoSuchBucket: The specified bucket does not exist")
    assert preflight(spec, offline=True).problems == []


def test_run_refuses_a_missing_model_before_ray_and_job_json(tmp_path):
    """The issue's case: run failed after 16 s of Ray start-up and left job.json behind."""
    import ray

    shards = write_shards(tmp_path / "in", n_shards=1, per_shard=1, bad=False)
    job = write_job(tmp_path / "job.yaml", tmp_path / "no-model", shards, tmp_path / "out")
    result = CliRunner().invoke(main, ["run", str(job), "--no-progress"])
    assert result.exit_code == 2
    assert result.stderr.startswith("error: test-job: 1 problem found before any work\n"
                                    f"  - model.source: '{tmp_path}/no-model' not found")
    assert not ray.is_initialized()
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("job", sorted(p.name for p in (ROOT / "jobs").glob("*.yaml")))
def test_every_shipped_job_file_is_valid_offline(job, monkeypatch):
    """Each job of jobs/ parses into a spec and passes the offline preflight (remote inputs,
    outputs and hub models are only noted), so an example in the README cannot rot. Local
    paths in them are relative to the repository root, as the README runs them."""
    monkeypatch.chdir(ROOT)
    spec = load_spec(str(ROOT / "jobs" / job))
    report = preflight(spec, offline=True, overwrite=True)  # whatever an earlier run left
    assert report.problems == [], report.problems


def test_validate_makes_the_checks_run_makes_before_ray(tiny_vp_dir, tmp_path):
    """validate said yes where run said no: a resume with changed settings, a job.json that
    cannot be read (run: a traceback), a truncated weights file (run: refused only by the
    actors, after Ray started and job.json was written)."""
    shards = write_shards(tmp_path / "in", n_shards=1, per_shard=1, bad=False)
    out = tmp_path / "out" / "job"
    spec = make_spec(tiny_vp_dir, shards, out)
    assert preflight(spec).problems == []
    assert not (tmp_path / "out").exists()  # the write probe leaves no folder behind
    prepare_output(spec, overwrite=False)
    job = write_job(tmp_path / "job.yaml", tiny_vp_dir, shards, out, sdedit={"t0": 0.05})
    changed = load_spec(str(job))
    with pytest.raises(ResumeConflictError) as refused:
        prepare_output(changed, overwrite=False)
    assert preflight(changed).problems == [f"output.path: {refused.value}"]
    assert "sdedit.t0: 0.04 -> 0.05" in str(refused.value)
    assert CliRunner().invoke(main, ["validate", str(job)]).exit_code == 2
    result = CliRunner().invoke(main, ["validate", str(job), "--overwrite"])
    assert result.exit_code == 0 and "(run --overwrite discards them)" in result.output
    (out / "job.json").write_text("{not json")
    with pytest.raises(ResumeConflictError, match=r"its job\.json cannot be read as a job "
                                                  r"record \(Expecting property name"):
        prepare_output(spec, overwrite=False)
    assert "job.json cannot be read as a job record" in preflight(spec).problems[0]
    model = tmp_path / "model"
    shutil.copytree(tiny_vp_dir, model)
    weights = model / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    cut = make_spec(model, shards, tmp_path / "out2")
    assert "diffusion_pytorch_model.safetensors is truncated" in preflight(cut).problems[0]
    with pytest.raises(PreflightError, match="is truncated"):
        check_model(cut)  # what run calls before Ray


@pytest.mark.s3
def test_validate_refuses_an_output_it_can_read_but_not_write(s3_bucket, tiny_vp_dir,
                                                               tmp_path):
    """A read-only identity passed validate (it only listed the output), and run refused it."""
    shards = write_shards(tmp_path / "in", n_shards=1, per_shard=1, bad=False)
    spec = make_spec(tiny_vp_dir, shards, tmp_path, output={
        "path": f"{s3_bucket.url}/out", "storage_options": s3_bucket.readonly_storage_options})
    problems = preflight(spec).problems
    assert len(problems) == 1
    assert problems[0].startswith(f"output.path {s3_bucket.url}/out: cannot write: "
                                  "AccessDenied")
