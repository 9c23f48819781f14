"""Reverse-time samplers, each a plain function over a denoiser callable (docs/models.md#samplers).

Each takes x float32 (N, C, H, W), already perturbed to each sample's start, and per-sample step
lists aligned at their end (`sdedit.steps`). `noise(rows)` is called once per step that adds
noise, for just the samples taking it: this is what makes outputs batch-independent.
`after_step(x_rows, rows, signal, sigma)` runs after each step with the state's scales
(x ~ signal x0 + sigma z); masked editing re-noises the kept region there. Outputs are not clamped.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from sdedit.schedules import VESchedule
from sdedit.steps import AfterStep, NoiseFn, Steps, align

__all__ = ["Denoiser", "NoiseFn", "ddim", "ddpm", "dpmpp2m", "euler", "flow_ddpm",
           "logsnr_timesteps", "ve"]

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""(x float32 (B, C, H, W), t (B,)) -> float32 (B, C, H, W): eps for VP (t: int64 indices),
the score for VE (t: sigma), the velocity z - x0 for flow (t: sigma)."""


def _vp_tables(
    timesteps: Sequence[Sequence[int]], alphas_cumprod: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(t, alpha_bar_t, alpha_bar_s, active) for aligned steps t -> s; s = -1 means clean (=1)."""
    pairs = [[*seq, -1] for seq in timesteps]
    grid, active = align(pairs, pad=-2.0)
    t, s = grid[:, :-1].long(), grid[:, 1:].long()
    active = active[:, :-1]
    abar = torch.cat([alphas_cumprod.double(), torch.ones(1, dtype=torch.float64)])
    a_t = torch.where(active, abar[t.clamp(min=-1)], 1.0)
    a_s = torch.where(active, abar[s.clamp(min=-1)], 1.0)
    return t.clamp(min=0), a_t, a_s, active


def _vp_steps(x: torch.Tensor, t: torch.Tensor, active: torch.Tensor, a_s: torch.Tensor,
              coef_x: torch.Tensor, coef_eps: torch.Tensor, std: torch.Tensor) -> Steps:
    """The steps of an x_s = coef_x * x_t + coef_eps * eps + std * z sampler (ddpm, ddim)."""
    return Steps(x.device, active, active & (std > 0),
                 {"coef_x": coef_x, "coef_eps": coef_eps, "std": std, "signal": a_s.sqrt(),
                  "sigma": (1.0 - a_s).clamp(min=0).sqrt()}, {"t": t})


def ddpm(
    eps_fn: Denoiser,
    x: torch.Tensor,
    timesteps: Sequence[Sequence[int]],
    alphas_cumprod: torch.Tensor,
    noise: NoiseFn,
    *,
    after_step: AfterStep | None = None,
) -> torch.Tensor:
    """Ancestral DDPM sampling (Ho et al., 2020, Alg. 2) with the small posterior variance, as
    the official SDEdit code runs it: no x0 clipping, no noise at the last step; respaced steps
    use betas 1 - alpha_bar_t / alpha_bar_s (Nichol & Dhariwal, 2021). `timesteps`: per sample,
    descending indices ending at 0; `alphas_cumprod` (T,) float64."""
    t, a_t, a_s, active = _vp_tables(timesteps, alphas_cumprod)
    beta = 1.0 - a_t / a_s
    c_x0 = a_s.sqrt() * beta / (1.0 - a_t)          # posterior mean = c_x0 * x0 + c_xt * x_t
    c_xt = (a_t / a_s).sqrt() * (1.0 - a_s) / (1.0 - a_t)
    coef_x = c_x0 / a_t.sqrt() + c_xt                 # x0 = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t)
    coef_eps = -c_x0 * (1.0 - a_t).sqrt() / a_t.sqrt()
    std = (beta * (1.0 - a_s) / (1.0 - a_t)).clamp(min=0).sqrt()
    x = x.clone()
    for step in _vp_steps(x, t, active, a_s, coef_x, coef_eps, std):
        x_t = x[step.rows]
        x_s = step.c.coef_x * x_t + step.c.coef_eps * eps_fn(x_t, step.index.t)
        x = step.update(x, step.add_noise(x_s, noise), after_step)
    return x


def ddim(
    eps_fn: Denoiser,
    x: torch.Tensor,
    timesteps: Sequence[Sequence[int]],
    alphas_cumprod: torch.Tensor,
    noise: NoiseFn,
    *,
    eta: float = 0.0,
    after_step: AfterStep | None = None,
) -> torch.Tensor:
    """DDIM (Song, Meng & Ermon, 2021, eq. 12): eta = 0 deterministic, 1 = DDPM-like noise;
    the last step returns x0_hat. `timesteps`, `alphas_cumprod` as `ddpm`."""
    if eta < 0:
        raise ValueError(f"eta={eta!r} is out of range; allowed: eta >= 0")
    t, a_t, a_s, active = _vp_tables(timesteps, alphas_cumprod)
    sigma = eta * ((1.0 - a_s) / (1.0 - a_t) * (1.0 - a_t / a_s)).clamp(min=0).sqrt()
    coef_x = (a_s / a_t).sqrt()                       # = sqrt(a_s) x0_hat's share of x_t
    coef_eps = (1.0 - a_s - sigma**2).clamp(min=0).sqrt() - coef_x * (1.0 - a_t).sqrt()
    x = x.clone()
    for step in _vp_steps(x, t, active, a_s, coef_x, coef_eps, sigma):
        x_t = x[step.rows]
        eps = eps_fn(x_t, step.index.t)
        x = step.update(x, step.add_noise(step.c.coef_x * x_t + step.c.coef_eps * eps, noise),
                        after_step)
    return x


def logsnr_timesteps(alphas_cumprod: torch.Tensor, start: int, steps: int) -> list[int]:
    """`steps` (in 1..start + 1) distinct descending indices from `start` to 0, about uniform in
    lambda = log-SNR / 2 (Lu et al., 2022): index-uniform steps leave one huge last step in lambda,
    which a multistep method extrapolates badly."""
    if not 1 <= steps <= start + 1:
        raise ValueError(f"steps={steps!r} is out of range for start index {start}; "
                         f"allowed: 1..{start + 1}")
    if steps == 1:
        return [start]
    abar = alphas_cumprod[: start + 1].double()
    lam = 0.5 * torch.log(abar / (1.0 - abar))                  # increasing as the index falls
    targets = torch.linspace(float(lam[start]), float(lam[0]), steps, dtype=torch.float64)
    nearest = (lam[None, :] - targets[:, None]).abs().argmin(dim=1).tolist()
    out = [start]
    for i in range(1, steps):
        out.append(max(min(nearest[i], out[-1] - 1), steps - 1 - i))
    return out


def dpmpp2m(
    eps_fn: Denoiser,
    x: torch.Tensor,
    timesteps: Sequence[Sequence[int]],
    alphas_cumprod: torch.Tensor,
    noise: NoiseFn,
    *,
    after_step: AfterStep | None = None,
) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al., 2022, arXiv 2211.01095, Alg. 2): multistep, second order,
    data prediction, deterministic; each sample's first and last steps are first order (= DDIM).
    `timesteps` are best spaced by `logsnr_timesteps`; `alphas_cumprod` as `ddpm`."""
    t, a_t, a_s, active = _vp_tables(timesteps, alphas_cumprod)
    a_t = torch.where(active, a_t, 0.5)                  # padding: any finite level
    final = active & (a_s >= 1.0)
    a_s = torch.where(active & ~final, a_s, 0.5)
    alpha_t, sigma_t = a_t.sqrt(), (1.0 - a_t).sqrt()
    alpha_s, sigma_s = a_s.sqrt(), (1.0 - a_s).sqrt()
    h = torch.log(alpha_s / sigma_s) - torch.log(alpha_t / sigma_t)
    h_prev = torch.cat([torch.ones_like(h[:, :1]), h[:, :-1]], dim=1)
    first = active & ~torch.cat([torch.zeros_like(active[:, :1]), active[:, :-1]], dim=1)
    w_prev = torch.where(active & ~first & ~final, -h / (2.0 * h_prev), 0.0)   # -1 / 2r
    coef_x = torch.where(final, 0.0, sigma_s / sigma_t)
    coef_d = torch.where(final, 1.0, alpha_s * -torch.expm1(-h))
    tables = {"inv_a": 1.0 / alpha_t, "s_a": sigma_t / alpha_t, "coef_x": coef_x,
              "cur": coef_d * (1.0 - w_prev), "prev": coef_d * w_prev,
              "std": torch.zeros_like(h), "signal": torch.where(final, 1.0, alpha_s),
              "sigma": torch.where(final, 0.0, sigma_s)}
    tables = {name: torch.where(active, v, 0.0) for name, v in tables.items()}
    x, x0_prev = x.clone(), torch.zeros_like(x)         # each sample's previous x0 estimate
    for step in Steps(x.device, active, torch.zeros_like(active), tables, {"t": t}):
        x_t, c = x[step.rows], step.c
        x0 = c.inv_a * x_t - c.s_a * eps_fn(x_t, step.index.t)
        x_s = c.coef_x * x_t + c.cur * x0 + c.prev * x0_prev[step.rows]
        x0_prev = step.update(x0_prev, x0, None)
        x = step.update(x, x_s, after_step)
    return x


def ve(
    score_fn: Denoiser,
    x: torch.Tensor,
    times: Sequence[Sequence[float]],
    schedule: VESchedule,
    noise: NoiseFn,
    *,
    corrector_steps: int = 0,
    snr: float | None = None,
    after_step: AfterStep | None = None,
) -> torch.Tensor:
    """SDEdit with a VE-SDE (Meng et al., 2021, Alg. 1; Alg. 2 with `corrector_steps` Langevin
    steps before each predictor step). `times`: per sample, descending in (0, 1] with equal
    differences; the last step adds no noise (Song et al., 2021)."""
    if corrector_steps < 0:
        raise ValueError(f"corrector_steps={corrector_steps!r}; allowed: an int >= 0")
    snr = schedule.snr if snr is None else snr
    grid, active = align(times, pad=1.0)
    dt = torch.tensor([s[0] / len(s) for s in times], dtype=torch.float64)[:, None]
    last = torch.zeros_like(active)
    last[:, -1] = True
    sig_t = schedule.sigma(grid)
    sig_s = torch.where(last, 0.0, schedule.sigma((grid - dt).clamp(min=0)))
    eps2 = sig_t**2 - schedule.sigma((grid - dt).clamp(min=0)) ** 2
    std = torch.where(last, 0.0, eps2.clamp(min=0).sqrt())
    tables = {"sig_t": sig_t, "eps2": eps2, "std": std, "signal": torch.ones_like(grid),
              "sigma": sig_s}
    x = x.clone()
    for step in Steps(x.device, active, active & (std > 0), tables):
        x_t, sigma = x[step.rows], step.c.sig_t.flatten()
        for _ in range(corrector_steps):
            grad = score_fn(x_t, sigma)
            z = noise(step.ids)
            ratio = z.flatten(1).norm(dim=1) / grad.flatten(1).norm(dim=1).clamp(min=1e-12)
            size = (2 * (snr * ratio) ** 2).view(-1, 1, 1, 1)
            x_t = x_t + size * grad + (2 * size).sqrt() * z
        x_s = x_t + step.c.eps2 * score_fn(x_t, sigma)
        x = step.update(x, step.add_noise(x_s, noise), after_step)
    return x


def _flow_tables(sigmas: Sequence[Sequence[float]]
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sigma_t, sigma_s, active) float64 (N, K) of aligned steps; each last step goes to 0."""
    pairs = [[*seq, 0.0] for seq in sigmas]
    grid, active = align(pairs, pad=0.5)
    return grid[:, :-1], torch.where(active[:, 1:], grid[:, 1:], 0.0), active[:, :-1]


def euler(
    velocity_fn: Denoiser,
    x: torch.Tensor,
    sigmas: Sequence[Sequence[float]],
    noise: NoiseFn,
    *,
    after_step: AfterStep | None = None,
) -> torch.Tensor:
    """Euler's method for the rectified-flow ODE dx/dsigma = v (Liu et al., 2022; Esser et al.,
    2024): the step of diffusers' FlowMatchEulerDiscreteScheduler, deterministic. `sigmas`: per
    sample, descending levels in (0, 1] where the network is called; the last step goes to 0."""
    sig_t, sig_s, active = _flow_tables(sigmas)
    tables = {"sig_t": sig_t, "dt": sig_s - sig_t, "std": torch.zeros_like(sig_t),
              "signal": 1.0 - sig_s, "sigma": sig_s}
    x = x.clone()
    for step in Steps(x.device, active, torch.zeros_like(active), tables):
        x_t = x[step.rows]
        x_s = x_t + step.c.dt * velocity_fn(x_t, step.c.sig_t.flatten())
        x = step.update(x, x_s, after_step)
    return x


def flow_ddpm(
    velocity_fn: Denoiser,
    x: torch.Tensor,
    sigmas: Sequence[Sequence[float]],
    noise: NoiseFn,
    *,
    after_step: AfterStep | None = None,
) -> torch.Tensor:
    """Ancestral sampling of the rectified-flow path: each step draws x_s from the Gaussian
    posterior q(x_s | x_t, x0_hat) (Ho et al., 2020, Alg. 2 with a = 1 - sigma, b = sigma), the
    paper's reverse SDE on a flow model (docs/models.md#flow_ddpm). `sigmas` as `euler`."""
    sig_t, sig_s, active = _flow_tables(sigmas)
    a_t, a_s = 1.0 - sig_t, 1.0 - sig_s
    ratio = a_t / a_s
    var = (sig_s**2 * (sig_t**2 - ratio**2 * sig_s**2) / sig_t**2).clamp(min=0)
    std = torch.where(active, var.sqrt(), 0.0)
    keep = (sig_s**2 - std**2).clamp(min=0).sqrt()           # z_hat's share of x_s
    tables = {"sig_t": sig_t, "coef_x": a_s + keep, "coef_v": keep * a_t - a_s * sig_t,
              "std": std, "signal": a_s, "sigma": sig_s}
    x = x.clone()
    for step in Steps(x.device, active, active & (std > 0), tables):
        x_t = x[step.rows]
        x_s = step.c.coef_x * x_t + step.c.coef_v * velocity_fn(x_t, step.c.sig_t.flatten())
        x = step.update(x, step.add_noise(x_s, noise), after_step)
    return x
