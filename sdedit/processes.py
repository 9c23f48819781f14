"""Noise processes: the seam between `sdedit.edit` and a model family's time axis.

    VP   (DDPM, SD, SDXL):  x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps,  t = 0..T-1
    VE   (score SDE):       x(t) = x0 + sigma(t) z,                        t in (0, 1]
    flow (SD3, Flux, ...):  x = (1 - sigma) x0 + sigma z,  sigma = shift(u), u in (0, 1]

t0 means the same for all three: the fraction of the model's own time axis where the reverse
process starts (VP: index round(t0 * T) - 1; VE: t = t0; flow: u = t0, where diffusers' img2img
starts for `strength` = t0). Plans are descending per-sample step values; tables are float64 on
the CPU. docs/models.md#one-seam-for-every-family.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import torch

from sdedit import samplers
from sdedit.errors import EditInputError
from sdedit.schedules import VESchedule, VPSchedule, respace
from sdedit.steps import AfterStep, NoiseFn

__all__ = ["SAMPLERS", "DynamicShift", "FlowProcess", "NoiseProcess", "VEProcess", "VPProcess"]

SAMPLERS = ("ddpm", "ddim", "dpmpp2m", "ve", "euler", "flow_ddpm")
"""Every sampler name; each process runs a subset (`NoiseProcess.samplers`)."""


class NoiseProcess(Protocol):
    """What `sdedit.edit` needs of a model's time axis."""

    name: str
    """"vp", "ve" or "flow": for messages and records only."""
    samplers: tuple[str, ...]
    """The samplers this process runs; the first is its default."""

    def plan(self, t0: float, sampler: str, steps: int | None) -> list[float]:
        """One sample's descending reverse steps (the values the denoiser is called at);
        EditInputError for t0 or steps this process cannot start from."""

    def start_level(self, starts: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
        """(signal, sigma), float32 (N, 1, 1, 1) each: x(t0) = signal * guide + sigma * z for
        plans whose first steps are `starts`."""

    def sample(self, sampler: str, denoise: samplers.Denoiser, x: torch.Tensor,
               plans: Sequence[Sequence[float]], noise: NoiseFn, *,
               after_step: AfterStep | None, eta: float,
               corrector_steps: int) -> torch.Tensor:
        """Run `sampler` from the perturbed x (float32 (N, C, H, W)) along `plans`."""

    def network_time(self, t: torch.Tensor) -> torch.Tensor:
        """The network's time input for the sampler's step values t (B,)."""

    def target(self, output: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The sampler's quantity (eps, score or velocity) from the raw network output."""

    def resolved(self, tokens: int) -> NoiseProcess:
        """The process for images of `tokens` network tokens (a resolution-dependent shift);
        itself for the others."""


def _steps_problem(steps: int | None, most: int, t0: float, start: int | None = None) -> None:
    if steps is not None and steps > most:
        where = f"the start index is {start}" if start is not None else f"{most} at most"
        raise EditInputError(f"steps={steps} is too many for t0={t0}: {where}; allowed: "
                             f"1..{most}")


@dataclass(frozen=True)
class VPProcess:
    """A discrete variance-preserving process (DDPM; SD and SDXL on latents); the network's
    `prediction_type` ("epsilon", "sample" or "v_prediction") is turned into eps."""

    schedule: VPSchedule
    prediction_type: str = "epsilon"
    name: str = "vp"
    samplers: tuple[str, ...] = ("ddpm", "ddim", "dpmpp2m")
    default_steps: Mapping[str, int] = field(
        default_factory=lambda: {"ddim": 50, "dpmpp2m": 20})
    """Evaluations per round when `steps` is None (at most start index + 1); ddpm: every index."""
    _abar: dict[Any, torch.Tensor] = field(default_factory=dict, repr=False, compare=False)

    def plan(self, t0: float, sampler: str, steps: int | None) -> list[float]:
        """Descending timestep indices from round(t0 * T) - 1 to 0 (respaced to `steps`;
        dpmpp2m spaced uniformly in log-SNR)."""
        try:
            start = self.schedule.start_index(t0)
        except ValueError as exc:
            raise EditInputError(str(exc)) from exc
        if float(self.schedule.alphas_cumprod[start]) <= 0.0:
            raise EditInputError(
                f"t0={t0} starts at index {start}, where this zero-terminal-SNR schedule "
                f"(rescale_betas_zero_snr) has no signal left; allowed: t0 below "
                f"{(start + 0.5) / self.schedule.num_train_timesteps:.4g}")
        if sampler in self.default_steps and steps is None:
            steps = min(self.default_steps[sampler], start + 1)
        _steps_problem(steps, start + 1, t0, start)
        try:
            if sampler == "dpmpp2m":
                return [float(t) for t in samplers.logsnr_timesteps(
                    self.schedule.alphas_cumprod, start, steps or start + 1)]
            return [float(t) for t in respace(start, steps)]
        except ValueError as exc:
            raise EditInputError(str(exc)) from exc

    def start_level(self, starts: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
        abar = self.schedule.alphas_cumprod[torch.tensor([int(s) for s in starts])]
        return (abar.sqrt().float().view(-1, 1, 1, 1),
                (1 - abar).sqrt().float().view(-1, 1, 1, 1))

    def sample(self, sampler: str, denoise: samplers.Denoiser, x: torch.Tensor,
               plans: Sequence[Sequence[float]], noise: NoiseFn, *,
               after_step: AfterStep | None, eta: float,
               corrector_steps: int) -> torch.Tensor:
        timesteps = [[int(t) for t in p] for p in plans]
        abar = self.schedule.alphas_cumprod
        if sampler == "ddim":
            return samplers.ddim(denoise, x, timesteps, abar, noise, eta=eta,
                                 after_step=after_step)
        if sampler == "dpmpp2m":
            return samplers.dpmpp2m(denoise, x, timesteps, abar, noise, after_step=after_step)
        return samplers.ddpm(denoise, x, timesteps, abar, noise, after_step=after_step)

    def network_time(self, t: torch.Tensor) -> torch.Tensor:
        """The int64 timestep indices themselves."""
        return t

    def target(self, output: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """eps from an eps-, x0- ("sample") or v-prediction at int64 timesteps t (B,)."""
        if self.prediction_type == "epsilon":
            return output
        abar = self._abar.get(x.device)
        if abar is None:
            abar = self._abar[x.device] = self.schedule.alphas_cumprod.to(x.device, torch.float32)
        a = abar[t].view(-1, 1, 1, 1)
        if self.prediction_type == "sample":
            return (x - a.sqrt() * output) / (1 - a).sqrt()
        return a.sqrt() * output + (1 - a).sqrt() * x  # v_prediction

    def resolved(self, tokens: int) -> VPProcess:
        return self


@dataclass(frozen=True)
class VEProcess:
    """A variance-exploding score SDE (Song et al., 2021); the network predicts the score."""

    schedule: VESchedule
    name: str = "ve"
    samplers: tuple[str, ...] = ("ve",)

    def plan(self, t0: float, sampler: str, steps: int | None) -> list[float]:
        """t_n = n * t0 / N for n = N..1, N = `steps` or round(t0 * num_train_timesteps)."""
        count = steps if steps is not None else \
            max(1, round(t0 * self.schedule.num_train_timesteps))
        return [t0 * (i / count) for i in range(count, 0, -1)]

    def start_level(self, starts: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
        sigma = self.schedule.sigma(torch.tensor(list(starts), dtype=torch.float64))
        return torch.ones(len(starts), 1, 1, 1), sigma.float().view(-1, 1, 1, 1)

    def sample(self, sampler: str, denoise: samplers.Denoiser, x: torch.Tensor,
               plans: Sequence[Sequence[float]], noise: NoiseFn, *,
               after_step: AfterStep | None, eta: float,
               corrector_steps: int) -> torch.Tensor:
        return samplers.ve(denoise, x, plans, self.schedule, noise,
                           corrector_steps=corrector_steps, after_step=after_step)

    def network_time(self, t: torch.Tensor) -> torch.Tensor:
        """The noise level sigma itself, float32."""
        return t.float()

    def target(self, output: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return output

    def resolved(self, tokens: int) -> VEProcess:
        return self


@dataclass(frozen=True)
class DynamicShift:
    """Diffusers' `use_dynamic_shifting` (Flux-dev): mu linear in the image's token count from
    `base_shift` at `base_seq_len` to `max_shift` at `max_seq_len`."""

    base_seq_len: int = 256
    max_seq_len: int = 4096
    base_shift: float = 0.5
    max_shift: float = 1.15
    kind: str = "exponential"

    def mu(self, tokens: int) -> float:
        slope = (self.max_shift - self.base_shift) / (self.max_seq_len - self.base_seq_len)
        return tokens * slope + self.base_shift - slope * self.base_seq_len


@dataclass(frozen=True)
class FlowProcess:
    """A rectified-flow process: x = (1 - sigma) x0 + sigma z, the network predicting v = z - x0.

    A plan of t0 with M steps calls the network at sigma = shift(t0 (1 - k/M)), k = 0..M-1, as
    diffusers' img2img (docs/models.md); `steps` None = max(1, round(t0 * full_steps)). `dynamic`
    shifts need `resolved(tokens)` first; `shift_terminal` stretches each plan as diffusers does.
    """

    shift: float = 1.0
    dynamic: DynamicShift | None = None
    mu: float | None = None
    shift_terminal: float | None = None
    num_train_timesteps: int = 1000
    full_steps: int = 28
    name: str = "flow"
    samplers: tuple[str, ...] = ("euler", "flow_ddpm")

    def sigma(self, u: float) -> float:
        """The shifted noise level of unshifted time u in (0, 1]."""
        if self.dynamic is None:
            return self.shift * u / (1 + (self.shift - 1) * u)
        if self.mu is None:
            raise RuntimeError("a dynamically shifted flow process needs resolved(tokens) first")
        if self.dynamic.kind == "linear":
            return self.mu / (self.mu + (1 / u - 1))
        return math.exp(self.mu) / (math.exp(self.mu) + (1 / u - 1))

    def plan(self, t0: float, sampler: str, steps: int | None) -> list[float]:
        count = steps if steps is not None else max(1, round(t0 * self.full_steps))
        sigmas = [self.sigma(t0 * (1 - k / count)) for k in range(count)]
        if self.shift_terminal:       # diffusers' stretch_shift_to_terminal on the N-step grid
            factor = (1 - sigmas[-1]) / (1 - self.shift_terminal)
            sigmas = [1 - (1 - s) / factor for s in sigmas]
        return sigmas

    def start_level(self, starts: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
        sigma = torch.tensor(list(starts), dtype=torch.float64)
        return (1 - sigma).float().view(-1, 1, 1, 1), sigma.float().view(-1, 1, 1, 1)

    def sample(self, sampler: str, denoise: samplers.Denoiser, x: torch.Tensor,
               plans: Sequence[Sequence[float]], noise: NoiseFn, *,
               after_step: AfterStep | None, eta: float,
               corrector_steps: int) -> torch.Tensor:
        run = samplers.flow_ddpm if sampler == "flow_ddpm" else samplers.euler
        return run(denoise, x, plans, noise, after_step=after_step)

    def network_time(self, t: torch.Tensor) -> torch.Tensor:
        """sigma * num_train_timesteps, float32 (diffusers' `timesteps`)."""
        return t.float() * self.num_train_timesteps

    def target(self, output: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return output

    def resolved(self, tokens: int) -> FlowProcess:
        if self.dynamic is None:
            return self
        return replace(self, mu=self.dynamic.mu(tokens))


UNSUPPORTED_FLOW_OPTIONS = ("use_karras_sigmas", "use_exponential_sigmas",
                            "use_beta_sigmas", "invert_sigmas", "stochastic_sampling")
"""Scheduler options that change the grid or the step: refused when set, never ignored."""


def flow_from_config(config: Mapping[str, Any]) -> FlowProcess:
    """A FlowProcess from a FlowMatchEulerDiscreteScheduler config; ValueError naming an
    unsupported option that changes the grid or the step."""
    used = [name for name in UNSUPPORTED_FLOW_OPTIONS if config.get(name)]
    if used:
        raise ValueError(f"scheduler option(s) {', '.join(f'{n}={config[n]!r}' for n in used)} "
                         "not supported; allowed: the default grid (unset or false)")
    dynamic = None
    if config.get("use_dynamic_shifting"):
        kind = config.get("time_shift_type", "exponential")
        if kind not in ("exponential", "linear"):
            raise ValueError(f"scheduler time_shift_type={kind!r}; allowed: exponential, linear")
        dynamic = DynamicShift(
            int(config.get("base_image_seq_len", 256)), int(config.get("max_image_seq_len", 4096)),
            float(config.get("base_shift") if config.get("base_shift") is not None else 0.5),
            float(config.get("max_shift") if config.get("max_shift") is not None else 1.15),
            kind)
    terminal = config.get("shift_terminal")
    if terminal is not None and not 0 <= float(terminal) < 1:
        raise ValueError(f"scheduler shift_terminal={terminal!r}; allowed: [0, 1) or null")
    return FlowProcess(shift=float(config.get("shift", 1.0)), dynamic=dynamic,
                       num_train_timesteps=int(config.get("num_train_timesteps", 1000)),
                       shift_terminal=float(terminal) if terminal else None)
