"""A flow-matching model (tiny Flux-dev: packed latents, guidance input) through a job on Ray:
per-row prompts and t0 from {key}.json, each output made again from its manifest row."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pyarrow.dataset as pads
import pytest
import torch
import webdataset as wds
from PIL import Image

from pipeline.driver.preflight import preflight
from pipeline.driver.runner import run_job
from pipeline.errors import ModelSettingsError, PipelineError
from pipeline.worker.shard import ShardWorker
from sdedit import edit
from tests.support.shards import make_spec, png, write_row_shards


def _members(tar_path) -> dict[str, bytes]:
    with tarfile.open(tar_path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def test_flux_job_with_per_row_prompts_and_t0_on_ray(ray_connected, tiny_flux_dev,
                                                     tiny_flux_dev_dir, tmp_path):
    rng = np.random.default_rng(5)
    guides = {f"k{i}": rng.integers(0, 256, (16, 16, 3), np.uint8) for i in range(5)}
    guides["k5"] = rng.integers(0, 256, (16, 18, 3), np.uint8)       # not a multiple of 4
    settings = {"k0": {"prompt": "red cat", "t0": 0.2}, "k1": {"prompt": "blue dog"},
                "k2": {"t0": 0.3}, "k3": {}, "k4": {"prompt": "sky", "t0": 0.15}, "k5": {}}
    urls = write_row_shards(tmp_path, guides, settings, txt_key="k3")
    out = tmp_path / "out"
    spec = make_spec(tiny_flux_dev_dir, urls, out, model={"weights_dtype": "fp32"},
                     sdedit={"t0": 0.25, "sampler": "euler", "prompt": "lamp",
                             "guidance_scale": 2.0},
                     compute={"batch_size": 4, "cpus_per_actor": 1})
    summary = run_job(spec, progress=False)
    assert (summary.outputs_ok, summary.outputs_error, summary.shards_done) == (5, 1, 2)
    table = pads.dataset(str(out / "manifests"), format="parquet").to_table()
    rows = {row["key"]: row for row in table.to_pylist()}
    assert rows["k5"]["error_kind"] == "size" and "multiples of 4" in rows["k5"]["error"]
    expected = {"k0": ("red cat", 0.2, 6), "k1": ("blue dog", 0.25, 7), "k2": ("lamp", 0.3, 8),
                "k3": ("red room", 0.25, 7), "k4": ("sky", 0.15, 4)}   # steps: round(28 t0)
    members = {**_members(out / "shards" / "in-0.tar"), **_members(out / "shards" / "in-1.tar")}
    for key, (prompt, t0, steps) in expected.items():
        row = rows[key]
        assert (row["prompt"], row["negative_prompt"], row["t0"], row["steps"]) == \
            (prompt, "", t0, steps)
        assert (row["guidance_scale"], row["sampler"], row["status"]) == (2.0, "euler", "ok")
        assert row["model_identity"] == tiny_flux_dev.identity
        # made again from its manifest row alone: the same image, to the rounding of a
        # different batch (at most one level)
        image = torch.from_numpy(guides[key]).permute(2, 0, 1)[None].float() / 127.5 - 1
        again = edit(tiny_flux_dev, image, t0=row["t0"], seeds=[row["seed"]],
                     sampler=row["sampler"], prompts=[row["prompt"]],
                     guidance_scale=row["guidance_scale"])
        remade = ((again[0] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
        stored = np.asarray(Image.open(io.BytesIO(members[f"{key}.png"])).convert("RGB"))
        assert np.abs(remade.permute(1, 2, 0).numpy().astype(int) - stored.astype(int)).max() \
            <= 1, key
    assert members["k3.txt"] == b"red room" and "k3.input.json" in members   # carried


def test_what_a_flux_schnell_model_cannot_do_is_refused_before_ray(tiny_flux_schnell_dir,
                                                                  tmp_path):
    """A sampler its flow process does not run, a negative prompt (no classifier-free
    guidance) and a guidance scale (no guidance input) are refused before any work, all
    listed; `validate` names the family it read from the configs."""
    spec = make_spec(tiny_flux_schnell_dir, [str(tmp_path / "x.tar")], tmp_path / "out",
                     sdedit={"sampler": "ddpm", "negative_prompt": "blurry",
                             "guidance_scale": 3.0})
    with pytest.raises(PipelineError) as info:
        run_job(spec, progress=False)
    message = str(info.value)
    assert "sdedit.sampler: sampler='ddpm' cannot run on" in message and \
        "allowed: euler, flow_ddpm" in message
    assert "sdedit.negative_prompt: negative prompt 'blurry' given for" in message
    assert "sdedit.guidance_scale: guidance_scale=3.0 given for" in message
    assert not (tmp_path / "out").exists()
    with pytest.raises(ModelSettingsError, match=r"sdedit\.sampler: sampler='ddpm' cannot"):
        ShardWorker(spec)                      # an actor refuses it too (e.g. a URL source)
    ok = make_spec(tiny_flux_schnell_dir, [str(tmp_path / "x.tar")], tmp_path / "out",
                   sdedit={"sampler": "euler"})
    assert any("flux model, FLOW noise process (samplers euler, flow_ddpm), prompts, guidance "
               "none" in note and "multiples of 4" in note for note in preflight(ok).notes)


def test_a_row_negative_prompt_for_flux_is_that_rows_setting_error(tiny_flux_dev,
                                                                   tiny_flux_dev_dir, tmp_path):
    rng = np.random.default_rng(6)
    url = str(tmp_path / "in.tar")
    with wds.TarWriter(url) as tar:
        for key, settings in (("a", {"negative_prompt": "sky"}), ("b", {"prompt": "cat"}),
                              ("c", {"negative_prompt": ""})):
            tar.write({"__key__": key, "json": json.dumps(settings).encode(),
                       "png": png(rng.integers(0, 256, (16, 16, 3), np.uint8))})
    spec = make_spec(tiny_flux_dev_dir, [url], tmp_path / "out",
                     sdedit={"t0": 0.1, "sampler": "euler"})
    stats = ShardWorker(spec, model=tiny_flux_dev).process(url)
    assert (stats.outputs_ok, stats.outputs_error) == (2, 1)
    rows = {r["key"]: r for r in pads.dataset(str(tmp_path / "out" / "manifests"),
                                              format="parquet").to_table().to_pylist()}
    assert rows["a"]["error_kind"] == "setting"
    assert "negative_prompt in a.json is 'sky'" in rows["a"]["error"]
    assert rows["b"]["status"] == rows["c"]["status"] == "ok"
    assert rows["b"]["guidance_scale"] == 3.5                 # Flux-dev's default input
