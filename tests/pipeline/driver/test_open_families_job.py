"""A Qwen-Image job with a LoRA through `sdedit-batch run` on Ray, and Z-Image and Chroma jobs
through the actor's worker: per-row prompts, negative prompts and t0 from {key}.json, a size the
family cannot take as that row's error, and each output made again from its manifest row with
load_model (+ apply_loras) + edit. (The Ray side is family-blind: one family on Ray shows it.)"""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pyarrow.dataset as pads
import torch
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import save_file

from pipeline.cli import main
from pipeline.job.load import load_spec
from pipeline.output.jobrecord import prepare_output
from pipeline.worker.shard import ShardWorker
from sdedit import Lora, apply_loras, edit, load_model
from tests.support.shards import write_job, write_row_shards


def _members(out) -> dict[str, bytes]:
    members = {}
    for path in sorted((out / "shards").glob("*.tar")):
        with tarfile.open(path) as tar:
            members |= {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    return members


def _qwen_lora(path):
    """A trainer-format Qwen-Image LoRA (diffusion_model. keys, lora_down / lora_up, alpha)."""
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for name, size in (("attn.to_q", 48), ("attn.add_v_proj", 48)):
        key = f"diffusion_model.transformer_blocks.0.{name}"
        tensors[f"{key}.lora_down.weight"] = torch.randn(4, size, generator=g) * 0.3
        tensors[f"{key}.lora_up.weight"] = torch.randn(size, 4, generator=g) * 0.3
        tensors[f"{key}.alpha"] = torch.tensor(8.0)
    save_file(tensors, path)
    return path


def _check_rows(out, guides, model, expected) -> None:
    """Each ok row is what `model` makes of its manifest row (within one level)."""
    rows = {r["key"]: r for r in pads.dataset(str(out / "manifests"), format="parquet")
            .to_table().to_pylist()}
    members = _members(out)
    for key, (prompt, negative, t0, guidance) in expected.items():
        row = rows[key]
        assert (row["status"], row["prompt"], row["negative_prompt"], row["t0"],
                row["guidance_scale"]) == ("ok", prompt, negative, t0, guidance), key
        assert row["model_identity"] == model.identity
        image = torch.from_numpy(guides[key]).permute(2, 0, 1)[None].float() / 127.5 - 1
        again = edit(model, image, t0=row["t0"], seeds=[row["seed"]], sampler=row["sampler"],
                     steps=row["steps"], prompts=[row["prompt"]],
                     negative_prompts=[row["negative_prompt"]],
                     guidance_scale=row["guidance_scale"])
        remade = ((again[0] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
        stored = np.asarray(Image.open(io.BytesIO(members[f"{key}.png"])).convert("RGB"))
        assert np.abs(remade.permute(1, 2, 0).numpy().astype(int) - stored.astype(int)).max() \
            <= 1, key
    return rows


def test_qwen_image_with_a_lora_z_image_and_chroma_jobs_on_ray(ray_connected, open_family_dirs,
                                                               tmp_path):
    rng = np.random.default_rng(7)
    guides = {f"k{i}": rng.integers(0, 256, (32, 32, 3), np.uint8) for i in range(5)}
    guides["k5"] = rng.integers(0, 256, (32, 36, 3), np.uint8)       # not a multiple of 8
    settings = {"k0": {"prompt": "red cat", "t0": 0.4}, "k1": {"negative_prompt": "lamp"},
                "k2": {"t0": 0.3, "prompt": ""}, "k3": {}, "k4": {"prompt": "sky"}, "k5": {}}
    (tmp_path / "in").mkdir()
    urls = write_row_shards(tmp_path / "in", guides, settings, txt_key="k3")
    lora = _qwen_lora(tmp_path / "qwen-lora.safetensors")
    out = tmp_path / "qwen"
    job = write_job(tmp_path / "qwen.yaml", open_family_dirs["qwen-image"], urls, out,
                    model={"lora": [{"source": str(lora), "scale": 0.7}],
                           "weights_dtype": "fp32"},  # compared with fp32 models below
                    sdedit={"t0": 0.5, "sampler": "euler", "steps": 3, "prompt": "bed",
                            "guidance_scale": 3.0},
                    compute={"batch_size": 4, "cpus_per_actor": 1})
    result = CliRunner().invoke(main, ["run", str(job), "--no-progress"])
    assert result.exit_code == 0, result.output      # an error row is a row, not a failure
    assert "outputs 5 ok / 1 error" in result.stdout
    model = apply_loras(load_model(open_family_dirs["qwen-image"]), [Lora(str(lora), 0.7)])
    rows = _check_rows(out, guides, model, {
        "k0": ("red cat", "", 0.4, 3.0), "k1": ("bed", "lamp", 0.5, 3.0),
        "k2": ("", "", 0.3, 3.0), "k3": ("red room", "", 0.5, 3.0), "k4": ("sky", "", 0.5, 3.0)})
    assert rows["k5"]["error_kind"] == "size" and "multiples of 8" in rows["k5"]["error"]
    assert " + lora sha256:" in model.identity

    small = {k: v[8:24, 8:24] for k, v in guides.items() if k != "k5"}
    small["k5"] = guides["k5"][:16, :18]                              # not a multiple of 4
    (tmp_path / "small").mkdir()
    small_urls = write_row_shards(tmp_path / "small", small, settings, txt_key="k3")
    for family, sdedit, expected in (
            ("z-image", {}, {"k0": ("red cat", "", 0.4, 1.0), "k1": ("bed", "lamp", 0.5, 1.0),
                             "k3": ("red room", "", 0.5, 1.0)}),      # Turbo's g = 1
            ("chroma", {"steps": 2}, {"k1": ("bed", "lamp", 0.5, 5.0),
                                      "k2": ("", "", 0.3, 5.0)})):    # the pipeline's 5.0
        out = tmp_path / family
        job = write_job(tmp_path / f"{family}.yaml", open_family_dirs[family], small_urls, out,
                        model={"weights_dtype": "fp32"},
                        sdedit={"t0": 0.5, "sampler": "euler", "prompt": "bed", **sdedit},
                        compute={"batch_size": 4, "cpus_per_actor": 1})
        spec = load_spec(str(job))
        prepare_output(spec, overwrite=False)
        with ShardWorker(spec) as worker:  # what an actor runs, without Ray
            stats = [worker.process(url) for url in small_urls]
        assert (sum(s.outputs_ok for s in stats), sum(s.outputs_error for s in stats)) == (5, 1)
        rows = _check_rows(out, small, load_model(open_family_dirs[family]), expected)
        assert rows["k5"]["error_kind"] == "size"
        if family == "z-image":
            assert rows["k1"]["steps"] == 4 and rows["k0"]["steps"] == 3  # round(t0 x 8)
