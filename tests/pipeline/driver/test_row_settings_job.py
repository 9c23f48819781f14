"""Per-row settings and carried members end to end (issue 10): a pixel job through the worker,
a latent text-conditioned job through Ray, and each output made again from its manifest row."""

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

from pipeline.driver.runner import run_job
from pipeline.errors import ModelSettingsError, PipelineError
from pipeline.worker.shard import ShardWorker
from sdedit import edit
from tests.support.shards import make_spec, png, write_row_shards


def _members(tar_path) -> dict[str, bytes]:
    with tarfile.open(tar_path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def _rows(out) -> dict[str, dict]:
    table = pads.dataset(str(out / "manifests"), format="parquet").to_table()
    return {row["key"]: row for row in table.to_pylist()}


def _remake(model, row, guide: np.ndarray, **texts) -> np.ndarray:
    """The output of a manifest row made again with sdedit.edit, alone in its batch."""
    image = torch.from_numpy(guide).permute(2, 0, 1)[None].float() / 127.5 - 1.0
    out = edit(model, image, t0=row["t0"], seeds=[row["seed"]], sampler=row["sampler"],
               **texts)
    return ((out[0] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()


def _decoded(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def test_pixel_job_reads_t0_per_row_and_carries_every_other_member(tiny_vp, tiny_vp_dir,
                                                                  tmp_path):
    rng = np.random.default_rng(3)
    guides = {k: rng.integers(0, 256, (16, 16, 3), np.uint8) for k in ("a", "b", "c", "d")}
    url = str(tmp_path / "in.tar")
    with wds.TarWriter(url) as tar:
        tar.write({"__key__": "a", "png": png(guides["a"]), "cls": b"7", "txt": b"a caption",
                   "json": json.dumps({"t0": 0.02, "label": "x", "prompt": "ignored"}).encode()})
        tar.write({"__key__": "b", "png": png(guides["b"])})
        tar.write({"__key__": "c", "png": png(guides["c"]), "json": b'{"t0": 2}'})
        tar.write({"__key__": "d", "png": png(guides["d"]), "json": b"{oops"})
    out = tmp_path / "out"
    spec = make_spec(tiny_vp_dir, [url], out, output={"include_guide": False})
    stats = ShardWorker(spec, model=tiny_vp).process(url)
    assert (stats.outputs_ok, stats.outputs_error) == (2, 2)
    rows = _rows(out)
    assert (rows["a"]["t0"], rows["a"]["steps"]) == (0.02, 20)  # the row's own t0
    assert (rows["b"]["t0"], rows["b"]["steps"]) == (0.04, 40)  # the job's
    assert rows["a"]["prompt"] is None  # pixel model: no prompts
    assert rows["c"]["error_kind"] == rows["d"]["error_kind"] == "setting"
    assert "t0 in c.json is 2; allowed: a number in (0, 1]" in rows["c"]["error"]
    assert "d.json cannot be read as JSON" in rows["d"]["error"]
    members = _members(out / "shards" / "in.tar")
    assert sorted(members) == ["a.cls", "a.input.json", "a.json", "a.png", "a.txt",
                               "b.json", "b.png"]  # carried even without guides
    assert members["a.cls"] == b"7" and members["a.txt"] == b"a caption"
    assert json.loads(members["a.input.json"])["label"] == "x"
    assert json.loads(members["a.json"])["t0"] == 0.02
    for key in ("a", "b"):
        remade = _remake(tiny_vp, rows[key], guides[key])
        assert np.array_equal(remade, _decoded(members[f"{key}.png"]))


def test_prompts_for_a_pixel_model_are_refused_on_load(tiny_vp_dir, tmp_path):
    spec = make_spec(tiny_vp_dir, [str(tmp_path / "x.tar")], tmp_path / "out",
                     sdedit={"prompt": "a room"})
    with pytest.raises(ModelSettingsError, match=r"sdedit\.prompt: prompt='a room' is for "
                                                 "text-conditioned models"):
        ShardWorker(spec)


def test_latent_job_with_per_row_prompts_and_t0_on_ray(ray_connected, tiny_sd, tiny_sd_dir,
                                                       tmp_path):
    rng = np.random.default_rng(4)
    guides = {f"k{i}": rng.integers(0, 256, (16, 16, 3), np.uint8) for i in range(6)}
    settings = {"k0": {"prompt": "red cat", "t0": 0.03}, "k1": {"prompt": "blue dog"},
                "k2": {"negative_prompt": "sky", "t0": 0.05}, "k3": {}, "k4": {"prompt": 3},
                "k5": {"t0": 0.03}}
    urls = write_row_shards(tmp_path, guides, settings, txt_key="k5")
    out = tmp_path / "out"
    spec = make_spec(tiny_sd_dir, urls, out, sdedit={"prompt": "lamp", "guidance_scale": 3.0},
                     compute={"batch_size": 4, "cpus_per_actor": 1})
    summary = run_job(spec, progress=False)
    assert (summary.outputs_ok, summary.outputs_error, summary.shards_done) == (5, 1, 2)
    rows = _rows(out)
    expected = {"k0": ("red cat", "", 0.03), "k1": ("blue dog", "", 0.04),
                "k2": ("lamp", "sky", 0.05), "k3": ("lamp", "", 0.04),
                "k5": ("red room", "", 0.03)}
    for key, (prompt, negative, t0) in expected.items():
        row = rows[key]
        assert (row["prompt"], row["negative_prompt"], row["t0"]) == (prompt, negative, t0)
        assert row["guidance_scale"] == 3.0 and row["status"] == "ok"
    assert rows["k4"]["error_kind"] == "setting" and "prompt in k4.json is 3" in \
        rows["k4"]["error"]
    # every output made again from its manifest row alone (seed, prompt, t0): the same image,
    # to the rounding of a different batch (at most one level)
    members = {**_members(out / "shards" / "in-0.tar"), **_members(out / "shards" / "in-1.tar")}
    for key in expected:
        row = rows[key]
        remade = _remake(tiny_sd, row, guides[key], prompts=[row["prompt"]],
                         negative_prompts=[row["negative_prompt"]],
                         guidance_scale=row["guidance_scale"])
        stored = _decoded(members[f"{key}.png"]).astype(int)
        assert np.abs(remade.astype(int) - stored).max() <= 1, key
    assert members["k5.txt"] == b"red room" and "k5.input.json" in members


def test_a_job_level_prompt_on_a_pixel_model_is_refused_before_ray(tiny_vp_dir, tmp_path):
    spec = make_spec(tiny_vp_dir, [str(tmp_path / "x.tar")], tmp_path / "out",
                     sdedit={"prompt": "a room"})
    with pytest.raises(PipelineError,
                       match=r"sdedit\.prompt: prompt='a room' is for text-conditioned"):
        run_job(spec, progress=False)
    assert not (tmp_path / "out").exists()
