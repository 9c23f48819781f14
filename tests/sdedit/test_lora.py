"""LoRA on the SD and SDXL families: our fused LoRA equals diffusers' pipelines with the LoRA
at the same scale, a LoRA that does not fit is refused naming its keys (from configs alone),
and LoRA sources (file, folder, S3 URL) resolve as documented."""

from __future__ import annotations

import hashlib
import shutil

import pytest
import torch
from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionXLImg2ImgPipeline
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file, save_file

from sdedit import edit, load_model
from sdedit.families import inspect_model_dir
from sdedit.lora import Lora, apply_loras, lora_file, lora_fit
from sdedit.sources import ModelSourceError
from tests.support.tiny_latent import save_sd_model, tiny_sd_pipeline
from tests.support.tiny_lora import TEXT_TARGETS, UNET_TARGETS, add_lora, save_lora
from tests.support.tiny_sdxl import save_sdxl_model, tiny_sdxl_pipeline

PROMPTS = ["a red cat", "blue dog"]
NEGATIVES = ["lamp", "sky"]
SEEDS = [3, 4]
T0 = 0.01


@pytest.fixture(autouse=True)
def posterior_mean(monkeypatch):
    monkeypatch.setattr(DiagonalGaussianDistribution, "sample",
                        lambda self, generator=None: self.mean)


def _unit(n: int = 2) -> torch.Tensor:
    return torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(0))


def _reference(pipe, scale: float) -> torch.Tensor:
    """diffusers' img2img with its LoRA layers at `scale` (cross_attention_kwargs "scale":
    the UNet's and the text encoders' LoRA layers), DDPM over 1000 steps at strength T0."""
    return pipe(prompt=PROMPTS, negative_prompt=NEGATIVES, image=_unit(), strength=T0,
                num_inference_steps=1000, guidance_scale=5.0, output_type="pt",
                cross_attention_kwargs={"scale": scale},
                generator=[torch.Generator().manual_seed(s) for s in SEEDS]).images


def _ours(model) -> torch.Tensor:
    return edit(model, 2 * _unit() - 1, t0=T0, seeds=SEEDS, prompts=PROMPTS,
                negative_prompts=NEGATIVES, guidance_scale=5.0) * 0.5 + 0.5


def _no_peft_layers(*modules: torch.nn.Module) -> bool:
    return not any(isinstance(m, BaseTunerLayer) for mod in modules for m in mod.modules())


def test_sdxl_lora_on_unet_and_both_text_encoders_equals_diffusers(tmp_path):
    """A LoRA made with peft on the tiny SDXL's UNet and both text encoders and saved with
    save_lora_weights: our fused load equals the pipeline that holds those layers, at scale
    0.7 (measured max |diff| 4.7e-6), and changes the output."""
    pipe = tiny_sdxl_pipeline(tmp_path / "vocab")
    model_dir = save_sdxl_model(tmp_path / "m")
    parts = {"unet": (pipe.unet, add_lora(pipe.unet, UNET_TARGETS, 4, 8, seed=1)),
             "text_encoder": (pipe.text_encoder, add_lora(pipe.text_encoder, TEXT_TARGETS,
                                                          2, 4, seed=2)),
             "text_encoder_2": (pipe.text_encoder_2, add_lora(pipe.text_encoder_2,
                                                              TEXT_TARGETS, 2, 1, seed=3))}
    path = save_lora(tmp_path / "lora", StableDiffusionXLImg2ImgPipeline, **parts)
    model = load_model(model_dir)
    base_identity, base = model.identity, _ours(model)
    apply_loras(model, [Lora(str(path), 0.7)])
    ours, ref = _ours(model), _reference(pipe, 0.7)
    assert (ours - ref).abs().max() <= 1e-4, float((ours - ref).abs().max())
    assert (ours - base).abs().max() > 1e-2                          # the LoRA took effect
    assert _no_peft_layers(model.net, *model.text.encoders)           # fused: plain layers
    assert model.identity.startswith(f"{base_identity} + lora sha256:")
    assert model.identity.endswith("*0.7")


def test_two_unet_loras_equal_diffusers_load_lora_weights_and_set_adapters(tmp_path):
    """UNet-only LoRAs go through diffusers' own loader on both sides: pipe.load_lora_weights
    + set_adapters([a, b], [0.8, -0.5]) against our fused sum."""
    maker = tiny_sdxl_pipeline(tmp_path / "v1")
    first = save_lora(tmp_path / "a", StableDiffusionXLImg2ImgPipeline,
                      unet=(maker.unet, add_lora(maker.unet, ["to_q", "to_v"], 4, 4, seed=4)))
    maker = tiny_sdxl_pipeline(tmp_path / "v2")
    second = save_lora(tmp_path / "b", StableDiffusionXLImg2ImgPipeline,
                       unet=(maker.unet, add_lora(maker.unet, ["to_k", "conv1"], 2, 2, seed=5)))
    pipe = tiny_sdxl_pipeline(tmp_path / "v3")
    pipe.load_lora_weights(tmp_path / "a", adapter_name="a")
    pipe.load_lora_weights(tmp_path / "b", adapter_name="b")
    pipe.set_adapters(["a", "b"], [0.8, -0.5])
    model = apply_loras(load_model(save_sdxl_model(tmp_path / "m")),
                        [Lora(str(tmp_path / "a"), 0.8), Lora(str(second), -0.5)])
    ours, ref = _ours(model), _reference(pipe, 1.0)
    assert (ours - ref).abs().max() <= 1e-4, float((ours - ref).abs().max())
    assert first.exists() and model.identity.count(" + lora ") == 2


def test_sd15_lora_equals_diffusers(tmp_path):
    """The SD 1.x family: a LoRA on the UNet and the text encoder, our fused load against
    StableDiffusionImg2ImgPipeline holding the layers, at scale 1.3."""
    pipe = tiny_sd_pipeline(tmp_path / "vocab")
    pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, steps_offset=0)
    pipe.save_pretrained(tmp_path / "m")
    parts = {"unet": (pipe.unet, add_lora(pipe.unet, UNET_TARGETS, 4, 4, seed=6)),
             "text_encoder": (pipe.text_encoder, add_lora(pipe.text_encoder, TEXT_TARGETS, 2,
                                                          2, seed=7))}
    path = save_lora(tmp_path / "lora", StableDiffusionImg2ImgPipeline, **parts)
    model = apply_loras(load_model(tmp_path / "m"), [Lora(str(path), 1.3)])
    ours, ref = _ours(model), _reference(pipe, 1.3)
    assert (ours - ref).abs().max() <= 1e-4, float((ours - ref).abs().max())
    assert _no_peft_layers(model.net, model.text.encoder)


@pytest.fixture
def sd_lora(tmp_path):
    """A LoRA of the tiny SD 1.x pipeline (UNet and text encoder)."""
    pipe = tiny_sd_pipeline(tmp_path / "sd-vocab")
    return save_lora(tmp_path / "sd-lora", StableDiffusionImg2ImgPipeline,
                     unet=(pipe.unet, add_lora(pipe.unet, ["to_q"], 2, 2, seed=8)),
                     text_encoder=(pipe.text_encoder, add_lora(pipe.text_encoder, ["q_proj"],
                                                               2, 2, seed=9)))


def test_a_loras_identity_is_its_files_sha256_whatever_its_name(tiny_sd_dir, sd_lora,
                                                                tmp_path):
    """model_identity names each LoRA by what `sha256sum FILE` prints (before: the sha256 of
    that line, which held the file's name: a renamed copy changed it)."""
    digest = hashlib.sha256(sd_lora.read_bytes()).hexdigest()
    renamed = shutil.copy(sd_lora, tmp_path / "renamed.safetensors")
    base = load_model(tiny_sd_dir).identity
    for path in (sd_lora, renamed):
        model = apply_loras(load_model(tiny_sd_dir), [Lora(str(path), 0.5)])
        assert model.identity == f"{base} + lora sha256:{digest}*0.5"


def test_a_lora_of_another_model_is_refused_naming_its_keys(tiny_sdxl_dir, sd_lora, tmp_path):
    """An SD 1.x LoRA on SDXL: some UNet layers it names do not exist, others have other
    widths; its text-encoder keys fit (both tiny encoders are 32 wide) and are not named.
    Checked on the configs alone: the base weights are gone when lora_fit runs."""
    copy = shutil.copytree(tiny_sdxl_dir, tmp_path / "sdxl")
    layout = inspect_model_dir(copy, "sdxl")
    for part in ("unet", "text_encoder", "text_encoder_2", "vae"):
        for weights in (copy / part).glob("*.safetensors"):
            weights.unlink()                          # lora_fit reads configs only
    problems = lora_fit(layout, Lora(str(sd_lora)))
    assert len(problems) == 1
    assert problems[0].startswith(f"LoRA {str(sd_lora)!r} does not fit this sdxl model: 16 "
                                  "key(s) do not match: unet.down_blocks.0.attentions.0.")
    assert ("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight: "
            "this sdxl model's unet has no layer down_blocks.0.attentions.0.transformer_blocks"
            ".0.attn1.to_q") in problems[0]
    assert ("unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight: shape "
            "(2, 32) does not fit the layer's 64 inputs") in problems[0]
    assert "text_encoder" not in problems[0] and problems[0].endswith("; and 8 more")
    with pytest.raises(ModelSourceError, match="does not fit this sdxl model: 16 key"):
        apply_loras(load_model(tiny_sdxl_dir), [Lora(str(sd_lora))])


def test_shape_mismatches_and_unknown_parts_are_named(tiny_sdxl_dir, tmp_path):
    maker = tiny_sdxl_pipeline(tmp_path / "v")
    path = save_lora(tmp_path / "lora", StableDiffusionXLImg2ImgPipeline,
                     unet=(maker.unet, add_lora(maker.unet, ["to_k"], 4, 4, seed=1)))
    state = load_file(path)
    key = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight"
    assert state[key].shape == (4, 64)
    state[key] = torch.zeros(4, 48)
    state["transformer.blocks.0.lora_A.weight"] = torch.zeros(2, 8)
    state["unet.mid_block.attentions.0.proj_in.lokr_w1"] = torch.zeros(2, 2)  # not LoRA
    save_file(state, tmp_path / "bad.safetensors")
    problems = lora_fit(inspect_model_dir(tiny_sdxl_dir, "x"),
                        Lora(str(tmp_path / "bad.safetensors")))
    assert f"{key}: shape (4, 48) does not fit the layer's 64 inputs" in problems[0]
    assert ("transformer.blocks.0.lora_A.weight: names no part of this sdxl model (LoRA "
            "parts: unet, text_encoder, text_encoder_2)") in problems[0]
    assert "unet.mid_block.attentions.0.proj_in.lokr_w1: not a LoRA weight" in problems[0]
    # the refiner has no text_encoder: a LoRA for it does not fit there
    refiner = inspect_model_dir(save_sdxl_model(tmp_path / "refiner", refiner=True), "r")
    te = save_lora(tmp_path / "te", StableDiffusionXLImg2ImgPipeline,
                   text_encoder=(maker.text_encoder, add_lora(maker.text_encoder, ["q_proj"],
                                                              2, 2, seed=2)))
    problems = lora_fit(refiner, Lora(str(te)))
    assert "names no part of this sdxl model (LoRA parts: unet, text_encoder_2)" in problems[0]


def test_a_kohya_lora_is_read_as_its_diffusers_twin(tiny_sdxl_dir, tmp_path):
    """A UNet LoRA in kohya's format (lora_unet_..., lora_down / lora_up, alpha), written with
    diffusers' own convert_state_dict_to_kohya, fuses to the same weights as the diffusers file
    of the same layers."""
    from diffusers.utils import convert_state_dict_to_kohya
    from peft.utils import get_peft_model_state_dict

    maker = tiny_sdxl_pipeline(tmp_path / "v")
    config = add_lora(maker.unet, ["to_q", "to_k"], 4, 4, seed=11)      # alpha = rank, as kohya's
    twin = save_lora(tmp_path / "d", StableDiffusionXLImg2ImgPipeline, unet=(maker.unet, config))
    kohya = convert_state_dict_to_kohya({f"unet.{k}": v for k, v in
                                         get_peft_model_state_dict(maker.unet).items()})
    assert all(k.startswith("lora_unet_") for k in kohya) and any(".alpha" in k for k in kohya)
    save_file(kohya, tmp_path / "kohya.safetensors")
    ours = apply_loras(load_model(tiny_sdxl_dir), [Lora(str(tmp_path / "kohya.safetensors"), 0.9)])
    same = apply_loras(load_model(tiny_sdxl_dir), [Lora(str(twin), 0.9)])
    base = load_model(tiny_sdxl_dir).net.state_dict()
    weights, expected = ours.net.state_dict(), same.net.state_dict()
    changed = [k for k in base if not torch.equal(weights[k], base[k])]
    assert changed and all(k.endswith(("to_q.weight", "to_k.weight")) for k in changed)
    assert len(changed) == sum(k.endswith(("to_q.weight", "to_k.weight")) for k in base)
    assert all(torch.allclose(weights[k], expected[k], atol=1e-6) for k in base)


def test_a_pixel_model_takes_no_lora(tiny_vp_dir, sd_lora):
    problems = lora_fit(inspect_model_dir(tiny_vp_dir, "vp"), Lora(str(sd_lora)))
    assert problems == ["a pixel model takes no LoRA; allowed: a model of the sd3, flux, chroma, "
                        "qwen-image, z-image, sdxl, sd families"]


def test_lora_sources_file_folder_and_refusals(tmp_path, sd_lora):
    assert lora_file(str(sd_lora)) == sd_lora
    assert lora_file(str(sd_lora.parent)) == sd_lora                 # the folder's one file
    (sd_lora.parent / "other.safetensors").write_bytes(sd_lora.read_bytes())
    assert lora_file(str(sd_lora.parent)) == sd_lora                 # diffusers' name first
    two = tmp_path / "two"
    two.mkdir()
    for name in ("a.safetensors", "b.safetensors"):
        (two / name).write_bytes(sd_lora.read_bytes())
    with pytest.raises(ModelSourceError, match=r"several weight files \(a.safetensors, "
                                               r"b.safetensors\); allowed: name one"):
        lora_file(str(two))
    with pytest.raises(ModelSourceError, match="not found; allowed: a local LoRA file"):
        lora_file(str(tmp_path / "missing.safetensors"))


def test_a_hub_lora_comes_from_the_hub_cache_when_offline(tmp_path, monkeypatch, sd_lora):
    """A hub id (org/name, or org/name/file) is looked up in the real hub cache layout when the
    hub cannot be reached (HF_HUB_OFFLINE); no network is used."""
    import huggingface_hub.constants as hub

    snapshot = tmp_path / "hub" / "models--someone--style-lora" / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "pytorch_lora_weights.safetensors").write_bytes(sd_lora.read_bytes())
    (tmp_path / "hub" / "models--someone--style-lora" / "refs").mkdir()
    (tmp_path / "hub" / "models--someone--style-lora" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    expected = snapshot / "pytorch_lora_weights.safetensors"
    assert lora_file("someone/style-lora") == expected
    assert lora_file("someone/style-lora/pytorch_lora_weights.safetensors") == expected
    with pytest.raises(ModelSourceError, match="'someone/other': could not get it from the "
                                               "Hugging Face hub or its cache"):
        lora_file("someone/other")


@pytest.mark.s3
def test_a_lora_file_at_an_s3_url_is_copied_once(s3_bucket, sd_lora, tmp_path):
    import fsspec

    url = f"{s3_bucket.url}/loras/style.safetensors"
    with fsspec.open(url, "wb", **s3_bucket.storage_options) as out:
        out.write(sd_lora.read_bytes())
    local = lora_file(url, tmp_path / "cache", s3_bucket.storage_options)
    assert local.name == "style.safetensors" and local.read_bytes() == sd_lora.read_bytes()
    assert lora_file(url, tmp_path / "cache", s3_bucket.storage_options) == local


def test_an_sd_lora_fits_the_sd_model(tmp_path, sd_lora):
    """The tiny SD model takes the SD LoRA (its UNet and text encoder fit)."""
    model_dir = save_sd_model(tmp_path / "sd")
    assert lora_fit(inspect_model_dir(model_dir, "sd"), Lora(str(sd_lora))) == []
