"""Latent, text-conditioned SDEdit: diffusers img2img agreement, the VAE codec, guidance, prompt
embeddings, masks, repeats, batch invariance and input checks, on a tiny Stable Diffusion."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

from sdedit import edit, load_model
from sdedit.conditioning import Conditioning
from sdedit.edit import warm_up
from sdedit.guidance import Guided
from sdedit.latent import latent_mask
from tests.support.tiny_latent import save_sd_model, tiny_scheduler, tiny_sd_pipeline

PROMPTS = ["a red cat", "blue dog"]


def _guides(n: int, seed: int = 0, h: int = 16, w: int = 16) -> torch.Tensor:
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


class _Calls:
    """Records the batch size of every forward call of a module."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.sizes: list[int] = []
        self.handle = module.register_forward_hook(
            lambda _m, args, _out: self.sizes.append(int(args[0].shape[0])))

    def __enter__(self) -> _Calls:
        return self

    def __exit__(self, *exc: object) -> None:
        self.handle.remove()


def test_ddpm_agrees_with_diffusers_img2img(tiny_sd, tmp_path, monkeypatch):
    """steps_offset 0, VAE posterior mean: our ddpm == StableDiffusionImg2ImgPipeline with
    DDPMScheduler, 1000 inference steps, strength = t0, the same prompts and guidance. Both
    consume the same noise: diffusers' per-sample generators draw the perturbation, then one
    draw per step with t > 0, exactly the contract's order and shape."""
    pipe = tiny_sd_pipeline(tmp_path / "vocab")       # the same seed-0 weights as tiny_sd
    pipe.scheduler = tiny_scheduler(steps_offset=0)   # the pipeline forces 1 at construction
    pipe.save_pretrained(tmp_path / "m")
    model = load_model(tmp_path / "m")
    monkeypatch.setattr(DiagonalGaussianDistribution, "sample",
                        lambda self, generator=None: self.mean)
    u = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))  # [0, 1]
    seeds, negatives, t0 = [3, 4], ["", "lamp"], 0.04                         # 40 steps
    ref = pipe(prompt=PROMPTS, negative_prompt=negatives, image=u, strength=t0,
               num_inference_steps=1000, guidance_scale=3.0, output_type="pt",
               generator=[torch.Generator().manual_seed(s) for s in seeds]).images
    ours = edit(model, 2 * u - 1, t0=t0, seeds=seeds, prompts=PROMPTS,
                negative_prompts=negatives, guidance_scale=3.0)
    assert torch.allclose(ours * 0.5 + 0.5, ref, atol=1e-4), float((ours * 0.5 + 0.5 - ref)
                                                                   .abs().max())
    assert (ours * 0.5 + 0.5 - u).abs().mean() > 0.05       # it did edit
    # t0 keeps its meaning whatever steps_offset: tiny_sd was saved with steps_offset 1
    again = edit(tiny_sd, 2 * u - 1, t0=t0, seeds=seeds, prompts=PROMPTS,
                 negative_prompts=negatives, guidance_scale=3.0)
    assert torch.equal(again, ours)


def test_codec_uses_the_posterior_mean_shift_and_scale(tmp_path):
    model = load_model(save_sd_model(tmp_path / "m", shift_factor=0.1))
    codec = model.codec
    assert (codec.scaling_factor, codec.shift_factor, codec.factor, codec.channels) == \
        (0.5, pytest.approx(0.1), 2, 4)
    x = _guides(2)
    with torch.no_grad():
        mean = codec.vae.encode(x).latent_dist.mean
        z = codec.encode(x)
        assert torch.equal(z, (mean - 0.1) * 0.5)
        assert torch.equal(codec.encode(x), z)           # deterministic
        decoded = codec.vae.decode(z / 0.5 + 0.1).sample.clamp(-1, 1)
    assert z.shape == (2, 4, 8, 8)
    assert torch.equal(codec.decode(z), decoded)


def test_latent_mask_regenerates_a_cell_if_any_pixel_is():
    mask = torch.zeros(1, 1, 4, 6)
    mask[0, 0, 1, 3] = 1                 # one pixel in latent cell (0, 1)
    mask[0, 0, 2:4, 4:6] = 1             # the whole cell (1, 2)
    expected = torch.tensor([[[[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]]])
    assert torch.equal(latent_mask(mask, 2), expected)


def test_masked_output_equals_the_guide_outside_the_mask(tiny_sd):
    x = _guides(2, seed=1)
    mask = torch.zeros(2, 1, 16, 16)
    mask[:, :, 3:11, 5:12] = 1           # odd edges: latent cells straddle the boundary
    out = edit(tiny_sd, x, t0=0.05, seeds=[1, 2], prompts=PROMPTS, masks=mask, repeats=2)
    keep = (mask == 0).expand_as(x)
    assert torch.equal(out[keep], x[keep])
    assert (out[~keep] - x[~keep]).abs().mean() > 0.05


def test_repeats_stay_in_latent_space_and_decode_once(tiny_sd, monkeypatch):
    codec = tiny_sd.codec
    counts = {"encode": 0, "decode": 0}
    for name in counts:
        original = getattr(codec.vae, name)

        def counted(*args, _original=original, _name=name, **kwargs):
            counts[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(codec.vae, name, counted)
    x = _guides(1, seed=2)
    once = edit(tiny_sd, x, t0=0.03, seeds=[5], prompts=PROMPTS[:1], sampler="ddim", steps=4)
    twice = edit(tiny_sd, x, t0=0.03, seeds=[5], prompts=PROMPTS[:1], sampler="ddim", steps=4,
                 repeats=2)
    assert counts == {"encode": 2, "decode": 2}          # one each per edit call
    assert not torch.allclose(once, twice, atol=1e-4)


def test_guidance_batches_both_passes_and_skips_the_unconditional_at_one(tiny_sd):
    x = _guides(2, seed=3)
    with _Calls(tiny_sd.net) as calls:
        edit(tiny_sd, x, t0=0.003, seeds=[1, 2], prompts=PROMPTS, guidance_scale=5.0)
    assert calls.sizes == [4, 4, 4]                      # 3 steps, [uncond; cond] in one call
    with _Calls(tiny_sd.net) as calls:
        one = edit(tiny_sd, x, t0=0.003, seeds=[1, 2], prompts=PROMPTS, guidance_scale=1.0)
    assert calls.sizes == [2, 2, 2]
    other = edit(tiny_sd, x, t0=0.003, seeds=[1, 2], prompts=PROMPTS, guidance_scale=5.0)
    assert not torch.allclose(one, other, atol=1e-4)


def test_each_distinct_prompt_is_embedded_once_per_batch_and_cached_across(tiny_sd):
    x = _guides(4, seed=4)
    prompts = ["a red cat", "blue dog", "a red cat", "blue dog"]
    tiny_sd.prompts.clear()
    with _Calls(tiny_sd.text.encoder) as calls:
        first = edit(tiny_sd, x, t0=0.002, seeds=[1, 2, 3, 4], prompts=prompts,
                     negative_prompts=["", "", "", "lamp"])
    assert calls.sizes == [2, 2, 2]  # each distinct (prompt, negative) pair once, alone
    with _Calls(tiny_sd.text.encoder) as calls:          # the next batch: from the cache
        again = edit(tiny_sd, x, t0=0.002, seeds=[1, 2, 3, 4], prompts=prompts,
                     negative_prompts=["", "", "", "lamp"])
    assert calls.sizes == [] and torch.equal(first, again)
    tiny_sd.prompts.max_bytes, kept = 0, tiny_sd.prompts.max_bytes
    try:                                                 # a bound of 0 keeps nothing
        tiny_sd.prompts.clear()
        with _Calls(tiny_sd.text.encoder) as calls:
            edit(tiny_sd, x[:1], t0=0.002, seeds=[1], prompts=prompts[:1])
            edit(tiny_sd, x[:1], t0=0.002, seeds=[1], prompts=prompts[:1])
        assert calls.sizes == [2, 2] and tiny_sd.prompts.nbytes == 0
    finally:
        tiny_sd.prompts.max_bytes = kept
    tokens = tiny_sd.text.tokenizer(["a red cat"], padding="max_length", truncation=True,
                                    max_length=tiny_sd.text.max_length).input_ids
    assert len(tokens[0]) == 12 == tiny_sd.text.tokenizer.model_max_length


def test_prompts_change_the_output_and_outputs_are_batch_invariant(tiny_sd):
    x = _guides(3, seed=5)
    t0, seeds = [0.02, 0.04, 0.03], [7, 8, 9]
    prompts = ["a red cat", "blue dog", "a red cat"]
    batch = edit(tiny_sd, x, t0=t0, seeds=seeds, prompts=prompts, guidance_scale=4.0)
    for i in range(3):
        alone = edit(tiny_sd, x[i:i + 1], t0=t0[i], seeds=[seeds[i]], prompts=[prompts[i]],
                     guidance_scale=4.0)
        assert torch.allclose(batch[i:i + 1], alone, atol=1e-5)
    other = edit(tiny_sd, x[:1], t0=t0[0], seeds=[7], prompts=["lamp sky"], guidance_scale=4.0)
    assert not torch.allclose(batch[:1], other, atol=1e-4)


def test_guided_denoiser_finds_rows_from_the_batch_size():
    cond = Conditioning({"encoder_hidden_states": torch.arange(4.0).view(4, 1, 1) + 10})
    uncond = Conditioning({"encoder_hidden_states": torch.arange(4.0).view(4, 1, 1) + 20})
    seen = []

    def eps(x, t, context):
        seen.append(context.rows["encoder_hidden_states"].flatten().tolist())
        return torch.zeros_like(x)

    guided = Guided(eps, cond, uncond, 2.0, lengths=[5, 9, 5, 7])
    for size in (4, 2, 1):
        guided(torch.zeros(size, 1, 2, 2), torch.zeros(size, dtype=torch.long))
    assert seen == [[20, 21, 22, 23, 10, 11, 12, 13], [21, 23, 11, 13], [21, 11]]
    with pytest.raises(RuntimeError, match="3 of 4"):
        guided(torch.zeros(3, 1, 2, 2), torch.zeros(3, dtype=torch.long))


def test_warm_up_runs_the_guided_batch(tiny_sd):
    with _Calls(tiny_sd.net) as calls:
        warm_up(tiny_sd, 3)
    assert calls.sizes == [6]


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        (dict(images=torch.zeros(2, 3, 18, 16)), "image size 18x16"),
        (dict(images=torch.zeros(2, 3, 16, 10)), "multiples of 4"),
        (dict(prompts=["a"]), "prompts is 1 values for 2 images"),
        (dict(prompts="a red cat"), "prompts is a str"),
        (dict(prompts=["a", 3]), "prompts entry 3"),
        (dict(negative_prompts=["a"]), "negative_prompts is 1 values"),
        (dict(guidance_scale=0.5), "guidance_scale=0.5"),
        (dict(sampler="ve"), "allowed: ddpm, ddim, dpmpp2m"),
    ],
)
def test_latent_input_checks(tiny_sd, kwargs, fragment):
    args = dict(images=torch.zeros(2, 3, 16, 16), t0=0.5, seeds=[1, 2], prompts=PROMPTS)
    args.update(kwargs)
    images = args.pop("images")
    with pytest.raises(ValueError) as info:
        edit(tiny_sd, images, **args)
    assert fragment in str(info.value)


def test_fast_path_options_keep_latent_outputs(tiny_sd_dir):
    model = load_model(tiny_sd_dir)
    x = _guides(2, seed=6)
    args = dict(t0=0.01, seeds=[1, 2], prompts=PROMPTS)
    plain = edit(model, x, **args)
    model.accelerate(noise_threads=2, channels_last=True, cuda_graphs=True)
    assert torch.allclose(edit(model, x, **args), plain, atol=1e-5)
    model.accelerate(noise_threads=0, channels_last=False, cuda_graphs=False,
                     autocast=torch.bfloat16)
    half = edit(model, x, **args)
    assert model.dtype == torch.bfloat16 and half.dtype == torch.float32
    assert (half - plain).abs().max() < 0.1 and not torch.equal(half, plain)
