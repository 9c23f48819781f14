"""The job settings a model decides are checked by one function (`pipeline.job.modelcheck`) in
`validate`, in `run` before Ray starts, and in each actor on the loaded model, with the same
words. Before this, `--set sdedit.sampler=ve` on the bundled VP model passed validate, and run
committed every sample as an error row (issue 19); steps were checked against a hard-coded
1,000-step schedule (issue 17)."""

from __future__ import annotations

import pytest
import ray
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.driver.runner import run_job
from pipeline.errors import ModelSettingsError, PreflightError
from pipeline.job.modelcheck import layout_problems
from pipeline.worker.shard import ShardWorker
from sdedit.families import inspect_model_dir
from tests.support.shards import make_spec, write_job, write_shards

BAD = [
    (dict(sampler="ve"), "sdedit.sampler: sampler='ve' cannot run on"),
    (dict(t0=0.5, steps=600), "sdedit.steps: steps=600 is too many for t0=0.5"),
    (dict(t0=0.0004), "sdedit.t0: t0=0.0004 is out of range"),
    (dict(prompt="a room"), "sdedit.prompt: prompt='a room' is for text-conditioned models"),
    (dict(guidance_scale=3.0), "sdedit.guidance_scale: guidance_scale=3.0 is for text-"),
]


@pytest.mark.parametrize(("settings", "fragment"), BAD)
def test_validate_refuses_what_the_model_cannot_run(tiny_vp_dir, tmp_path, settings, fragment):
    shards = write_shards(tmp_path / "in", n_shards=1, per_shard=1, bad=False)
    job = write_job(tmp_path / "job.yaml", tiny_vp_dir, shards, tmp_path / "out",
                    sdedit=settings)
    result = CliRunner().invoke(main, ["validate", str(job)])
    assert result.exit_code == 2, result.output
    assert fragment in result.output


def test_run_refuses_them_before_ray_and_job_json(tiny_vp_dir, tmp_path):
    shards = write_shards(tmp_path / "in", n_shards=1, per_shard=1, bad=False)
    spec = make_spec(tiny_vp_dir, shards, tmp_path / "out", sdedit={"sampler": "ve"})
    assert not ray.is_initialized()
    with pytest.raises(PreflightError, match=r"sdedit\.sampler: sampler='ve' cannot run on"):
        run_job(spec, progress=False)
    assert not ray.is_initialized() and not (tmp_path / "out" / "job.json").exists()


@pytest.mark.parametrize(("settings", "fragment"), BAD)
def test_an_actor_refuses_them_on_the_loaded_model_in_the_same_words(
        tiny_vp, tiny_vp_dir, tmp_path, settings, fragment):
    spec = make_spec(tiny_vp_dir, [str(tmp_path / "x.tar")], tmp_path / "out", sdedit=settings)
    expected = layout_problems(spec, inspect_model_dir(tiny_vp_dir, spec.model.source))
    assert len(expected) == 1 and expected[0].startswith(fragment)
    with pytest.raises(ModelSettingsError) as info:
        ShardWorker(spec, model=tiny_vp)
    assert str(info.value).endswith(expected[0])


def test_settings_the_model_runs_pass_every_check(tiny_sd, tiny_sd_dir, tmp_path):
    spec = make_spec(tiny_sd_dir, [str(tmp_path / "x.tar")], tmp_path / "out",
                     sdedit={"sampler": "dpmpp2m", "t0": 0.3, "steps": 5, "prompt": "a room",
                             "negative_prompt": "blur", "guidance_scale": 4.0})
    assert layout_problems(spec, inspect_model_dir(tiny_sd_dir, spec.model.source)) == []
    ShardWorker(spec, model=tiny_sd)


@pytest.mark.parametrize(("train_steps", "steps", "refused"),
                         [(2000, 800, False), (100, 60, True), (100, 50, False)])
def test_steps_are_checked_against_the_models_own_schedule(tmp_path, train_steps, steps,
                                                            refused):
    """t0 = 0.5 starts from index round(0.5 T) - 1, whatever T the model was trained with (the
    spec used to assume T = 1,000: it refused 800 steps of a 2,000-step model and passed 60 of
    a 100-step one, whose every row then failed)."""
    from diffusers import DDPMScheduler

    from tests.support.tiny_models import tiny_unet

    model = tmp_path / "m"
    tiny_unet().save_pretrained(model)
    DDPMScheduler(num_train_timesteps=train_steps).save_config(model)
    shards = write_shards(tmp_path / "in", n_shards=1, per_shard=1, bad=False)
    job = write_job(tmp_path / "job.yaml", model, shards, tmp_path / "out",
                    sdedit={"t0": 0.5, "steps": steps})
    result = CliRunner().invoke(main, ["validate", str(job)])
    assert result.exit_code == (2 if refused else 0), result.output
    assert ("sdedit.steps: steps=60 is too many for t0=0.5" in result.output) == refused


def test_an_actors_refusal_stops_the_job_without_retries(ray_connected, tiny_vp_dir, tmp_path,
                                                          monkeypatch):
    """Where run could not read the model's configs before Ray (a URL model, say), the
    actor's check on the loaded model stops the job with the same words: no shard is retried,
    failed or committed."""
    import pipeline.driver.runner

    monkeypatch.setattr(pipeline.driver.runner, "check_model",
                        lambda spec, **kw: ([], pipeline.driver.runner.ModelCheck()))
    shards = write_shards(tmp_path / "in", n_shards=2, per_shard=1, bad=False)
    out = tmp_path / "out"
    spec = make_spec(tiny_vp_dir, shards, out, sdedit={"sampler": "ve"})
    with pytest.raises(ModelSettingsError, match=r"cannot run this job: sdedit\.sampler: "
                                                 r"sampler='ve' cannot run on"):
        run_job(spec, progress=False)
    assert not (out / "failed").exists() and not (out / "done").exists()


def test_a_guidance_input_below_1_is_the_models_to_judge(tiny_sd_dir, tiny_flux_dev_dir,
                                                         tmp_path):
    """The spec took guidance_scale >= 1 for every model, so a guidance-distilled model's
    input (Flux-dev: any g >= 0) below 1 could not be set; now the family decides: a
    classifier-free-guidance model refuses 0.5 by name."""
    spec = make_spec(tiny_sd_dir, [str(tmp_path / "x.tar")], tmp_path / "out",
                     sdedit={"guidance_scale": 0.5})
    problems = layout_problems(spec, inspect_model_dir(tiny_sd_dir, spec.model.source))
    assert problems == ["sdedit.guidance_scale: guidance_scale=0.5 is not allowed; allowed: "
                        "a number >= 1 (1 = conditional pass only) or None (7.5)"]
    flux = make_spec(tiny_flux_dev_dir, [str(tmp_path / "x.tar")], tmp_path / "out",
                     sdedit={"guidance_scale": 0.5, "sampler": "euler"})
    assert layout_problems(flux, inspect_model_dir(tiny_flux_dev_dir, "m")) == []
