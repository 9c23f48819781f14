"""LoRA on the flow families: a kohya Flux LoRA and a Qwen-Image trainer LoRA at scale 0.7
equal diffusers' load_lora_weights + set_adapters on the same tiny model; SD3, Z-Image and
Chroma LoRAs in diffusers' format too; every key of a file is checked by our own check, so a
file diffusers would load in part (mixed formats, keys its conversion drops) is refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import (
    ChromaImg2ImgPipeline,
    FluxImg2ImgPipeline,
    QwenImageImg2ImgPipeline,
    StableDiffusion3Img2ImgPipeline,
    ZImageImg2ImgPipeline,
)
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import save_file

from sdedit import edit, load_model
from sdedit.families import inspect_model_dir
from sdedit.lora import Lora, apply_loras, lora_fit
from sdedit.sources import ModelSourceError
from tests.support.tiny_lora import TEXT_TARGETS, add_lora, save_lora

PROMPTS = ["a red cat", "blue dog"]
NEGATIVES = ["", "lamp"]
SEEDS = [5, 6]


@pytest.fixture(autouse=True)
def posterior_mean(monkeypatch):
    monkeypatch.setattr(DiagonalGaussianDistribution, "sample",
                        lambda self, generator=None: self.mean)


def _pair(name: str, size_in: int, size_out: int, seed: int, alpha: float | None = None,
          down: str = "lora_down", up: str = "lora_up", rank: int = 4) -> dict:
    """One layer's LoRA tensors in a trainer's format (random, non-zero)."""
    g = torch.Generator().manual_seed(seed)
    tensors = {f"{name}.{down}.weight": torch.randn(rank, size_in, generator=g) * 0.3,
               f"{name}.{up}.weight": torch.randn(size_out, rank, generator=g) * 0.3}
    if alpha is not None:
        tensors[f"{name}.alpha"] = torch.tensor(alpha)
    return tensors


def _kohya_flux() -> dict:
    """A kohya / sd-scripts Flux LoRA for the tiny Flux (inner width 32): fused qkv layers
    (split by diffusers' conversion), a single block, CLIP layers, alphas."""
    tensors = {}
    for i, (name, size_in, size_out, alpha) in enumerate([
            ("lora_unet_double_blocks_0_img_attn_qkv", 32, 96, 2.0),
            ("lora_unet_double_blocks_0_img_attn_proj", 32, 32, 8.0),
            ("lora_unet_double_blocks_0_img_mlp_0", 32, 128, None),
            ("lora_unet_double_blocks_0_txt_attn_qkv", 32, 96, 4.0),
            ("lora_unet_single_blocks_0_linear2", 160, 32, 1.0),
            ("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", 32, 32, 2.0),
            ("lora_te1_text_model_encoder_layers_0_self_attn_out_proj", 32, 32, None)]):
        tensors |= _pair(name, size_in, size_out, seed=i, alpha=alpha)
    return tensors


def _ours_and_reference(pipeline_cls, directory: Path, path: Path, side: int, guidance: dict,
                        ours_guidance: float, negatives: bool = True):
    """(ours, diffusers') at scale 0.7, and our output without the LoRA, on [0, 1]."""
    pipe = pipeline_cls.from_pretrained(directory)
    pipe.load_lora_weights(str(path), adapter_name="a")
    pipe.set_adapters(["a"], [0.7])
    u = torch.rand(2, 3, side, side, generator=torch.Generator().manual_seed(1))
    extra = {"negative_prompt": list(NEGATIVES)} if negatives else {}
    if pipeline_cls is StableDiffusion3Img2ImgPipeline:
        extra["sigmas"] = np.linspace(1.0, 0.1, 10)
    ref = pipe(prompt=list(PROMPTS), image=u, strength=0.6, num_inference_steps=10,
               height=side, width=side, output_type="pt",
               generator=[torch.Generator().manual_seed(s) for s in SEEDS], **extra,
               **guidance).images
    model = load_model(directory)
    texts = {"prompts": PROMPTS, "guidance_scale": ours_guidance}
    if negatives:
        texts["negative_prompts"] = NEGATIVES
    base = edit(model, 2 * u - 1, t0=0.6, steps=6, seeds=SEEDS, sampler="euler", **texts)
    apply_loras(model, [Lora(str(path), 0.7)])
    ours = edit(model, 2 * u - 1, t0=0.6, steps=6, seeds=SEEDS, sampler="euler", **texts)
    assert not any(isinstance(m, BaseTunerLayer) for m in model.net.modules())    # fused
    assert model.identity.endswith("*0.7") and " + lora sha256:" in model.identity
    return ours * 0.5 + 0.5, ref, base * 0.5 + 0.5


def test_a_kohya_flux_lora_equals_diffusers(tiny_flux_dev_dir, tmp_path):
    """Converted by diffusers' Flux loader (qkv split, alphas folded in, CLIP part): our
    fused transformer and CLIP encoder at 0.7 equal the pipeline's adapters at 0.7."""
    path = tmp_path / "kohya.safetensors"
    save_file(_kohya_flux(), path)
    assert lora_fit(inspect_model_dir(tiny_flux_dev_dir, "m"), Lora(str(path))) == []
    ours, ref, base = _ours_and_reference(FluxImg2ImgPipeline, tiny_flux_dev_dir, path, 16,
                                          {"guidance_scale": 2.5}, 2.5, negatives=False)
    assert (ours - ref).abs().max() <= 1e-4, float((ours - ref).abs().max())
    assert (ours - base).abs().max() > 1e-2                          # the LoRA took effect


def _qwen_trainer_lora() -> dict:
    """A Qwen-Image LoRA as trainers save it: "diffusion_model." keys, lora_down / lora_up,
    alphas (diffusers' Qwen loader converts it)."""
    tensors = {}
    for block in (0, 1):
        for i, (name, size_in, size_out, alpha) in enumerate([
                ("attn.to_q", 48, 48, 2.0), ("attn.add_k_proj", 48, 48, 8.0),
                ("img_mlp.net.0.proj", 48, 192, 4.0), ("txt_mod.1", 48, 288, 4.0)]):
            tensors |= _pair(f"diffusion_model.transformer_blocks.{block}.{name}", size_in,
                             size_out, seed=10 * block + i, alpha=alpha)
    return tensors


def test_a_qwen_image_lora_equals_diffusers(open_family_dirs, tmp_path):
    path = tmp_path / "qwen.safetensors"
    save_file(_qwen_trainer_lora(), path)
    directory = open_family_dirs["qwen-image"]
    ours, ref, base = _ours_and_reference(QwenImageImg2ImgPipeline, directory, path, 32,
                                          {"true_cfg_scale": 3.0}, 3.0)
    assert (ours - ref).abs().max() <= 1e-4, float((ours - ref).abs().max())
    assert (ours - base).abs().max() > 1e-2


@pytest.mark.parametrize("family", ["sd3", "z-image", "chroma"])
def test_diffusers_format_loras_of_the_other_flow_families_equal_diffusers(
        request, open_family_dirs, tmp_path, family):
    """A LoRA made with peft on the transformer (and SD3's first CLIP encoder) and saved with
    the pipeline's save_lora_weights."""
    cls = {"sd3": StableDiffusion3Img2ImgPipeline, "z-image": ZImageImg2ImgPipeline,
           "chroma": ChromaImg2ImgPipeline}[family]
    directory = request.getfixturevalue("tiny_sd3_dir") if family == "sd3" else \
        open_family_dirs[family]
    pipe = cls.from_pretrained(directory)
    parts = {"transformer": (pipe.transformer, add_lora(pipe.transformer,
                                                        ["to_q", "to_k", "to_v"], 4, 8, 1))}
    if family == "sd3":
        parts["text_encoder"] = (pipe.text_encoder, add_lora(pipe.text_encoder, TEXT_TARGETS,
                                                             2, 4, 2))
    path = save_lora(tmp_path / "lora", cls, **parts)
    guidance = 2.0 if family == "z-image" else 3.0                  # Z-Image: ours minus 1
    ours, ref, base = _ours_and_reference(cls, directory, path, 16,
                                          {"guidance_scale": guidance}, 3.0)
    assert (ours - ref).abs().max() <= 1e-4, float((ours - ref).abs().max())
    assert (ours - base).abs().max() > 1e-2


def test_a_qwen_file_mixing_formats_is_refused_where_diffusers_loads_half(open_family_dirs,
                                                                          tmp_path):
    """Block 0 in lora_A / lora_B, block 1 in lora.down / lora.up: diffusers' Qwen loader
    adapts block 0 and logs the rest away; our own check names block 1's keys."""
    directory = open_family_dirs["qwen-image"]
    path = tmp_path / "mixed.safetensors"
    save_file(_pair("transformer.transformer_blocks.0.attn.to_q", 48, 48, 1, down="lora_A",
                    up="lora_B") |
              _pair("transformer.transformer_blocks.1.attn.to_q", 48, 48, 2, down="lora.down",
                    up="lora.up"), path)
    pipe = QwenImageImg2ImgPipeline.from_pretrained(directory)
    pipe.load_lora_weights(str(path), adapter_name="a")
    adapted = [n for n, m in pipe.transformer.named_modules() if isinstance(m, BaseTunerLayer)]
    assert adapted == ["transformer_blocks.0.attn.to_q"]                  # half, silently
    problems = lora_fit(inspect_model_dir(directory, "m"), Lora(str(path)))
    assert len(problems) == 1 and "2 key(s) do not match" in problems[0]
    assert "transformer.transformer_blocks.1.attn.to_q.lora.down.weight: not a LoRA weight" \
        in problems[0]
    model = load_model(directory)
    with pytest.raises(ModelSourceError, match=r"lora\.up\.weight: not a LoRA weight"):
        apply_loras(model, [Lora(str(path))])


def test_keys_the_conversion_drops_are_refused_unless_they_are_zero(tiny_flux_dev_dir,
                                                                   tmp_path):
    """diffusers' Flux loader drops DoRA scales and bias deltas (diff_b) with a log line; our
    check traces every tensor through the conversion and names the dropped ones, unless they
    are all zeros (dropping them changes nothing)."""
    layout = inspect_model_dir(tiny_flux_dev_dir, "m")
    proj = "lora_unet_double_blocks_0_img_attn_proj"
    extra = {f"{proj}.dora_scale": torch.ones(1, 32), f"{proj}.diff_b": torch.ones(32)}
    path = tmp_path / "dropped.safetensors"
    save_file(_kohya_flux() | extra, path)
    problems = lora_fit(layout, Lora(str(path)))
    assert len(problems) == 1 and "2 key(s) do not match" in problems[0]
    for key in extra:
        assert f"{key}: diffusers' FluxLoraLoaderMixin drops it in conversion" in problems[0]
    zero = tmp_path / "zero.safetensors"
    save_file(_kohya_flux() | {f"{proj}.diff_b": torch.zeros(32)}, zero)
    assert lora_fit(layout, Lora(str(zero))) == []
