"""Every check of `sdedit.edit`'s inputs, and the same checks of job settings from a model's
configs alone.

`settings_problems` runs the checks that depend on the model, not the images, on the noise
process and text spec read from config files: a job is refused before any weights load, with the
messages `edit` would give.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from sdedit.conditioning import TextSpec
from sdedit.errors import EditInputError, quoted
from sdedit.models import DiffusionModel
from sdedit.processes import SAMPLERS, NoiseProcess

__all__ = ["MAX_GUIDANCE", "MAX_SEED", "check_common", "check_images", "check_masks",
           "check_prompts", "check_t0", "guidance_range", "plan_problem", "sampler_problem",
           "settings_problems", "text_problems"]

MAX_SEED = 2**63 - 1
MAX_GUIDANCE = 100.0
"""The largest guidance scale any family takes; the lowest is `guidance_range`'s."""


def sampler_problem(process: NoiseProcess, sampler: str, source: str, family: str
                    ) -> str | None:
    """Why `sampler` cannot run on a model with this noise process, or None."""
    if sampler not in SAMPLERS:
        return f"sampler={quoted(sampler)} is unknown; allowed: {', '.join(SAMPLERS)}"
    if sampler not in process.samplers:
        return (f"sampler={quoted(sampler)} cannot run on {source}, a {family} model with a "
                f"{process.name.upper()} noise process; allowed: {', '.join(process.samplers)}")
    return None


def plan_problem(process: NoiseProcess, sampler: str, t0: float, steps: int | None
                 ) -> str | None:
    """Why t0 / steps cannot start this (resolved) process's plan, or None."""
    try:
        process.plan(t0, sampler, steps)
    except EditInputError as exc:
        return str(exc)
    return None


def text_problems(spec: TextSpec | None, source: str, family: str, *,
                  prompt: str | None = None, negative_prompt: str | None = None,
                  guidance_scale: float | None = None) -> list[tuple[str, str]]:
    """(argument, problem) pairs of the text settings a model of text spec `spec` (None =
    unconditional) cannot take."""
    if spec is None:
        given = [(name, value) for name, value in (("prompt", prompt), ("negative_prompt",
                 negative_prompt), ("guidance_scale", guidance_scale)) if value is not None]
        return [(name, f"{name}={quoted(value)} is for text-conditioned models and {source} is a "
                       f"{family} model that takes no text; allowed: unset (null)")
                for name, value in given]
    problems = []
    if negative_prompt and not spec.negative_prompts:
        problems.append(("negative_prompt", (
            f"negative prompt {quoted(negative_prompt)} given for {source}, a {family} model "
            f"without classifier-free guidance (guidance: {spec.guidance}); allowed: empty "
            "negative prompts")))
    if spec.guidance == "none":
        if guidance_scale is not None:
            problems.append(("guidance_scale", (
                f"guidance_scale={quoted(guidance_scale)} given for {source}, a {family} model "
                "that takes no guidance; allowed: None")))
        return problems
    scale = spec.default_guidance if guidance_scale is None else guidance_scale
    low, meaning = guidance_range(spec)
    allowed = f"a number >= {low} ({meaning}) or None ({spec.default_guidance:g})"
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) \
            or not math.isfinite(scale) or scale < low:
        problems.append(("guidance_scale", (
            f"guidance_scale={quoted(guidance_scale)} is not allowed; allowed: {allowed}")))
    elif scale > MAX_GUIDANCE:
        problems.append(("guidance_scale", (
            f"guidance_scale={quoted(guidance_scale)} is over {MAX_GUIDANCE:g}, the most any "
            f"model takes; allowed: {allowed}, at most {MAX_GUIDANCE:g}")))
    return problems


def guidance_range(spec: TextSpec) -> tuple[int, str]:
    """(the lowest guidance scale this text spec takes, what the scale means)."""
    if spec.guidance == "cfg":
        return 1, "1 = conditional pass only"
    return 0, "the guidance input of a guidance-distilled model"


def settings_problems(process: NoiseProcess, text: TextSpec | None, *, source: str,
                      family: str, tokens: int, sampler: str, t0: float, steps: int | None,
                      prompt: str | None = None, negative_prompt: str | None = None,
                      guidance_scale: float | None = None) -> list[tuple[str, str]]:
    """(setting, problem) pairs of the job settings this model cannot run, from its noise
    process and text spec alone; `tokens` = the token count at its sample size."""
    problem = sampler_problem(process, sampler, source, family)
    problems = [("sampler", problem)] if problem else []
    start = None if problem else plan_problem(process.resolved(tokens), sampler, t0, steps)
    if start:
        problems.append(("steps" if start.startswith("steps=") else "t0", start))
    return problems + text_problems(text, source, family, prompt=prompt,
                                    negative_prompt=negative_prompt,
                                    guidance_scale=guidance_scale)


def check_images(model: DiffusionModel, images: torch.Tensor) -> int:
    if not isinstance(images, torch.Tensor):
        raise EditInputError(f"images must be a torch.Tensor; got {type(images).__name__}")
    if images.dtype != torch.float32:
        raise EditInputError(f"images dtype {images.dtype} is not allowed; allowed: torch.float32")
    if images.ndim != 4 or images.shape[0] == 0 or images.shape[1] != model.in_channels:
        raise EditInputError(
            f"images shape {tuple(images.shape)} is not allowed; allowed: (N, {model.in_channels},"
            " H, W) with N >= 1")
    h, w = images.shape[2:]
    f = model.downsample_factor
    if h % f or w % f or h < f or w < f:
        raise EditInputError(
            f"image size {h}x{w} cannot be taken by model {model.source}; allowed: height and "
            f"width multiples of {f} (the model was trained at {model.sample_size[0]}x"
            f"{model.sample_size[1]})")
    low, high = (float(v) for v in torch.aminmax(images))  # one pass; NaN propagates
    if not (math.isfinite(low) and math.isfinite(high)):
        raise EditInputError("images contain NaN or infinite values; allowed: finite values "
                             "in [-1, 1]")
    if low < -1.0 - 1e-6 or high > 1.0 + 1e-6:
        raise EditInputError(f"images values span [{low:.4g}, {high:.4g}]; allowed: [-1, 1]")
    return int(images.shape[0])


def check_t0(t0: float | Sequence[float], n: int) -> list[float]:
    values = [t0] * n if isinstance(t0, (int, float)) else list(t0)
    if len(values) != n:
        raise EditInputError(f"t0 has {len(values)} values for {n} images; allowed: one "
                             f"float or {n}")
    for value in values:
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not math.isfinite(value) or not 0 < value <= 1:
            raise EditInputError(f"t0={quoted(value)} is out of range; allowed: a number in "
                                 "(0, 1]")
    return [float(v) for v in values]


def check_common(model: DiffusionModel, seeds: Sequence[int], n: int, sampler: str,
                  steps: int | None, repeats: int, eta: float, corrector_steps: int) -> None:
    if len(seeds) != n:
        raise EditInputError(f"seeds has {len(seeds)} values for {n} images; allowed: exactly {n}")
    for seed in seeds:
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
            raise EditInputError(f"seed {quoted(seed)} is not allowed; allowed: an int in "
                                 "[0, 2^63)")
    problem = sampler_problem(model.process, sampler, model.source, model.family)
    if problem:
        raise EditInputError(problem)
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise EditInputError(f"steps={quoted(steps)} is not allowed; allowed: None or an int >= 1")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise EditInputError(f"repeats={quoted(repeats)} is not allowed; allowed: an int >= 1")
    if eta < 0 or (eta > 0 and sampler != "ddim"):
        raise EditInputError(f"eta={quoted(eta)} is not allowed; allowed: >= 0, and > 0 only with "
                             "ddim")
    if corrector_steps < 0 or (corrector_steps > 0 and sampler != "ve"):
        raise EditInputError(f"corrector_steps={quoted(corrector_steps)} is not allowed; allowed: "
                             ">= 0, and > 0 only with ve")


def check_masks(masks: torch.Tensor | None, images: torch.Tensor) -> torch.Tensor | None:
    if masks is None:
        return None
    n, _, h, w = images.shape
    if not isinstance(masks, torch.Tensor) or tuple(masks.shape) != (n, 1, h, w):
        shape = tuple(masks.shape) if isinstance(masks, torch.Tensor) else type(masks).__name__
        raise EditInputError(f"masks shape {shape} is not allowed; allowed: ({n}, 1, {h}, {w})")
    if not ((masks == 0) | (masks == 1)).all():
        raise EditInputError("masks values are not all 0 or 1; allowed: {0, 1} (1 = regenerate)")
    return masks


def check_prompts(model: DiffusionModel, n: int, prompts: Sequence[str] | None,
                   negative_prompts: Sequence[str] | None, guidance_scale: float | None
                   ) -> tuple[list[str], list[str], float] | None:
    """(prompts, negative prompts, scale) for a text-conditioned model, else None."""
    if model.text is None:
        given = [name for name, value in (("prompts", prompts), ("negative_prompts",
                 negative_prompts), ("guidance_scale", guidance_scale)) if value is not None]
        if given:
            raise EditInputError(f"{', '.join(given)} given for {model.source}, which is not "
                                 "text-conditioned; allowed: None (prompts need a latent "
                                 "text-conditioned model such as a StableDiffusionPipeline)")
        return None
    lists = []
    for name, values in (("prompts", prompts), ("negative_prompts", negative_prompts)):
        if values is None:
            lists.append([""] * n)
            continue
        if isinstance(values, str) or len(values) != n:
            count = "a str" if isinstance(values, str) else f"{len(values)} values"
            raise EditInputError(f"{name} is {count} for {n} images; allowed: a sequence of "
                                 f"{n} strings")
        for value in values:
            if not isinstance(value, str):
                raise EditInputError(f"{name} entry {quoted(value)} is not allowed; allowed: a "
                                     "str")
        lists.append(list(values))
    spec = model.text.spec
    given_negative = next((v for v in lists[1] if v), None)
    problem = text_problems(spec, model.source, model.family,
                            negative_prompt=given_negative, guidance_scale=guidance_scale)
    if problem:
        raise EditInputError(problem[0][1])
    if spec.guidance == "none":
        return lists[0], lists[1], 1.0
    scale = spec.default_guidance if guidance_scale is None else guidance_scale
    return lists[0], lists[1], float(scale)
