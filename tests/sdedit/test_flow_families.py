"""The flow-matching families (SD3 / SD3.5, Flux dev and schnell) on tiny random pipelines:
agreement with diffusers' img2img pipelines, per-row t0, masks, samplers, sizes, guidance and
reading a layout without its weights."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from diffusers import (
    FlowMatchEulerDiscreteScheduler,
    FluxImg2ImgPipeline,
    StableDiffusion3Img2ImgPipeline,
)
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

from sdedit import EditInputError, count_steps, edit, load_model
from sdedit.families import inspect_model_dir
from sdedit.families.flux import image_ids, pack, unpack
from sdedit.models import ModelSourceError
from tests.support.tiny_flow import save_sd3_model

PROMPTS = ["a red cat", "blue dog"]
FAMILIES = ("tiny_sd3", "tiny_flux_dev", "tiny_flux_schnell")


def _guides(n: int, seed: int = 0, h: int = 16, w: int = 16) -> torch.Tensor:
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _texts(model, n: int) -> dict:
    """Prompts for a text-conditioned model (and a guidance scale where it takes one)."""
    texts = {"prompts": (PROMPTS * n)[:n]}
    if model.text.spec.guidance != "none":
        texts["guidance_scale"] = 4.0
    return texts


class _Calls:
    """Records the keyword arguments of every forward call of a module."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.kwargs: list[dict] = []
        self.handle = module.register_forward_pre_hook(
            lambda _m, _args, kwargs: self.kwargs.append(kwargs), with_kwargs=True)

    def __enter__(self) -> _Calls:
        return self

    def __exit__(self, *exc: object) -> None:
        self.handle.remove()


@pytest.fixture
def posterior_mean(monkeypatch):
    """The VAE's posterior sample is its mean (what our codec encodes with)."""
    monkeypatch.setattr(DiagonalGaussianDistribution, "sample",
                        lambda self, generator=None: self.mean)


def _max_difference(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours * 0.5 + 0.5 - ref).abs().max())


@pytest.mark.parametrize("t5", [True, False])
def test_sd3_agrees_with_diffusers_img2img(tiny_sd3_dir, tmp_path, posterior_mean, t5):
    """StableDiffusion3Img2ImgPipeline with strength t0, N = steps / t0 and
    sigmas = linspace(1, 1/N, N): the same start, steps, prompts, CFG and noise as our euler
    with t0 and `steps`; without text_encoder_3 both use zeros for T5."""
    directory = tiny_sd3_dir if t5 else save_sd3_model(tmp_path / "m", t5=False)
    model = load_model(directory)
    absent = {} if t5 else {"text_encoder_3": None, "tokenizer_3": None}
    pipe = StableDiffusion3Img2ImgPipeline.from_pretrained(directory, **absent)
    assert (pipe.text_encoder_3 is not None) == t5
    u = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))  # [0, 1]
    seeds, negatives, t0, steps = [3, 4], ["", "lamp"], 0.6, 6
    n = round(steps / t0)
    with _Calls(pipe.transformer) as calls:
        ref = pipe(prompt=PROMPTS, negative_prompt=negatives, image=u, strength=t0,
                   num_inference_steps=n, sigmas=np.linspace(1.0, 1 / n, n),
                   guidance_scale=3.0, height=16, width=16, output_type="pt",
                   generator=[torch.Generator().manual_seed(s) for s in seeds]).images
    assert len(calls.kwargs) == steps
    ours = edit(model, 2 * u - 1, t0=t0, steps=steps, seeds=seeds, sampler="euler",
                prompts=PROMPTS, negative_prompts=negatives, guidance_scale=3.0)
    assert _max_difference(ours, ref) <= 1e-4, _max_difference(ours, ref)
    assert (ours * 0.5 + 0.5 - u).abs().mean() > 0.05       # it did edit


def test_sd3_default_grid_differs_and_linspace_sigmas_give_ours(tiny_sd3):
    """diffusers' default SD3 grid for N steps is shift(linspace(1, shift(1/1000), N)): it
    ends at shift(1/1000) in unshifted time, not 1/N. With sigmas = linspace(1, 1/N, N) and
    strength t0 (N t0 = M whole), the img2img steps are our plan of t0 with M steps."""
    process, shift = tiny_sd3.process, 3.0

    def shifted(u):
        return shift * u / (1 + (shift - 1) * u)

    n = 10
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(n)
    default = scheduler.sigmas[:-1].double()
    expected = shifted(torch.linspace(1.0, shifted(1 / 1000), n, dtype=torch.float64))
    assert torch.allclose(default, expected, atol=1e-6)
    ours = torch.tensor(process.plan(1.0, "euler", n), dtype=torch.float64)
    assert not torch.allclose(default, ours, atol=1e-3)
    # strength s, N steps: M = N - int(N - N s) evaluations from t0 = M / N (= s if N s whole)
    for n, strength, m in ((10, 0.6, 6), (10, 0.3, 3), (10, 1.0, 10), (28, 0.6, 17)):
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / n, n))
        start = int(n - min(n * strength, n))           # StableDiffusion3Img2ImgPipeline
        sigmas = scheduler.sigmas[start:-1].double()
        assert len(sigmas) == m
        assert torch.allclose(sigmas, torch.tensor(process.plan(m / n, "euler", m),
                                                   dtype=torch.float64), atol=1e-6)
    scheduler.set_timesteps(50)                         # the default grid, N = 50, s = 0.6
    assert float(scheduler.sigmas[int(50 - 50 * 0.6)]) == pytest.approx(0.8139, abs=1e-4)
    assert process.plan(0.6, "euler", 30)[0] == pytest.approx(0.8182, abs=1e-4)


@pytest.mark.parametrize("dev", [True, False])
def test_flux_agrees_with_diffusers_img2img(tiny_flux_dev_dir, tiny_flux_schnell_dir,
                                            posterior_mean, dev):
    """FluxImg2ImgPipeline (sigmas linspace(1, 1/N, N), dev: mu from the packed token count
    and the guidance input; schnell: neither) equals our euler with t0 = strength and
    `steps` = N t0: the 2 x 2 packing and position ids inside our network call."""
    directory = tiny_flux_dev_dir if dev else tiny_flux_schnell_dir
    model = load_model(directory)
    pipe = FluxImg2ImgPipeline.from_pretrained(directory)
    u = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    seeds, t0, steps = [5, 6], 0.6, 6
    with _Calls(pipe.transformer) as calls:
        ref = pipe(prompt=PROMPTS, image=u, strength=t0, num_inference_steps=round(steps / t0),
                   guidance_scale=2.5, height=16, width=16, output_type="pt",
                   generator=[torch.Generator().manual_seed(s) for s in seeds]).images
    assert len(calls.kwargs) == steps
    assert (calls.kwargs[0]["guidance"] is not None) == dev
    ours = edit(model, 2 * u - 1, t0=t0, steps=steps, seeds=seeds, sampler="euler",
                prompts=PROMPTS, guidance_scale=2.5 if dev else None)
    assert _max_difference(ours, ref) <= 1e-4, _max_difference(ours, ref)
    assert (ours * 0.5 + 0.5 - u).abs().mean() > 0.05


def test_flux_packing_is_diffusers_packing():
    x = torch.randn(2, 16, 6, 10)
    packed = FluxImg2ImgPipeline._pack_latents(x, 2, 16, 6, 10)
    assert torch.equal(pack(x), packed)
    assert torch.equal(unpack(packed, 6, 10), x)
    ids = FluxImg2ImgPipeline._prepare_latent_image_ids(2, 3, 5, "cpu", torch.float32)
    assert torch.equal(image_ids(6, 10), ids)


@pytest.mark.parametrize("name", FAMILIES)
def test_per_row_t0_in_one_batch_equals_each_row_alone(request, name):
    model = request.getfixturevalue(name)
    x, t0, seeds = _guides(3, seed=2), [0.6, 0.3, 0.45], [7, 8, 9]
    texts = _texts(model, 3)
    batch = edit(model, x, t0=t0, seeds=seeds, sampler="euler", **texts)
    for i in range(3):
        alone = edit(model, x[i:i + 1], t0=t0[i], seeds=[seeds[i]], sampler="euler",
                     **{k: v[i:i + 1] if isinstance(v, list) else v for k, v in texts.items()})
        assert torch.allclose(batch[i:i + 1], alone, atol=1e-5), i


@pytest.mark.parametrize("name", FAMILIES)
def test_masked_edit_keeps_every_pixel_outside_the_mask(request, name):
    model = request.getfixturevalue(name)
    x = _guides(2, seed=3)
    mask = torch.zeros(2, 1, 16, 16)
    mask[:, :, 3:11, 5:12] = 1           # odd edges: latent cells straddle the boundary
    out = edit(model, x, t0=0.7, seeds=[1, 2], sampler="flow_ddpm", masks=mask, repeats=2,
               **_texts(model, 2))
    keep = (mask == 0).expand_as(x)
    assert torch.equal(out[keep], x[keep])
    assert (out[~keep] - x[~keep]).abs().mean() > 0.05


@pytest.mark.parametrize("name", FAMILIES)
def test_both_flow_samplers_run(request, name):
    model = request.getfixturevalue(name)
    x, texts = _guides(2, seed=4), _texts(model, 2)
    euler = edit(model, x, t0=0.8, seeds=[1, 2], sampler="euler", steps=4, **texts)
    ancestral = edit(model, x, t0=0.8, seeds=[1, 2], sampler="flow_ddpm", steps=4, **texts)
    again = edit(model, x, t0=0.8, seeds=[1, 2], sampler="flow_ddpm", steps=4, **texts)
    other = edit(model, x, t0=0.8, seeds=[3, 4], sampler="flow_ddpm", steps=4, **texts)
    assert torch.isfinite(euler).all() and torch.isfinite(ancestral).all()
    assert torch.equal(ancestral, again)
    assert not torch.allclose(euler, ancestral, atol=1e-3)   # flow_ddpm draws step noise
    assert not torch.allclose(ancestral, other, atol=1e-3)
    with pytest.raises(EditInputError, match="allowed: euler, flow_ddpm"):
        edit(model, x, t0=0.8, seeds=[1, 2], sampler="ddim", **texts)


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize(("h", "w"), [(18, 16), (16, 10), (2, 16)])
def test_sizes_the_family_cannot_take_are_refused(request, name, h, w):
    model = request.getfixturevalue(name)
    with pytest.raises(EditInputError, match=rf"image size {h}x{w} .*multiples of 4"):
        edit(model, torch.zeros(1, 3, h, w), t0=0.5, seeds=[1], sampler="euler",
             **_texts(model, 1))


def test_flux_schnell_refuses_guidance_and_negative_prompts(tiny_flux_schnell):
    x = _guides(1)
    with pytest.raises(EditInputError, match=r"guidance_scale=3\.5 .* takes no guidance"):
        edit(tiny_flux_schnell, x, t0=0.5, seeds=[1], sampler="euler", prompts=["cat"],
             guidance_scale=3.5)
    with pytest.raises(EditInputError, match=r"negative prompt .sky. .*guidance: none"):
        edit(tiny_flux_schnell, x, t0=0.5, seeds=[1], sampler="euler", prompts=["cat"],
             negative_prompts=["sky"])
    assert tiny_flux_schnell.process.plan(0.5, "euler", None) == \
        tiny_flux_schnell.process.plan(0.5, "euler", 2)           # round(0.5 x 4) steps


def test_flux_dev_takes_guidance_as_an_input_in_one_pass(tiny_flux_dev):
    x = _guides(2, seed=5)
    with _Calls(tiny_flux_dev.net) as calls:
        low = edit(tiny_flux_dev, x, t0=0.5, seeds=[1, 2], sampler="euler", steps=3,
                   prompts=PROMPTS, guidance_scale=1.5)
    assert [c["hidden_states"].shape[0] for c in calls.kwargs] == [2, 2, 2]  # no CFG pass
    assert torch.equal(calls.kwargs[0]["guidance"], torch.tensor([1.5, 1.5]))
    high = edit(tiny_flux_dev, x, t0=0.5, seeds=[1, 2], sampler="euler", steps=3,
                prompts=PROMPTS, guidance_scale=6.0)
    assert not torch.allclose(low, high, atol=1e-4)
    default = edit(tiny_flux_dev, x, t0=0.5, seeds=[1, 2], sampler="euler", steps=3,
                   prompts=PROMPTS)
    assert torch.equal(default, edit(tiny_flux_dev, x, t0=0.5, seeds=[1, 2], sampler="euler",
                                     steps=3, prompts=PROMPTS, guidance_scale=3.5))
    with pytest.raises(EditInputError, match="negative prompt 'sky'"):
        edit(tiny_flux_dev, x, t0=0.5, seeds=[1, 2], sampler="euler", prompts=PROMPTS,
             negative_prompts=["sky", ""])


@pytest.mark.parametrize(("fixture", "family", "guidance", "full_steps"), [
    ("tiny_sd3_dir", "sd3", "cfg", 28), ("tiny_flux_dev_dir", "flux", "embedded", 28),
    ("tiny_flux_schnell_dir", "flux", "none", 4)])
def test_inspect_names_the_family_without_reading_weights(request, tmp_path, fixture, family,
                                                          guidance, full_steps):
    copy = shutil.copytree(request.getfixturevalue(fixture), tmp_path / "m")
    for weights in copy.rglob("*.safetensors"):   # the tensors' bytes are never read (only
        data = weights.read_bytes()                 # the header: sdedit.weights)
        header = 8 + int.from_bytes(data[:8], "little")
        weights.write_bytes(data[:header] + bytes(len(data) - header))
    layout = inspect_model_dir(copy, "m")
    assert (layout.family, layout.text.guidance, layout.process.full_steps) == \
        (family, guidance, full_steps)
    assert (layout.downsample_factor, layout.patch, layout.latent) == (4, 2, True)
    (copy / "transformer" / "diffusion_pytorch_model.safetensors").write_bytes(b"not weights")
    with pytest.raises(ModelSourceError, match="is not a safetensors file"):
        inspect_model_dir(copy, "m")                # a file cut short: from its header alone


def test_layouts_the_flow_families_refuse(tiny_flux_dev_dir, tiny_sd3_dir, tmp_path):
    import json

    def edited(source, part, **changes):
        copy = shutil.copytree(source, tmp_path / f"m{len(list(tmp_path.iterdir()))}")
        path = copy / part / "config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
        return copy

    cases = [
        (edited(tiny_flux_dev_dir, "transformer", in_channels=64), "Flux Fill"),
        (edited(tiny_flux_dev_dir, "text_encoder_2",
                quantization_config={"quant_method": "bitsandbytes"}),
         "text_encoder_2/ holds quantized weights"),
        (edited(tiny_sd3_dir, "transformer", pooled_projection_dim=48),
         "do not fit transformer pooled_projection_dim 48"),
        (edited(tiny_sd3_dir, "text_encoder_3", d_model=48), "text_encoder_3 d_model 48"),
    ]
    for directory, fragment in cases:
        with pytest.raises(ModelSourceError, match=fragment):
            inspect_model_dir(directory, "m")
    missing = shutil.copytree(tiny_sd3_dir, tmp_path / "no-tokenizer-2")
    shutil.rmtree(missing / "tokenizer_2")
    with pytest.raises(ModelSourceError, match="no tokenizer_2/ folder"):
        inspect_model_dir(missing, "m")


@pytest.mark.parametrize("fixture", ["tiny_sd3_dir", "tiny_flux_dev_dir"])
def test_fast_path_options_run_the_flow_network_calls(request, fixture):
    """channels_last (Flux's packing reshapes an NHWC state) and CUDA graphs (a no-op here)
    keep the outputs; bf16 autocast runs."""
    model = load_model(request.getfixturevalue(fixture))
    x, texts = _guides(2, seed=6), _texts(model, 2)
    plain = edit(model, x, t0=0.5, seeds=[1, 2], sampler="euler", steps=2, **texts)
    model.accelerate(channels_last=True, cuda_graphs=True, noise_threads=1)
    fast = edit(model, x, t0=0.5, seeds=[1, 2], sampler="euler", steps=2, **texts)
    assert torch.allclose(fast, plain, atol=1e-5)
    model.accelerate(autocast=torch.bfloat16)
    half = edit(model, x, t0=0.5, seeds=[1, 2], sampler="euler", steps=2, **texts)
    assert torch.isfinite(half).all() and (half - plain).abs().max() < 0.5


def test_a_rows_default_steps_are_those_of_its_own_t0(tiny_flux_dev, tiny_flux_schnell):
    """steps unset: max(1, round(t0 x 28)) of each row's t0 (Python's round), x 4 for
    schnell; what the manifest's steps column records per row."""
    assert [count_steps(tiny_flux_dev, "flow_ddpm", t0, None) for t0 in (0.3, 0.6, 0.01)] == \
        [8, 17, 1]
    assert [count_steps(tiny_flux_schnell, "euler", t0, None) for t0 in (0.3, 0.6)] == [1, 2]
