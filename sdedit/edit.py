"""The SDEdit procedure (Meng et al., 2021): perturb the guide to t0, then reverse to t = 0.

Every output's noise comes from its own CPU generator in a fixed order, so an output does not
depend on the batch it ran in (docs/architecture.md, the reproducibility contract). Latent models
run the same loop on VAE latents, masks at latent resolution, and composite masked outputs in
pixels at the end so that the guide is kept exactly outside the mask (docs/models.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Executor

import torch

from sdedit import samplers
from sdedit.accel import PrefetchNoise
from sdedit.checks import (
    check_common,
    check_images,
    check_masks,
    check_prompts,
    check_t0,
    sampler_problem,
)
from sdedit.conditioning import PromptCut
from sdedit.errors import EditInputError
from sdedit.guidance import conditioned_denoiser
from sdedit.latent import latent_mask
from sdedit.models import DiffusionModel
from sdedit.processes import SAMPLERS

__all__ = ["SAMPLERS", "SeedNoise", "count_steps", "edit", "guidance_scale", "noise_for",
           "prompt_cuts", "warm_up"]


class SeedNoise:
    """Per-sample standard normal draws, one CPU generator per seed in [0, 2^63), each of
    shape (C, H, W), delivered to `device`."""

    def __init__(self, seeds: Sequence[int], shape: tuple[int, int, int],
                 device: torch.device) -> None:
        self.generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
        self.shape = shape
        self.device = device

    def close(self) -> None:
        """Nothing to stop (the noise source interface)."""

    def __call__(self, rows: list[int]) -> torch.Tensor:
        """float32 (len(rows), C, H, W): the next draw of each listed sample's generator."""
        draws = torch.stack([torch.randn(self.shape, generator=self.generators[i])
                             for i in rows])
        if self.device.type == "cuda":
            return draws.pin_memory().to(self.device, non_blocking=True)
        return draws.to(self.device)


NoiseSource = SeedNoise | PrefetchNoise


def noise_for(model: DiffusionModel, seeds: Sequence[int], height: int,
              width: int, pool: Executor | None = None) -> NoiseSource:
    """The noise of one `edit(..., noise=...)` call over (height, width) images, made ahead so
    that drawing overlaps the previous batch; drawn in threads when `accel.noise_threads` > 0
    (in `pool` if given). It serves one call, which closes it."""
    shape = model.state_shape(height, width)
    threads = model.accel.noise_threads
    if threads == 0:
        return SeedNoise(seeds, shape, model.device)
    return PrefetchNoise(seeds, shape, model.device, threads, model.accel.noise_depth,
                         pool=pool)


def edit(
    model: DiffusionModel,
    images: torch.Tensor,
    *,
    t0: float | Sequence[float],
    seeds: Sequence[int],
    sampler: str = "ddpm",
    steps: int | None = None,
    masks: torch.Tensor | None = None,
    repeats: int = 1,
    eta: float = 0.0,
    corrector_steps: int = 0,
    prompts: Sequence[str] | None = None,
    negative_prompts: Sequence[str] | None = None,
    guidance_scale: float | None = None,
    noise: NoiseSource | None = None,
) -> torch.Tensor:
    """SDEdit a batch of guides: perturb each to its t0 and reverse to 0, `repeats` times.

    Args:
        model: from `load_model`; its noise process decides the samplers it runs.
        images: float32 (N, C, H, W) in [-1, 1]; H, W multiples of `model.downsample_factor`
            (never resized).
        t0: in (0, 1], one or one per sample: larger = more realistic, smaller = more faithful.
        seeds: N ints in [0, 2^63), one per output.
        sampler: one of `model.process.samplers` (docs/models.md#samplers).
        steps: network evaluations per round; None = the sampler's default at each t0.
        masks: float32 (N, 1, H, W) in {0, 1}, pixels: 1 = regenerate, 0 = keep.
        repeats: K rounds; each round's output is the next round's guide.
        eta: DDIM noise scale (ddim only).
        corrector_steps: Langevin corrector steps per VE step (ve only).
        prompts, negative_prompts: N strings (None = "" for all); text-conditioned models only.
        guidance_scale: None = the family's default; ranges in docs/jobs.md#guidance.
        noise: from `noise_for(model, seeds, H, W)`; None = made here.
    Returns:
        float32 (N, C, H, W) in [-1, 1] on `images.device`.
    Raises:
        EditInputError: an input the model cannot take, named with what is allowed.
    """
    n = check_images(model, images)
    t0s = check_t0(t0, n)
    check_common(model, seeds, n, sampler, steps, repeats, eta, corrector_steps)
    mask = check_masks(masks, images)
    texts = check_prompts(model, n, prompts, negative_prompts, guidance_scale)
    size = (int(images.shape[2]), int(images.shape[3]))
    process = model.process_for(*size)
    plans = [process.plan(t, sampler, steps) for t in t0s]

    device = model.device
    pixels = images.detach().to(device=device, dtype=torch.float32)
    regen = None if mask is None else mask.to(device=device, dtype=torch.float32)
    shape = model.state_shape(*images.shape[2:])
    guide, kept, denoise = pixels, regen, model.denoise
    if model.codec is not None:
        guide = model.codec.encode(pixels)
        kept = None if regen is None else latent_mask(regen, model.codec.factor)
    if texts is not None:
        prompt_list, negative_list, scale = texts
        assert model.text is not None
        denoise = conditioned_denoiser(model.text, model.denoise, prompt_list, negative_list,
                                       scale, [len(p) for p in plans], size,
                                       model.encode_prompts)
    if noise is None:
        noise = noise_for(model, seeds, *images.shape[2:])
    elif noise.shape != shape or len(noise.generators) != n:
        raise EditInputError(f"noise is for {len(noise.generators)} draws of {noise.shape}; "
                             f"allowed: noise_for(model, seeds, {images.shape[2]}, "
                             f"{images.shape[3]}) for these {n} images")
    everyone = list(range(n))
    first_signal, first_sigma = process.start_level([p[0] for p in plans])
    signal0, sigma0 = first_signal.to(device), first_sigma.to(device)
    try:
        for _ in range(repeats):
            z0 = noise(everyone)
            x = signal0 * guide + sigma0 * z0
            after = None if kept is None else _renoise(guide, z0, kept)
            x = process.sample(sampler, denoise, x, plans, noise, after_step=after, eta=eta,
                               corrector_steps=corrector_steps)
            if kept is not None:
                x = kept * x + (1 - kept) * guide
            guide = x
    finally:
        noise.close()
    if model.codec is not None:
        guide = model.codec.decode(guide)
        if regen is not None:
            guide = torch.where(regen.bool(), guide, pixels)
    return guide.clamp(-1.0, 1.0).to(images.device)


def count_steps(model: DiffusionModel, sampler: str, t0: float, steps: int | None) -> int:
    """Network evaluations per round for one sample: what `steps` (None = default) resolves to.
    Raises EditInputError for a sampler, t0 or steps the model cannot run."""
    problem = sampler_problem(model.process, sampler, model.source, model.family)
    if problem:
        raise EditInputError(problem)
    return len(model.process_for(*model.sample_size).plan(t0, sampler, steps))


def prompt_cuts(model: DiffusionModel, texts: Sequence[str]) -> list[tuple[PromptCut, ...]]:
    """Per text, the text encoders that read only its first tokens (empty without text).
    Call it on `edit`'s thread: tokenizers are not thread-safe."""
    if model.text is None:
        return [() for _ in texts]
    return model.text.prompt_cuts(list(texts))


def guidance_scale(model: DiffusionModel, value: float | None) -> float | None:
    """The scale outputs are made with: `value`, else the family's default; None for models
    without guidance."""
    if model.text is None or model.text.spec.guidance == "none":
        return None
    return model.text.spec.default_guidance if value is None else float(value)


@torch.no_grad()
def warm_up(model: DiffusionModel, batch_size: int) -> None:
    """One sampler step at `edit`'s shapes, so the first real batch does not pay for the
    allocator's and kernels' first calls."""
    shape = model.state_shape(*model.sample_size)
    x = torch.zeros(batch_size, *shape, device=model.device)
    process = model.process_for(*model.sample_size)
    sampler = process.samplers[0]
    plans = [process.plan(0.5, sampler, 1)] * batch_size
    denoise = model.denoise
    if model.text is not None:
        denoise = conditioned_denoiser(model.text, model.denoise, [""] * batch_size,
                                       [""] * batch_size, model.text.spec.default_guidance or 1.0,
                                       [1] * batch_size, model.sample_size, model.encode_prompts)

    def no_noise(rows: list[int]) -> torch.Tensor:
        raise RuntimeError("a one-step warm-up draws no noise")

    process.sample(sampler, denoise, x, plans, no_noise, after_step=None, eta=0.0,
                   corrector_steps=0)


def _renoise(guide: torch.Tensor, z0: torch.Tensor, regen: torch.Tensor) -> samplers.AfterStep:
    """The after_step hook of masked editing: the kept region follows the re-noised guide."""

    def after(x: torch.Tensor, rows: slice | torch.Tensor, signal: torch.Tensor,
              sigma: torch.Tensor) -> torch.Tensor:
        known = signal.view(-1, 1, 1, 1) * guide[rows] + sigma.view(-1, 1, 1, 1) * z0[rows]
        m = regen[rows]
        return m * x + (1 - m) * known

    return after
