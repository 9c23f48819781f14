"""Reverse-time samplers, each a plain function over a denoiser callable.

Every sampler takes a batch `x` already perturbed to each sample's start level and a per-sample
list of reverse steps (samples may start at different noise levels: the lists are aligned at their
end, so every sample finishes at the last iteration and a sample with fewer steps joins later).

Conventions:
    x: float32 (N, C, H, W) on the compute device; arithmetic stays float32 whatever the network's
        dtype. Coefficient tables are computed once in float64 on the CPU, then cast.
    noise(rows): one standard normal draw per listed sample, float32 (len(rows), C, H, W) on x's
        device. Samplers call it exactly once per step that adds noise, in step order, for just
        the samples that take that step (this is what makes outputs batch-independent).
    after_step(x_rows, rows, signal, sigma): optional hook run after every step with the
        scale of the state the step produced, x ~ signal * x0 + sigma * z (signal, sigma: (B,)
        float32); masked editing uses it to re-noise the kept region. The last step has
        signal = 1, sigma = 0.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from sdedit.schedules import VESchedule

__all__ = ["Denoiser", "NoiseFn", "ddim", "ddpm", "ve"]

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""(x (B, C, H, W) float32, t (B,)) -> (B, C, H, W) float32: eps for VP, the score for VE."""
NoiseFn = Callable[[list[int]], torch.Tensor]
AfterStep = Callable[[torch.Tensor, list[int], torch.Tensor, torch.Tensor], torch.Tensor]


def _align(sequences: Sequence[Sequence[float]], pad: float) -> tuple[torch.Tensor, torch.Tensor]:
    """End-align ragged per-sample step lists into (N, K) float64 with `pad`, and (N, K) active."""
    width = max(len(s) for s in sequences)
    grid = torch.full((len(sequences), width), pad, dtype=torch.float64)
    active = torch.zeros((len(sequences), width), dtype=torch.bool)
    for i, seq in enumerate(sequences):
        if seq:
            grid[i, width - len(seq):] = torch.as_tensor(list(seq), dtype=torch.float64)
            active[i, width - len(seq):] = True
    return grid, active


def _run(
    x: torch.Tensor,
    active: torch.Tensor,
    tables: dict[str, torch.Tensor],
    step: Callable[[torch.Tensor, slice | list[int], int, dict[str, torch.Tensor]], torch.Tensor],
    noisy: torch.Tensor,
    noise: NoiseFn,
    after_step: AfterStep | None,
) -> torch.Tensor:
    """Drive `step` over the aligned grid: gather active rows, step, add noise, re-noise, scatter.

    tables: (N, K) float64 CPU tables; moved once to x's device as float32. `signal` and `sigma`
    describe the state after each step (used by after_step).
    """
    dev = {name: t.to(device=x.device, dtype=torch.float32) for name, t in tables.items()}
    x = x.clone()
    n = x.shape[0]
    for k in range(active.shape[1]):
        idx = active[:, k].nonzero().flatten().tolist()
        if not idx:
            continue
        rows: slice | list[int] = slice(None) if len(idx) == n else idx
        cols = {name: t[rows, k].view(-1, 1, 1, 1) for name, t in dev.items()}
        x_rows = step(x[rows], rows, k, cols)
        draw = [i for i in idx if noisy[i, k]]
        if draw:
            z = noise(draw)
            if len(draw) == len(idx):
                x_rows = x_rows + cols["std"] * z
            else:
                where = [idx.index(i) for i in draw]
                x_rows[where] = x_rows[where] + cols["std"][where] * z
        if after_step is not None:
            x_rows = after_step(x_rows, idx, cols["signal"].flatten(), cols["sigma"].flatten())
        x[rows] = x_rows
    return x


def _vp_tables(
    timesteps: Sequence[Sequence[int]], alphas_cumprod: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(t, alpha_bar_t, alpha_bar_s, active) for aligned steps t -> s; s = -1 means clean (=1)."""
    pairs = [[*seq, -1] for seq in timesteps]
    grid, active = _align(pairs, pad=-2.0)
    t, s = grid[:, :-1].long(), grid[:, 1:].long()
    active = active[:, :-1]
    abar = torch.cat([alphas_cumprod.double(), torch.ones(1, dtype=torch.float64)])
    a_t = torch.where(active, abar[t.clamp(min=-1)], 1.0)
    a_s = torch.where(active, abar[s.clamp(min=-1)], 1.0)
    return t.clamp(min=0), a_t, a_s, active


def _vp_loop(
    eps_fn: Denoiser,
    x: torch.Tensor,
    t: torch.Tensor,
    active: torch.Tensor,
    coef_x: torch.Tensor,
    coef_eps: torch.Tensor,
    std: torch.Tensor,
    a_s: torch.Tensor,
    noise: NoiseFn,
    after_step: AfterStep | None,
) -> torch.Tensor:
    """x_s = coef_x * x_t + coef_eps * eps(x_t, t) + std * z, for all VP samplers."""
    t_dev = t.to(x.device)

    def step(x_rows: torch.Tensor, rows: slice | list[int], k: int,
             c: dict[str, torch.Tensor]) -> torch.Tensor:
        eps = eps_fn(x_rows, t_dev[rows, k])
        return c["coef_x"] * x_rows + c["coef_eps"] * eps

    tables = {"coef_x": coef_x, "coef_eps": coef_eps, "std": std,
              "signal": a_s.sqrt(), "sigma": (1.0 - a_s).clamp(min=0).sqrt()}
    return _run(x, active, tables, step, active & (std > 0), noise, after_step)


def ddpm(
    eps_fn: Denoiser,
    x: torch.Tensor,
    timesteps: Sequence[Sequence[int]],
    alphas_cumprod: torch.Tensor,
    noise: NoiseFn,
    *,
    after_step: AfterStep | None = None,
) -> torch.Tensor:
    """Ancestral DDPM sampling (Ho et al., 2020, Alg. 2) with the small posterior variance.

    As the official SDEdit code runs it: eps-prediction, no x0 clipping, no noise at the last
    step. With consecutive timesteps this is exactly x_{t-1} = (x_t - beta_t / sqrt(1 -
    alpha_bar_t) eps) / sqrt(alpha_t) + sqrt(beta_tilde_t) z; respaced timesteps use the
    respaced betas 1 - alpha_bar_t / alpha_bar_s (Nichol & Dhariwal, 2021).

    Args:
        timesteps: per sample, descending indices ending at 0 (e.g. 499, 498, ..., 0).
        alphas_cumprod: (T,) float64.
    Returns:
        float32 (N, C, H, W), the sample at t = 0 (not clamped).
    """
    t, a_t, a_s, active = _vp_tables(timesteps, alphas_cumprod)
    beta = 1.0 - a_t / a_s
    c_x0 = a_s.sqrt() * beta / (1.0 - a_t)          # posterior mean = c_x0 * x0 + c_xt * x_t
    c_xt = (a_t / a_s).sqrt() * (1.0 - a_s) / (1.0 - a_t)
    coef_x = c_x0 / a_t.sqrt() + c_xt                 # x0 = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t)
    coef_eps = -c_x0 * (1.0 - a_t).sqrt() / a_t.sqrt()
    std = (beta * (1.0 - a_s) / (1.0 - a_t)).clamp(min=0).sqrt()
    return _vp_loop(eps_fn, x, t, active, coef_x, coef_eps, std, a_s, noise, after_step)


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
    """DDIM (Song, Meng & Ermon, 2021, eq. 12): deterministic for eta = 0.

    x_s = sqrt(a_s) x0_hat + sqrt(1 - a_s - sigma^2) eps + sigma z,
    sigma = eta sqrt((1 - a_s) / (1 - a_t)) sqrt(1 - a_t / a_s); the last step returns x0_hat.

    Args:
        timesteps: per sample, descending indices ending at 0, respaced over [0, start].
        alphas_cumprod: (T,) float64.
        eta: 0 = deterministic DDIM, 1 = DDPM-like ancestral noise.
    Returns:
        float32 (N, C, H, W) (not clamped).
    """
    if eta < 0:
        raise ValueError(f"eta={eta!r} is out of range; allowed: eta >= 0")
    t, a_t, a_s, active = _vp_tables(timesteps, alphas_cumprod)
    sigma = eta * ((1.0 - a_s) / (1.0 - a_t) * (1.0 - a_t / a_s)).clamp(min=0).sqrt()
    coef_x = (a_s / a_t).sqrt()
    coef_eps = (1.0 - a_s - sigma**2).clamp(min=0).sqrt() - coef_x * (1.0 - a_t).sqrt()
    return _vp_loop(eps_fn, x, t, active, coef_x, coef_eps, sigma, a_s, noise, after_step)


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
    """SDEdit with a VE-SDE (Meng et al., 2021, Alg. 1; Alg. 2 with the Langevin corrector).

    For each sample, times t_N > ... > t_1 with t_n = n * t0 / N. Each step:
    eps^2 = sigma(t_n)^2 - sigma(t_n - dt)^2; x <- x + eps^2 s(x, sigma(t_n)) + eps z, where the
    last step adds no noise (the final denoising step of Song et al., 2021). With
    `corrector_steps` > 0, that many Langevin steps x <- x + e s + sqrt(2e) z,
    e = 2 (snr |z| / |s|)^2 (norms per sample), run before each predictor step, each drawing noise.

    Args:
        score_fn: (x, sigma (B,)) -> score, float32 (B, C, H, W).
        times: per sample, descending times in (0, 1]; consecutive differences must be equal.
    Returns:
        float32 (N, C, H, W) (not clamped).
    """
    if corrector_steps < 0:
        raise ValueError(f"corrector_steps={corrector_steps!r}; allowed: an int >= 0")
    snr = schedule.snr if snr is None else snr
    grid, active = _align(times, pad=1.0)
    dt = torch.tensor([s[0] / len(s) for s in times], dtype=torch.float64)[:, None]
    last = torch.zeros_like(active)
    last[:, -1] = True
    sig_t = schedule.sigma(grid)
    sig_s = torch.where(last, 0.0, schedule.sigma((grid - dt).clamp(min=0)))
    eps2 = sig_t**2 - schedule.sigma((grid - dt).clamp(min=0)) ** 2
    std = torch.where(last, 0.0, eps2.clamp(min=0).sqrt())
    sig_dev = sig_t.to(device=x.device, dtype=torch.float32)

    def step(x_rows: torch.Tensor, rows: slice | list[int], k: int,
             c: dict[str, torch.Tensor]) -> torch.Tensor:
        sigma = sig_dev[rows, k]
        index = list(range(x.shape[0])) if isinstance(rows, slice) else rows
        for _ in range(corrector_steps):
            grad = score_fn(x_rows, sigma)
            z = noise(index)
            ratio = z.flatten(1).norm(dim=1) / grad.flatten(1).norm(dim=1).clamp(min=1e-12)
            size = (2 * (snr * ratio) ** 2).view(-1, 1, 1, 1)
            x_rows = x_rows + size * grad + (2 * size).sqrt() * z
        return x_rows + c["eps2"] * score_fn(x_rows, sigma)

    tables = {"eps2": eps2, "std": std, "signal": torch.ones_like(grid), "sigma": sig_s}
    return _run(x, active, tables, step, active & (std > 0), noise, after_step)
