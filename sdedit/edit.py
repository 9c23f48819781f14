"""The SDEdit procedure (Meng et al., 2021): perturb the guide to t0, then reverse to t = 0.

Reproducibility contract (DESIGN.md): all noise of one output comes from
`torch.Generator("cpu").manual_seed(seed)` as float32 (C, H, W) draws: each round's perturbation
noise first, then one draw per reverse step that adds noise, in step order (with a VE corrector,
each Langevin step's draw precedes its predictor step's draw). Draws are moved to the compute
device afterwards, so an output's noise depends neither on batch size, nor on batch composition,
nor on the device the noise was drawn for (the network's float rounding may depend on the batch
size and thread count: README, Reproducibility).

Latent models follow the same contract in latent space: the draws have the family's latent
shape (C, H/f, W/f) (SD, SDXL: (4, H/8, W/8); SD3, Flux: (16, H/8, W/8); Flux's packing into
2 x 2 patches happens inside its network call), in the same order (perturbation, then one per
noisy reverse step, per round); the VAE encoding (posterior mean) and decoding draw nothing.
So with the same seed, prompt and t0, an output is the same whatever batch it ran in; each
distinct prompt of a batch is embedded once, and guidance runs the unconditional and
conditional passes as one network call.

Masks: 1 = regenerate, 0 = keep. Outside the mask the state is the guide re-noised with the
round's perturbation noise to the level each step produced, and the output equals the guide there.
Latent models use the mask at latent resolution (a latent cell is regenerated if any of its
pixels is), keep all rounds in latent space, decode once, and composite in pixels at the end, so
the output equals the guide exactly outside the pixel mask.
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
    """Per-sample standard normal draws, one CPU generator per sample (the contract above).

    Args:
        seeds: one int in [0, 2^63) per sample.
        shape: (C, H, W) of one draw.
        device: where draws are delivered (pinned + non-blocking copy on CUDA).
    """

    def __init__(self, seeds: Sequence[int], shape: tuple[int, int, int],
                 device: torch.device) -> None:
        self.generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
        self.shape = shape
        self.device = device

    def close(self) -> None:
        """Nothing to stop (every noise source has `close`; `PrefetchNoise` stops threads)."""

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
    """The noise of one `edit` call over images of (height, width): per-sample generators as
    the reproducibility contract says, drawn ahead in background threads when the model's
    `accel.noise_threads` > 0 (they start at once). Make it before the call, while the device
    is still busy with the previous batch, and pass it as `edit(..., noise=...)`; it serves one
    call, which closes it. `pool`: the threads to draw in, shared by every call of a caller
    that makes many (else each call starts `accel.noise_threads` threads of its own)."""
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
    """SDEdit a batch of guides.

    Args:
        model: from `load_model`. Its noise process (`model.process`) decides which samplers
            run: VP "ddpm"/"ddim"/"dpmpp2m", VE "ve", flow "euler"/"flow_ddpm". Its `accel`
            decides how the network runs and whether noise is drawn ahead in background
            threads; outputs depend on it only through rounding (autocast, kernel choice).
            Latent models run the same samplers on VAE latents (see the module docstring).
        images: float32 (N, C, H, W) in [-1, 1], the guides; H, W multiples of the model's
            `downsample_factor` (latent: VAE factor x network factor, 64 for SD); never resized.
        t0: the starting time in (0, 1], one float or one per sample (a batch may mix levels);
            larger = more realistic, smaller = more faithful (the paper uses 0.3-0.6); the same
            fraction of the model's time axis for every process (`sdedit.processes`). VP: the
            start index is round(t0 * T) - 1 whatever the scheduler's steps_offset.
        seeds: N ints in [0, 2^63), one per output (see the reproducibility contract).
        sampler: "ddpm" (the paper's VP loop; `steps` None = every step, start index + 1
            evaluations), "ddim" (deterministic for eta = 0; `steps` evaluations, default 50),
            "dpmpp2m" (DPM-Solver++(2M), deterministic, 5-50 evaluations, default 20),
            "ve" (Alg. 1; `steps` None = round(t0 * N)), "euler" (the flow ODE of the diffusers
            SD3 / Flux pipelines) and "flow_ddpm" (ancestral sampling of the flow path; both
            `steps` None = round(t0 * 28), at least 1).
        steps: network evaluations per round (per sample).
        masks: optional float32 (N, 1, H, W) in {0, 1} in pixels: 1 = regenerate, 0 = keep.
        repeats: K rounds; each round's output is the next round's guide inside the mask.
        eta: DDIM noise scale (ddim only).
        corrector_steps: Langevin corrector steps per VE step (Alg. 2; ve only).
        prompts: text-conditioned models only: N strings, one per image (None = "" for all).
        negative_prompts: text-conditioned models only: N strings for the unconditional pass
            of classifier-free guidance (None = "" for all).
        guidance_scale: text-conditioned models only: classifier-free guidance g in [1, 100]
            in eps_u + g (eps_c - eps_u) (g = 1 runs only the conditional pass: SD, SDXL, SD3),
            or the guidance input g in [0, 100] of a guidance-distilled model (Flux-dev); None
            = the family's default (`guidance_scale(model, None)`: SD 7.5, SDXL 5.0, SD3 7.0,
            Flux-dev 3.5); refused by guidance-free models (Flux-schnell). The range is
            `sdedit.checks.guidance_range` up to `MAX_GUIDANCE`, the job's too.
        noise: the call's noise from `noise_for(model, seeds, H, W)` made ahead (the same
            values as without it); None = made here.
    Returns:
        float32 (N, C, H, W) in [-1, 1] on `images.device`.
    Raises:
        EditInputError (a ValueError) naming the argument, its value and what is allowed
        (prompts, negative prompts or a guidance scale for an unconditional model included).
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

    Raises:
        EditInputError: a sampler the model cannot run, or t0 / steps its process cannot
            start from.
    """
    problem = sampler_problem(model.process, sampler, model.source, model.family)
    if problem:
        raise EditInputError(problem)
    return len(model.process_for(*model.sample_size).plan(t0, sampler, steps))


def prompt_cuts(model: DiffusionModel, texts: Sequence[str]) -> list[tuple[PromptCut, ...]]:
    """For each of `texts`, the text encoders of `model` that take only its first tokens
    (`PromptEncoder.prompt_cuts`: CLIP at 77, T5 at the pipeline's `max_sequence_length`):
    `edit` embeds no more of such a prompt. Empty tuples for a model without text. Call it
    where `edit` runs, not beside it (tokenizers are not thread-safe)."""
    if model.text is None:
        return [() for _ in texts]
    return model.text.prompt_cuts(list(texts))


def guidance_scale(model: DiffusionModel, value: float | None) -> float | None:
    """The guidance scale outputs of a text-conditioned model are made with: `value`, or the
    family's default when None; None for unconditional and guidance-free models."""
    if model.text is None or model.text.spec.guidance == "none":
        return None
    return model.text.spec.default_guidance if value is None else float(value)


@torch.no_grad()
def warm_up(model: DiffusionModel, batch_size: int) -> None:
    """One sampler step of `edit`'s shape at the model's sample size (the allocator's and the
    kernels' first-call cost; conditional models: the guidance batch with empty prompts)."""
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
