"""Noise schedules: VP betas and alpha_bar (Ho et al., 2020), VE geometric sigmas (Song et al.,
2021), t0 -> start index, and respacing. Tables are float64 on the CPU.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["VESchedule", "VPSchedule", "respace", "zero_terminal_snr"]


@dataclass(frozen=True)
class VPSchedule:
    """A discrete variance-preserving schedule of betas (T,) float64, each in (0, 1)."""

    betas: torch.Tensor

    @property
    def num_train_timesteps(self) -> int:
        return int(self.betas.shape[0])

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        """(T,) float64 alpha_bar_t = prod_{s<=t} (1 - beta_s), decreasing in (0, 1)."""
        return torch.cumprod(1.0 - self.betas, dim=0)

    @classmethod
    def linear(
        cls, beta_start: float = 1e-4, beta_end: float = 0.02, num_train_timesteps: int = 1000
    ) -> VPSchedule:
        """The DDPM linear schedule (the SDEdit paper's LSUN models)."""
        return cls(torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64))

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> VPSchedule:
        """From a diffusers DDPM-style scheduler config: linear, scaled_linear,
        squaredcos_cap_v2 or trained betas, `rescale_betas_zero_snr` applied."""
        schedule = cls._betas_from_config(config)
        if config.get("rescale_betas_zero_snr"):
            return cls(zero_terminal_snr(schedule.betas))
        return schedule

    @classmethod
    def _betas_from_config(cls, config: Mapping[str, Any]) -> VPSchedule:
        steps = int(config.get("num_train_timesteps", config.get("timesteps", 1000)))
        trained = config.get("trained_betas")
        if trained is not None:
            return cls(torch.tensor(trained, dtype=torch.float64))
        start = float(config.get("beta_start", 1e-4))
        end = float(config.get("beta_end", 0.02))
        kind = config.get("beta_schedule", "linear")
        if kind == "linear":
            return cls.linear(start, end, steps)
        if kind == "scaled_linear":
            betas = torch.linspace(start**0.5, end**0.5, steps, dtype=torch.float64) ** 2
            return cls(betas)
        if kind == "squaredcos_cap_v2":
            def alpha_bar(u: float) -> float:
                return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

            betas = [min(1 - alpha_bar((i + 1) / steps) / alpha_bar(i / steps), 0.999)
                     for i in range(steps)]
            return cls(torch.tensor(betas, dtype=torch.float64))
        raise ValueError(
            f"scheduler beta_schedule={kind!r} is not supported; "
            "allowed: linear, scaled_linear, squaredcos_cap_v2 or trained_betas"
        )

    def start_index(self, t0: float) -> int:
        """The first reverse step of t0 in (0, 1]: round(t0 * T) - 1, as the official code."""
        index = round(t0 * self.num_train_timesteps) - 1
        if not 0 < t0 <= 1 or index < 0:
            raise ValueError(
                f"t0={t0!r} is out of range; allowed: a number in (0, 1] with "
                f"round(t0 * {self.num_train_timesteps}) >= 1"
            )
        return index


def zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Betas (T,) float64 rescaled so that alpha_bar ends at 0 (Lin et al., 2024, Alg. 1)."""
    root = torch.cumprod(1.0 - betas.double(), dim=0).sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * first / (first - last)
    abar = root**2
    alphas = torch.cat([abar[:1], abar[1:] / abar[:-1]])
    return 1.0 - alphas


@dataclass(frozen=True)
class VESchedule:
    """A variance-exploding schedule, sigma(t) = sigma_min (sigma_max / sigma_min)^t, of N =
    `num_train_timesteps` steps over [0, 1]; `snr`: the Langevin corrector's (Alg. 4)."""

    sigma_min: float = 0.01
    sigma_max: float = 1348.0
    num_train_timesteps: int = 2000
    snr: float = 0.15

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> VESchedule:
        """From a diffusers ScoreSdeVeScheduler config (defaults are diffusers')."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        return cls(**{name: type(f.default)(config[name])
                      for name, f in fields.items() if name in config})

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        """sigma(t) for t in [0, 1], same shape and dtype as t."""
        return self.sigma_min * (self.sigma_max / self.sigma_min) ** t


def respace(start: int, steps: int | None) -> list[int]:
    """`steps` distinct timesteps evenly spaced from `start` down to 0 (None = every index)."""
    if steps is None or steps == start + 1:
        return list(range(start, -1, -1))
    if not 1 <= steps <= start + 1:
        raise ValueError(
            f"steps={steps!r} is out of range for start index {start}; allowed: 1..{start + 1}"
        )
    if steps == 1:
        return [start]
    points = torch.linspace(start, 0, steps, dtype=torch.float64).round().long().tolist()
    return [int(p) for p in points]
