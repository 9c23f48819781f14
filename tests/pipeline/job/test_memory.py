"""`model.weights_dtype` and the memory plan of a job (`pipeline.job.memory`), without Ray."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.errors import ModelSettingsError, SpecError
from pipeline.job.memory import job_plan, precision_of, weights_request
from pipeline.worker.hooks import Hooks
from pipeline.worker.shard import ShardWorker
from sdedit import Precision, inspect_model_dir
from tests.support.shards import make_spec, write_job, write_shards


def test_auto_means_what_the_output_was_started_with(tiny_vp_dir, tmp_path):
    spec = make_spec(tiny_vp_dir, ["a.tar"], tmp_path / "out")
    assert spec.model.weights_dtype == "auto"
    assert weights_request(spec, None) == "auto"                       # a new job
    assert weights_request(spec, {"spec": {}, "fingerprint": "x"}) == "fp32"   # from before
    recorded = {"precision": {"request": "auto", "parts": {"transformer": "fp8", "vae": "bf16",
                                                           "text_encoder": "bf16"}}}
    assert weights_request(spec, recorded) == Precision("fp8", "bf16", "bf16", "auto")
    assert weights_request(spec, {"precision": {"request": "fp32", "parts": None}}) == "fp32"
    bf16 = make_spec(tiny_vp_dir, ["a.tar"], tmp_path / "out", model={"weights_dtype": "bf16"})
    assert weights_request(bf16, {"spec": {}}) == "bf16"              # named: as named
    # auto keeps a job's fingerprint (old jobs resume); a named precision changes it
    assert spec.fingerprint() == make_spec(tiny_vp_dir, ["b.tar"], tmp_path / "o2").fingerprint()
    assert bf16.fingerprint() != spec.fingerprint()
    with pytest.raises(SpecError, match=r"model\.weights_dtype: .fp4."):
        make_spec(tiny_vp_dir, ["a.tar"], tmp_path / "out", model={"weights_dtype": "fp4"})


def test_validate_refuses_a_plan_over_gpu_memory_gb_and_an_actor_its_device(tiny_flux_dev_dir,
                                                                         tmp_path):
    shards = write_shards(tmp_path / "in", n_shards=1, per_shard=1, bad=False)
    job = write_job(tmp_path / "job.yaml", tiny_flux_dev_dir, shards, tmp_path / "out",
                    sdedit={"sampler": "euler"})
    fine = CliRunner().invoke(main, ["validate", str(job)])
    assert fine.exit_code == 0, fine.output
    assert "# memory per actor: about 1.3 GB (offload none; 3 image(s) of 16x16" in fine.output
    assert "#   weights transformer: 0.0 GB (bf16)" in fine.output      # auto: Flux's bf16
    assert "#   fits: 16 GB (T4): yes; 24 GB (L4, A10G): yes" in fine.output
    refused = CliRunner().invoke(main, ["validate", str(job), "--set",
                                        "compute.gpu_memory_gb=1"])
    assert refused.exit_code == 2
    message = ("compute.gpu_memory_gb: memory per actor about 1.3 GB (offload none; weights "
               "0.0 GB at bf16) exceeds compute.gpu_memory_gb 1.0; would fit: a GPU with more "
               "memory")
    assert message in refused.output
    spec = make_spec(tiny_flux_dev_dir, shards, tmp_path / "out", sdedit={"sampler": "euler"})
    with pytest.raises(ModelSettingsError, match=r"exceeds this device's 0\.5 GB; would fit"):
        ShardWorker(spec, hooks=Hooks(device_memory_gb=0.5))         # an actor, at start
    clash = CliRunner().invoke(main, ["validate", str(job), "--set", "compute.dtype=fp16"])
    assert clash.exit_code == 2 and "compute.dtype: compute.dtype fp16 with bf16 weights " \
        "(model.weights_dtype auto): a network with bf16 weights computes in bf16" in \
        clash.output


@pytest.mark.parametrize("guidance,rows", [(None, 2), (1.0, 2), (3.0, 4)])
def test_a_job_is_planned_at_the_guidance_it_runs(open_family_dirs, tmp_path, guidance, rows):
    """No `sdedit.guidance_scale`: the family's default (Z-Image-Turbo's 1.0 runs no negative
    pass, one network row per image); above 1, two rows per image."""
    directory = open_family_dirs["z-image"]
    sdedit = {} if guidance is None else {"guidance_scale": guidance}
    spec = make_spec(directory, ["a.tar"], tmp_path / "out", compute={"batch_size": 2},
                     sdedit=sdedit)
    layout = inspect_model_dir(directory, "z-image")
    plan = job_plan(spec, layout, precision_of("auto", layout), (16, 16), "test").plan
    assert plan.rows == rows
