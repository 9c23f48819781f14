"""Qwen-Image, Z-Image and Chroma on tiny random pipelines: agreement with diffusers' img2img
pipelines through `load_model` (each pipeline's own guidance mapping), Qwen-Image's stretched
per-row schedules, per-row t0, masks, sizes, and reading a layout without its weights."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from diffusers import (
    ChromaImg2ImgPipeline,
    FlowMatchEulerDiscreteScheduler,
    QwenImageImg2ImgPipeline,
    ZImageImg2ImgPipeline,
)
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

from sdedit import EditInputError, edit, load_model
from sdedit.accel import Acceleration, NetRunner
from sdedit.families import inspect_model_dir
from sdedit.families.qwen_image import qwen_call
from sdedit.families.z_image import z_image_call
from sdedit.models import ModelSourceError
from tests.support.tiny_families import qwen_scheduler

FAMILIES = ("qwen-image", "z-image", "chroma")
PIPELINES = {"qwen-image": QwenImageImg2ImgPipeline, "z-image": ZImageImg2ImgPipeline,
             "chroma": ChromaImg2ImgPipeline}
SIDE = {"qwen-image": 32, "z-image": 16, "chroma": 16}
MULTIPLE = {"qwen-image": 8, "z-image": 4, "chroma": 4}
PROMPTS = ["a red cat", "blue dog sky"]


@pytest.fixture
def posterior_mean(monkeypatch):
    """The VAE's posterior sample is its mean (what our codecs encode with)."""
    monkeypatch.setattr(DiagonalGaussianDistribution, "sample",
                        lambda self, generator=None: self.mean)


def _unit(n: int, side: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, side, side, generator=torch.Generator().manual_seed(seed))


def _max_difference(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours * 0.5 + 0.5 - ref).abs().max())


def _pipeline_guidance(family: str, g: float) -> dict[str, float]:
    """Our guidance_scale g in each pipeline's terms (module docstrings)."""
    if family == "qwen-image":
        return {"true_cfg_scale": g}
    return {"guidance_scale": g - 1 if family == "z-image" else g}


@pytest.mark.parametrize("family", FAMILIES)
def test_agrees_with_the_diffusers_img2img_pipeline(open_family_dirs, posterior_mean, family):
    """The pipeline with strength t0, N = steps / t0, the same prompts, negative prompts
    (an empty one included) and per-sample generators equals our euler with t0 and `steps`
    and the same g: Qwen-Image's true CFG (norm-rescaled, separate passes), Z-Image's scale
    minus 1 (one joined call of per-row lists), Chroma's float T5 mask (separate passes)."""
    directory, side = open_family_dirs[family], SIDE[family]
    model, pipe = load_model(directory), PIPELINES[family].from_pretrained(directory)
    u, seeds, negatives, t0, steps, g = _unit(2, side), [3, 4], ["", "lamp"], 0.6, 6, 3.0
    calls = []
    hook = pipe.transformer.register_forward_pre_hook(lambda *_: calls.append(1))
    ref = pipe(prompt=list(PROMPTS), negative_prompt=list(negatives), image=u, strength=t0,
               num_inference_steps=round(steps / t0), height=side, width=side,
               output_type="pt", generator=[torch.Generator().manual_seed(s) for s in seeds],
               **_pipeline_guidance(family, g)).images
    hook.remove()
    assert len(calls) == steps * (1 if family == "z-image" else 2)
    ours = edit(model, 2 * u - 1, t0=t0, steps=steps, seeds=seeds, sampler="euler",
                prompts=PROMPTS, negative_prompts=negatives, guidance_scale=g)
    assert _max_difference(ours, ref) <= 1e-4, _max_difference(ours, ref)
    assert (ours * 0.5 + 0.5 - u).abs().mean() > 0.05                      # it did edit


def test_qwen_rows_with_their_own_t0_follow_their_own_stretched_schedules(
        open_family_dirs, open_family_models, posterior_mean):
    """One batch of rows with t0 0.6 and 0.3 (3 steps each) equals the pipeline run per row
    with its own strength and N = 3 / t0: shift_terminal stretches each row's grid on its own.
    g = 1 is the pipeline without a negative prompt (its true_cfg_scale, 4.0 by default,
    then does nothing)."""
    model = open_family_models["qwen-image"]
    pipe = QwenImageImg2ImgPipeline.from_pretrained(open_family_dirs["qwen-image"])
    u, t0s, seeds = _unit(2, 32, seed=1), [0.6, 0.3], [5, 6]
    ours = edit(model, 2 * u - 1, t0=t0s, steps=3, seeds=seeds, sampler="euler",
                prompts=PROMPTS, guidance_scale=1.0)
    for i, t0 in enumerate(t0s):
        ref = pipe(prompt=[PROMPTS[i]], image=u[i:i + 1], strength=t0,
                   num_inference_steps=round(3 / t0), height=32, width=32, output_type="pt",
                   generator=[torch.Generator().manual_seed(seeds[i])]).images
        assert _max_difference(ours[i:i + 1], ref) <= 1e-4, (i, _max_difference(ours, ref))
    process = model.process_for(32, 32)
    assert process.plan(0.6, "euler", 3)[0] != pytest.approx(process.plan(0.6, "euler", 6)[0])


@pytest.mark.parametrize(("n", "strength"), [(10, 0.6), (10, 0.3), (8, 1.0), (50, 0.6)])
def test_the_shift_terminal_plan_is_diffusers_grid(open_family_models, n, strength):
    """Qwen/Qwen-Image's scheduler (dynamic shift, shift_terminal 0.02): the img2img grid of N
    steps at `strength` is our plan of t0 = M / N with M steps, for 1024 x 1024 images."""
    model = open_family_models["qwen-image"]
    tokens = 64 * 64                                              # (1024 / 16)^2
    process = model.process.resolved(tokens)
    scheduler = qwen_scheduler()
    mu = process.mu
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / n, n), mu=mu)
    start = int(n - min(n * strength, n))
    expected = scheduler.sigmas[start:-1].double()
    m = len(expected)
    assert torch.allclose(torch.tensor(process.plan(m / n, "euler", m), dtype=torch.float64),
                          expected, atol=1e-6)
    plain = FlowMatchEulerDiscreteScheduler(**{**scheduler.config, "shift_terminal": None})
    plain.set_timesteps(sigmas=np.linspace(1.0, 1 / n, n), mu=mu)
    assert not torch.allclose(plain.sigmas[start:-1].double(), expected, atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_per_row_t0_masks_and_sizes(open_family_models, family):
    """A batch mixing t0 equals each row alone; a masked edit keeps every pixel outside the
    mask; a side that is not a multiple of the family's factor is refused as a size."""
    model, side = open_family_models[family], SIDE[family]
    x, t0, seeds = _unit(3, side, seed=2) * 2 - 1, [0.6, 0.3, 0.45], [7, 8, 9]
    texts = {"prompts": ["red cat", "", "blue sky"], "guidance_scale": 2.0}
    batch = edit(model, x, t0=t0, seeds=seeds, sampler="euler", steps=2, **texts)
    for i in range(3):
        alone = edit(model, x[i:i + 1], t0=t0[i], seeds=[seeds[i]], sampler="euler", steps=2,
                     prompts=texts["prompts"][i:i + 1], guidance_scale=2.0)
        assert torch.allclose(batch[i:i + 1], alone, atol=1e-5), i
    mask = torch.zeros(3, 1, side, side)
    mask[:, :, 3:side - 5, 5:side - 4] = 1           # odd edges: cells straddle the boundary
    out = edit(model, x, t0=0.7, seeds=seeds, sampler="flow_ddpm", steps=2, masks=mask,
               repeats=2, **texts)
    keep = (mask == 0).expand_as(x)
    assert torch.equal(out[keep], x[keep])
    assert (out[~keep] - x[~keep]).abs().mean() > 0.05
    bad = side + MULTIPLE[family] // 2
    with pytest.raises(EditInputError, match=rf"image size {bad}x{side} .*multiples of "
                                             rf"{MULTIPLE[family]}"):
        edit(model, torch.zeros(1, 3, bad, side), t0=0.5, seeds=[1], sampler="euler",
             prompts=["cat"])


@pytest.mark.parametrize(("family", "guidance", "full_steps"), [
    ("qwen-image", 4.0, 50), ("z-image", 1.0, 8), ("chroma", 5.0, 35)])
def test_inspect_names_the_family_without_reading_weights(open_family_dirs, tmp_path, family,
                                                          guidance, full_steps):
    copy = shutil.copytree(open_family_dirs[family], tmp_path / "m")
    for weights in copy.rglob("*.safetensors"):   # only the header is read (sdedit.weights)
        data = weights.read_bytes()
        header = 8 + int.from_bytes(data[:8], "little")
        weights.write_bytes(data[:header] + bytes(len(data) - header))
    layout = inspect_model_dir(copy, "m")
    assert (layout.family, layout.text.guidance, layout.text.default_guidance) == \
        (family, "cfg", guidance)
    assert (layout.process.full_steps, layout.downsample_factor, layout.patch) == \
        (full_steps, MULTIPLE[family], 2)
    assert layout.process.shift_terminal == (0.02 if family == "qwen-image" else None)


def _edited(source, tmp_path, part, **changes):
    copy = shutil.copytree(source, tmp_path / f"m{len(list(tmp_path.iterdir()))}")
    path = copy / part / ("model_index.json" if part == "." else "config.json")
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    return copy


def test_layouts_the_new_families_refuse(open_family_dirs, tmp_path):
    qwen, z_image, chroma = (open_family_dirs[f] for f in FAMILIES)
    cases = [
        (_edited(qwen, tmp_path, ".", _class_name="QwenImageEditPipeline"),
         "names 'QwenImageEditPipeline'"),
        (_edited(qwen, tmp_path, "transformer", zero_cond_t=True), "zero_cond_t=True"),
        (_edited(qwen, tmp_path, "vae", latents_std=[1.0]), "latents_mean / latents_std"),
        (_edited(qwen, tmp_path, "transformer", joint_attention_dim=32), "joint_attention_dim"),
        (_edited(z_image, tmp_path, "transformer", siglip_feat_dim=16), "Z-Image-Omni"),
        (_edited(z_image, tmp_path, "transformer", cap_feat_dim=32), "cap_feat_dim 32"),
        (_edited(chroma, tmp_path, "text_encoder", d_model=48), "d_model 48"),
        (_edited(chroma, tmp_path, "transformer", in_channels=64), "VAE's 4 latent channels"),
    ]
    for directory, fragment in cases:
        with pytest.raises(ModelSourceError, match=fragment):
            inspect_model_dir(directory, "m")
    no_template = shutil.copytree(z_image, tmp_path / "no-template")
    for name in ("chat_template.jinja", "chat_template.json"):
        (no_template / "tokenizer" / name).unlink(missing_ok=True)
    config = no_template / "tokenizer" / "tokenizer_config.json"
    config.write_text(json.dumps({k: v for k, v in json.loads(config.read_text()).items()
                                  if k != "chat_template"}))
    with pytest.raises(ModelSourceError, match="tokenizer/ has no chat template"):
        load_model(no_template)


def test_cuda_graphs_are_not_captured_for_z_image_calls():
    """Z-Image's call reads each row's caption length on the host: a captured graph would
    freeze them, so the runner does not capture it (Qwen-Image's call is captured)."""
    accel = Acceleration(cuda_graphs=True)
    net = torch.nn.Linear(1, 1)
    assert not NetRunner(net, accel, torch.device("cuda"), z_image_call).graphs
    assert NetRunner(net, accel, torch.device("cuda"), qwen_call).graphs


@pytest.mark.parametrize("family", FAMILIES)
def test_fast_path_options_run_the_new_network_calls(open_family_dirs, family):
    """channels_last and noise threads keep the outputs; bf16 autocast runs."""
    model, side = load_model(open_family_dirs[family]), SIDE[family]
    x = _unit(2, side, seed=6) * 2 - 1
    texts = {"prompts": PROMPTS, "guidance_scale": 2.0}
    plain = edit(model, x, t0=0.5, seeds=[1, 2], sampler="euler", steps=2, **texts)
    model.accelerate(channels_last=True, noise_threads=1)
    fast = edit(model, x, t0=0.5, seeds=[1, 2], sampler="euler", steps=2, **texts)
    assert torch.allclose(fast, plain, atol=1e-5)
    model.accelerate(autocast=torch.bfloat16)
    half = edit(model, x, t0=0.5, seeds=[1, 2], sampler="euler", steps=2, **texts)
    assert torch.isfinite(half).all() and (half - plain).abs().max() < 0.5


def test_the_qwen_vae_is_not_tiled_up_to_1024_px(open_family_models):
    """The loaded codec (its memory bound on) encodes and decodes a 264 px image whole, as the
    pipeline does: the VAE class's own tiling starts at 256 px and would change both."""
    codec = open_family_models["qwen-image"].codec
    images = torch.rand(1, 3, 264, 264, generator=torch.Generator().manual_seed(0)) * 2 - 1
    vae = codec.vae
    with torch.no_grad():
        latents = codec.encode(images)
        pixels = codec.decode(latents)
        assert vae.use_tiling and vae.tile_sample_min_height == vae.tile_sample_min_width == 1024
        vae.disable_tiling()
        try:
            torch.testing.assert_close(codec.encode(images), latents, atol=1e-6, rtol=0)
            torch.testing.assert_close(codec.decode(latents), pixels, atol=1e-6, rtol=0)
        finally:
            codec.bound_memory()
