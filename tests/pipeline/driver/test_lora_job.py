"""model.lora in jobs: the spec field and its fingerprint, the refusal of a LoRA that does not
fit before any work (validate and run), and an SDXL job with a LoRA on Ray."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pyarrow.dataset as pads
import pytest
import torch
import webdataset as wds
from click.testing import CliRunner
from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionXLImg2ImgPipeline
from PIL import Image

from pipeline.cli import main
from pipeline.driver.runner import run_job
from pipeline.errors import PipelineError, SpecError
from pipeline.job.load import parse_spec
from sdedit import edit, load_model
from sdedit.lora import Lora, apply_loras
from tests.support.shards import make_spec, png, write_job
from tests.support.tiny_latent import tiny_sd_pipeline
from tests.support.tiny_lora import TEXT_TARGETS, add_lora, save_lora
from tests.support.tiny_sdxl import tiny_sdxl_pipeline

BASE = {"name": "x", "model": {"source": "m"}, "input": {"shards": "a.tar"},
        "output": {"path": "o"}}
BASE_FINGERPRINT = "5f3902098009a237b2218cac2807fc8432485989ed6ff294bcec9c46193d5308"
"""BASE's fingerprint as the first released version computed it (job/test_spec.py)."""


def _spec(**model):
    return parse_spec({**BASE, "model": {"source": "m", **model}})


def test_lora_spec_and_fingerprint():
    """No LoRA (absent, null or []) keeps the fingerprint of jobs started before model.lora
    existed; a LoRA, its scale and its order change it."""
    for model in ({}, {"lora": None}, {"lora": []}):
        spec = _spec(**model)
        assert spec.model.lora == () and spec.fingerprint() == BASE_FINGERPRINT
        assert "lora" not in spec.output_affecting()["model"]
    one = _spec(lora=[{"source": "a.safetensors"}])
    assert one.model.lora == (Lora("a.safetensors", 1.0),)
    assert one.output_affecting()["model"]["lora"] == [{"source": "a.safetensors",
                                                        "scale": 1.0}]
    prints = {one.fingerprint(),
              _spec(lora=[{"source": "a.safetensors", "scale": 0.5}]).fingerprint(),
              _spec(lora=[{"source": "a", "scale": 1}, {"source": "b"}]).fingerprint(),
              _spec(lora=[{"source": "b"}, {"source": "a"}]).fingerprint(), BASE_FINGERPRINT}
    assert len(prints) == 5
    assert one.to_dict()["model"]["lora"] == [{"source": "a.safetensors", "scale": 1.0}]
    assert parse_spec(BASE, overrides=["model.lora=[{source: a.safetensors}]"]).fingerprint() \
        == one.fingerprint()


def test_lora_spec_errors_are_listed():
    with pytest.raises(SpecError) as info:
        _spec(lora=[{"source": "a", "scale": "big"}, {"scael": 1}, "b"])
    assert info.value.errors == [
        "model.lora[0].scale: 'big' is not a number; allowed: a number in [-10, 10]",
        "model.lora[1].scael: unknown key; allowed keys: scale, source; did you mean scale?",
        "model.lora[1].source: missing; allowed: a LoRA file or folder (local, hub id or fsspec "
        "URL)",
        "model.lora[2]: 'b' is not a mapping; allowed: a mapping with keys scale, source"]
    with pytest.raises(SpecError, match=r"model.lora: 'a' is not a list"):
        _spec(lora="a")


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    """(an SDXL LoRA on text_encoder_2 and the UNet, an SD 1.x LoRA), made with peft."""
    root = tmp_path_factory.mktemp("loras")
    maker = tiny_sdxl_pipeline(root / "v1")
    sdxl = save_lora(root / "sdxl", StableDiffusionXLImg2ImgPipeline,
                     unet=(maker.unet, add_lora(maker.unet, ["to_q", "to_v"], 4, 4, seed=1)),
                     text_encoder_2=(maker.text_encoder_2,
                                     add_lora(maker.text_encoder_2, TEXT_TARGETS, 2, 2, seed=2)))
    maker = tiny_sd_pipeline(root / "v2")
    sd = save_lora(root / "sd", StableDiffusionImg2ImgPipeline,
                   unet=(maker.unet, add_lora(maker.unet, ["to_q"], 2, 2, seed=3)))
    return sdxl, sd


def test_validate_and_run_refuse_a_lora_that_does_not_fit(tiny_sdxl_dir, loras, tmp_path):
    sdxl_lora, sd_lora = loras
    job = write_job(tmp_path / "job.yaml", tiny_sdxl_dir, [str(tmp_path / "in.tar")],
                    tmp_path / "out", model={"lora": [{"source": str(sdxl_lora)},
                                                      {"source": str(sd_lora), "scale": 0.5}]})
    (tmp_path / "in.tar").write_bytes(b"")
    result = CliRunner().invoke(main, ["validate", str(job), "--offline"])
    assert result.exit_code == 2
    assert "model.lora[0]" not in result.stderr                  # the SDXL LoRA fits
    assert f"model.lora[1]: LoRA {str(sd_lora)!r} does not fit this sdxl model: 16 key(s) " \
           "do not match: unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q." \
           "lora_A.weight: this sdxl model's unet has no layer" in result.stderr
    spec = make_spec(tiny_sdxl_dir, [str(tmp_path / "in.tar")], tmp_path / "out",
                     model={"lora": [{"source": str(sd_lora)}]})
    with pytest.raises(PipelineError, match=r"model.lora\[0\]: LoRA .* does not fit"):
        run_job(spec, progress=False)
    assert not (tmp_path / "out").exists()                        # refused before any work
    fits = CliRunner().invoke(main, ["validate", str(job), "--offline", "--set",
                                     f"model.lora=[{{source: {sdxl_lora}, scale: 0.6}}]"])
    assert fits.exit_code == 0, fits.stderr


def _decoded(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def test_sdxl_job_with_a_lora_on_ray(ray_connected, tiny_sdxl_dir, loras, tmp_path):
    """An SDXL job with a LoRA through `run_job` on the session's Ray head: each output is
    what load_model + apply_loras + edit make of its row, and the manifest's model_identity
    names the LoRA."""
    sdxl_lora, _ = loras
    rng = np.random.default_rng(5)
    guides = {f"k{i}": rng.integers(0, 256, (16, 16, 3), np.uint8) for i in range(2)}
    url = str(tmp_path / "in.tar")
    with wds.TarWriter(url) as tar:
        for key, guide in guides.items():
            tar.write({"__key__": key, "png": png(guide),
                       "json": json.dumps({"prompt": f"red {key}"}).encode()})
    out = tmp_path / "out"
    spec = make_spec(tiny_sdxl_dir, [url], out, model={"lora": [{"source": str(sdxl_lora),
                                                                 "scale": 0.8}],
                                                        "weights_dtype": "fp32"},
                     sdedit={"t0": 0.01, "negative_prompt": "sky"},
                     compute={"batch_size": 2, "cpus_per_actor": 1})
    summary = run_job(spec, progress=False)
    assert (summary.outputs_ok, summary.outputs_error) == (2, 0)
    rows = {r["key"]: r for r in pads.dataset(str(out / "manifests"), format="parquet")
            .to_table().to_pylist()}
    model = apply_loras(load_model(tiny_sdxl_dir), [Lora(str(sdxl_lora), 0.8)])
    with tarfile.open(out / "shards" / "in.tar") as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    for key, guide in guides.items():
        row = rows[key]
        assert row["model_identity"] == model.identity and " + lora sha256:" in model.identity
        assert row["guidance_scale"] == 5.0                         # SDXL's default
        image = torch.from_numpy(guide).permute(2, 0, 1)[None].float() / 127.5 - 1.0
        remade = edit(model, image, t0=row["t0"], seeds=[row["seed"]], prompts=[row["prompt"]],
                      negative_prompts=[row["negative_prompt"]], guidance_scale=5.0)
        remade = ((remade[0] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
        stored = _decoded(members[f"{key}.png"]).astype(int)
        assert np.abs(remade.permute(1, 2, 0).numpy().astype(int) - stored).max() <= 1, key
