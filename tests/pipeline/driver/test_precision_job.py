"""`model.weights_dtype` through `sdedit-batch run`: a job.json from before the setting resumes
with fp32 weights and the outputs fp32 gives; a new job resolves auto and records it; bf16,
fp16 (SDXL's auto) and fp8 jobs of both families make outputs close to fp32's (every precision
of every family against fp32 through the engine: tests/sdedit/test_precision.py)."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pyarrow.dataset as pads
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from pipeline.cli import main
from pipeline.job.load import load_spec
from pipeline.output.jobrecord import job_record
from sdedit import edit, load_model
from tests.sdedit.test_precision import LEVELS
from tests.support.shards import png, write_job


def _shard(tmp_path):
    import webdataset as wds

    rng = np.random.default_rng(9)
    url = str(tmp_path / "in-0.tar")
    with wds.TarWriter(url) as tar:
        for key in ("a", "b"):
            tar.write({"__key__": key, "png": png(rng.integers(0, 256, (16, 16, 3), np.uint8))})
    return url


def _run(job, *overrides):
    result = CliRunner().invoke(main, ["run", str(job), "--no-progress",
                                       *[a for o in overrides for a in ("--set", o)]])
    assert result.exit_code == 0, result.output
    return result.output


def _pixels(out) -> dict[str, np.ndarray]:
    with tarfile.open(out / "shards" / "in-0.tar") as tar:
        return {m.name: np.asarray(Image.open(io.BytesIO(tar.extractfile(m).read())))
                .astype(int) for m in tar.getmembers() if m.name.endswith(("a.png", "b.png"))}


def _rows(out) -> list[dict]:
    return pads.dataset(str(out / "manifests"), format="parquet").to_table().to_pylist()


def test_a_job_from_before_weights_dtype_resumes_in_fp32(ray_connected, tiny_flux_dev_dir,
                                                         tmp_path):
    url = _shard(tmp_path)
    old, new = tmp_path / "old", tmp_path / "new"
    sd = {"t0": 0.4, "sampler": "euler", "steps": 2, "prompt": "lamp"}
    job = write_job(tmp_path / "job.yaml", tiny_flux_dev_dir, [url], old, sdedit=sd,
                    compute={"batch_size": 2, "cpus_per_actor": 1})
    record = job_record(load_spec(str(job)))          # what the version before wrote:
    del record["spec"]["model"]["weights_dtype"]      # no weights_dtype, no precision
    for key in ("offload", "gpu_memory_gb", "compile"):
        del record["spec"]["compute"][key]
    old.mkdir()
    (old / "job.json").write_text(json.dumps(record))
    printed = _run(job)
    assert "# memory per actor: about" in printed and "(fp32)" in printed
    assert json.loads((old / "job.json").read_text())["precision"]["parts"]["transformer"] == \
        "fp32"
    _run(job, f"output.path={tmp_path / 'fp32'}", "model.weights_dtype=fp32")
    assert all(np.array_equal(a, b) for a, b in
               zip(_pixels(old).values(), _pixels(tmp_path / "fp32").values(), strict=True))
    assert all("@" not in r["model_identity"] for r in _rows(old))       # identity unchanged
    # the same job file in a new output folder: auto = Flux's bf16, recorded
    _run(job, f"output.path={new}")
    precision = json.loads((new / "job.json").read_text())["precision"]
    assert precision["request"] == "auto" and set(precision["parts"].values()) == {"bf16"}
    assert precision["plan"]["size"] == [16, 16]
    assert all(r["model_identity"].endswith("transformer bf16, vae bf16") and
               r["dtype"] == "bf16" for r in _rows(new))
    worst = max(np.abs(a - b).max() for a, b in
                zip(_pixels(new).values(), _pixels(old).values(), strict=True))
    assert 0 < worst <= LEVELS["bf16"] + 1                 # + 1: 8-bit rounding


@pytest.mark.parametrize("fixture,weights,sampler", [
    ("tiny_flux_dev_dir", "fp8", "euler"), ("tiny_sdxl_dir", "auto", "ddim"),
    ("tiny_sdxl_dir", "bf16", "ddim"), ("tiny_sdxl_dir", "fp8", "ddim")])
def test_low_precision_jobs_stay_close_to_fp32(ray_connected, fixture, weights, sampler,
                                               tmp_path, request):
    directory = request.getfixturevalue(fixture)
    url = _shard(tmp_path)
    job = write_job(tmp_path / "job.yaml", directory, [url], tmp_path / "out",
                    sdedit={"t0": 0.5, "sampler": sampler, "steps": 4, "prompt": "red cat"},
                    model={"weights_dtype": weights},
                    compute={"batch_size": 2, "cpus_per_actor": 1})
    _run(job)
    reference = load_model(directory)                      # fp32 weights
    expected = {"auto": "fp16", "bf16": "bf16", "fp8": "fp8"}[weights]
    pixels = _pixels(tmp_path / "out")
    for row in _rows(tmp_path / "out"):
        assert f"{'unet' if 'sdxl' in fixture else 'transformer'} {expected}" in \
            row["model_identity"]
        guide = torch.from_numpy(_guide(url, row["key"]))
        again = edit(reference, guide.permute(2, 0, 1)[None].float() / 127.5 - 1,
                     t0=row["t0"], seeds=[row["seed"]], sampler=sampler, steps=4,
                     prompts=[row["prompt"]])
        fp32 = ((again[0] + 1) * 127.5).round().clamp(0, 255).permute(1, 2, 0).numpy()
        assert np.abs(pixels[f"{row['key']}.png"] - fp32).max() <= LEVELS[expected] + 1


def _guide(url: str, key: str) -> np.ndarray:
    with tarfile.open(url) as tar:
        return np.array(Image.open(io.BytesIO(tar.extractfile(f"{key}.png").read())))
