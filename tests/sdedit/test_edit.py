"""edit(): the official DDPM loop, batch invariance, masks, repeats and input checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sdedit import EditInputError, edit

T0 = 0.06  # 60 reverse steps: enough to exercise the loop, fast on a tiny model


def _guides(n: int, seed: int = 0, size: int = 16) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1


def official_sdedit(model, x0: torch.Tensor, total_noise_levels: int, seeds: list[int]):
    """The ermongroup/SDEdit loop written out independently (fixedsmall variance, fp32).

    betas = linspace(1e-4, 0.02, 1000); x = x0 sqrt(a[T-1]) + e sqrt(1 - a[T-1]); then for
    i = T-1..0: mean = (x - beta_i / sqrt(1 - a_i) eps(x, i)) / sqrt(alpha_i), plus
    exp(0.5 logvar_i) z except at i = 0. Noise per sample from its own seeded generator.
    """
    betas = torch.from_numpy(np.linspace(1e-4, 0.02, 1000, dtype=np.float64)).float()
    alphas = 1.0 - betas
    a = alphas.cumprod(dim=0)
    a_prev = torch.cat([torch.ones(1), a[:-1]])
    logvar = torch.log(torch.clamp(betas * (1 - a_prev) / (1 - a), min=1e-20))
    gens = [torch.Generator().manual_seed(s) for s in seeds]

    def randn() -> torch.Tensor:
        return torch.stack([torch.randn(x0.shape[1:], generator=g) for g in gens])

    e = randn()
    x = x0 * a[total_noise_levels - 1].sqrt() + e * (1.0 - a[total_noise_levels - 1]).sqrt()
    with torch.no_grad():
        for i in reversed(range(total_noise_levels)):
            t = torch.full((x.shape[0],), i, dtype=torch.long)
            out = model.net(x, t).sample
            mean = (x - betas[i] / (1 - a[i]).sqrt() * out) / alphas[i].sqrt()
            x = mean + torch.exp(0.5 * logvar[i]) * randn() if i > 0 else mean
    return x


def test_ddpm_matches_the_official_loop(tiny_vp):
    x = _guides(3)
    seeds = [11, 22, 33]
    ours = edit(tiny_vp, x, t0=T0, seeds=seeds, sampler="ddpm")
    ref = official_sdedit(tiny_vp, x, round(T0 * 1000), seeds).clamp(-1, 1)
    assert ours.shape == (3, 3, 16, 16)
    assert torch.allclose(ours, ref, atol=1e-4), float((ours - ref).abs().max())
    assert not torch.allclose(ours, x, atol=1e-2)  # it did edit


@pytest.mark.parametrize(("sampler", "steps"), [("ddpm", None), ("ddpm", 7), ("ddim", 8)])
def test_batch_invariance_with_mixed_t0(tiny_vp, sampler, steps):
    x = _guides(4, seed=1)
    t0 = [0.03, 0.06, 0.045, 0.06]
    seeds = [5, 6, 7, 8]
    batch = edit(tiny_vp, x, t0=t0, seeds=seeds, sampler=sampler, steps=steps)
    for i in range(4):
        alone = edit(tiny_vp, x[i:i + 1], t0=t0[i], seeds=[seeds[i]], sampler=sampler,
                     steps=steps)
        assert torch.allclose(batch[i:i + 1], alone, atol=1e-5)
    # samples differ from each other and depend on t0 and seed
    assert not torch.allclose(batch[1], batch[3], atol=1e-3)
    other_seed = edit(tiny_vp, x[:1], t0=t0[0], seeds=[99], sampler=sampler, steps=steps)
    if sampler != "ddim":  # ddim (eta=0) uses only the perturbation draw; still seed-dependent
        assert not torch.allclose(batch[:1], other_seed, atol=1e-4)


def test_ve_batch_invariance_and_corrector(tiny_ve):
    x = _guides(3, seed=2)
    t0 = [0.3, 0.2, 0.3]
    batch = edit(tiny_ve, x, t0=t0, seeds=[1, 2, 3], sampler="ve", steps=None,
                 corrector_steps=1)
    for i in range(3):
        alone = edit(tiny_ve, x[i:i + 1], t0=t0[i], seeds=[i + 1], sampler="ve",
                     corrector_steps=1)
        assert torch.allclose(batch[i:i + 1], alone, atol=1e-5)
    assert batch.min() >= -1 and batch.max() <= 1


def test_same_seed_same_output_and_deterministic(tiny_vp):
    x = _guides(2, seed=3)
    a = edit(tiny_vp, x, t0=T0, seeds=[1, 2])
    b = edit(tiny_vp, x, t0=T0, seeds=[1, 2])
    assert torch.equal(a, b)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_masks_keep_the_guide_exactly(tiny_vp, sampler):
    x = _guides(2, seed=4)
    mask = torch.zeros(2, 1, 16, 16)
    mask[:, :, 4:12, 2:10] = 1
    out = edit(tiny_vp, x, t0=T0, seeds=[1, 2], sampler=sampler, masks=mask, repeats=2)
    keep = (mask == 0).expand_as(x)
    assert torch.equal(out[keep], x[keep])
    assert not torch.allclose(out[~keep], x[~keep], atol=1e-2)


def test_mask_of_ones_equals_unmasked(tiny_vp):
    x = _guides(2, seed=5)
    ones = torch.ones(2, 1, 16, 16)
    assert torch.allclose(edit(tiny_vp, x, t0=T0, seeds=[3, 4], masks=ones),
                          edit(tiny_vp, x, t0=T0, seeds=[3, 4]), atol=1e-6)


def test_repeats_feed_each_round_into_the_next(tiny_vp):
    x = _guides(1, seed=6)
    once = edit(tiny_vp, x, t0=T0, seeds=[9], sampler="ddim", steps=5, repeats=1)
    twice = edit(tiny_vp, x, t0=T0, seeds=[9], sampler="ddim", steps=5, repeats=2)
    assert not torch.allclose(once, twice, atol=1e-4)
    # ddim (eta=0) round 2 = round 1 applied to round 1's output with the next perturbation draw
    g = torch.Generator().manual_seed(9)
    torch.randn((3, 16, 16), generator=g)
    assert twice.shape == once.shape and twice.abs().max() <= 1


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        (dict(images=torch.zeros(2, 3, 16, 16, dtype=torch.float64)), "dtype"),
        (dict(images=torch.zeros(3, 16, 16)), "shape"),
        (dict(images=torch.zeros(2, 1, 16, 16)), "(N, 3, H, W)"),
        (dict(images=torch.full((2, 3, 16, 16), 1.5)), "allowed: [-1, 1]"),
        (dict(images=torch.zeros(2, 3, 15, 16)), "multiples of 2"),
        (dict(t0=0.0), "t0=0.0"),
        (dict(t0=1.2), "(0, 1]"),
        (dict(t0=[0.5]), "t0 has 1 values for 2"),
        (dict(t0=0.0004), "round(t0 * 1000) >= 1"),
        (dict(seeds=[1]), "seeds has 1 values"),
        (dict(seeds=[1, -2]), "seed -2"),
        (dict(seeds=[1, 2**63]), "[0, 2^63)"),
        (dict(sampler="heun"), "allowed: ddpm, ddim, dpmpp2m, ve, euler, flow_ddpm"),
        (dict(sampler="ve"), "cannot run on"),
        (dict(sampler="euler"), "allowed: ddpm, ddim, dpmpp2m"),
        (dict(t0=0.01, steps=11), "steps=11 is too many for t0=0.01"),
        (dict(steps=0), "steps=0"),
        (dict(masks=torch.zeros(2, 3, 16, 16)), "masks shape (2, 3, 16, 16)"),
        (dict(masks=torch.full((2, 1, 16, 16), 0.5)), "{0, 1}"),
        (dict(repeats=0), "repeats=0"),
        (dict(eta=0.5), "only with ddim"),
    ],
)
def test_input_checks(tiny_vp, kwargs, fragment):
    args = dict(images=torch.zeros(2, 3, 16, 16), t0=0.5, seeds=[1, 2])
    args.update(kwargs)
    images = args.pop("images")
    with pytest.raises(EditInputError) as info:  # the engine's own class: a refused input
        edit(tiny_vp, images, **args)
    assert fragment in str(info.value)


@pytest.mark.parametrize("kwargs", [dict(prompts=["a", "b"]), dict(negative_prompts=["", ""]),
                                    dict(guidance_scale=7.5)])
def test_text_arguments_on_a_pixel_model_are_refused(tiny_vp, kwargs):
    with pytest.raises(EditInputError) as info:
        edit(tiny_vp, torch.zeros(2, 3, 16, 16), t0=0.5, seeds=[1, 2], **kwargs)
    assert f"{next(iter(kwargs))} given for" in str(info.value)
    assert "not text-conditioned" in str(info.value)
