"""The paper's SDEdit loop built like the official code: the baseline of `sdedit-batch bench`,
never used by the product.

It keeps what costs time there (fp32, eager, DataParallel, per-step host tensors, device noise, a
boolean-mask update); fed the same noise it equals `sdedit.edit(..., sampler="ddpm")`. See
docs/performance.md, "speed"."""

from __future__ import annotations

import copy
from collections.abc import Callable

import numpy as np
import torch

BATCH = 8


def extract(a: torch.Tensor | np.ndarray, t: torch.Tensor, x_shape: torch.Size) -> torch.Tensor:
    """Coefficients a[t] shaped to broadcast over x (as in the official code)."""
    (bs,) = t.shape
    out = torch.gather(torch.as_tensor(a, dtype=torch.float, device=t.device).clone(), 0,
                       t.long())
    return out.reshape((bs,) + (1,) * (len(x_shape) - 1))


def denoising_step(x: torch.Tensor, t: torch.Tensor, *, model: Callable[..., torch.Tensor],
                   logvar: np.ndarray, betas: torch.Tensor,
                   randn_like: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """image_editing_denoising_step_flexible_mask: one sample of p(x_{t-1} | x_t)."""
    alphas = 1.0 - betas
    alphas_cumprod = alphas.cumprod(dim=0)
    model_output = model(x, t)
    weighted_score = betas / torch.sqrt(1 - alphas_cumprod)
    mean = extract(1 / torch.sqrt(alphas), t, x.shape) * (
        x - extract(weighted_score, t, x.shape) * model_output)
    logvar_t = extract(logvar, t, x.shape)
    noise = randn_like(x)
    mask = 1 - (t == 0).float()
    mask = mask.reshape((x.shape[0],) + (1,) * (len(x.shape) - 1))
    return (mean + mask * torch.exp(0.5 * logvar_t) * noise).float()


class _Eps(torch.nn.Module):
    """net(x, t).sample, so DataParallel sees a plain tensor function."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.net(x, t).sample


def official_network(net: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """A float32 copy of a diffusers UNet2DModel run like the official model: classic attention,
    eval mode, DataParallel on CUDA."""
    from diffusers.models.attention_processor import Attention, AttnProcessor

    net = copy.deepcopy(net).float().to(device, memory_format=torch.contiguous_format).eval()
    for module in net.modules():
        if isinstance(module, Attention):
            module.set_processor(AttnProcessor())
    model: torch.nn.Module = _Eps(net)
    if device.type == "cuda":
        model = torch.nn.DataParallel(model, device_ids=[device.index or 0])
    return model


def schedule(device: torch.device) -> tuple[torch.Tensor, np.ndarray]:
    """(betas float32 on device, fixedsmall log-variance numpy float64), like Diffusion.__init__."""
    betas_np = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
    alphas_cumprod = np.cumprod(1.0 - betas_np, axis=0)
    alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
    posterior_variance = betas_np * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
    logvar = np.log(np.maximum(posterior_variance, 1e-20))
    return torch.from_numpy(betas_np).float().to(device), logvar


@torch.no_grad()
def reference_edit(model: torch.nn.Module, guide: torch.Tensor, total_noise_levels: int, *,
                   batch: int = BATCH,
                   randn_like: Callable[[torch.Tensor], torch.Tensor] = torch.randn_like
                   ) -> torch.Tensor:
    """image_editing_sample for one round: float32 (batch, C, H, W), unclamped, from `guide` (1,
    C, H, W) in [-1, 1] repeated to `batch`; `total_noise_levels` is the official `--t` (t0 *
    1000), that many network evaluations."""
    device = next(model.parameters()).device
    betas, logvar = schedule(device)
    x0 = guide.to(device).repeat(batch, 1, 1, 1)
    mask = torch.zeros(x0.shape[1:], device=device)               # stroke generation: all new
    e = randn_like(x0)
    a = (1 - betas).cumprod(dim=0)
    x = x0 * a[total_noise_levels - 1].sqrt() + e * (1.0 - a[total_noise_levels - 1]).sqrt()
    for i in reversed(range(total_noise_levels)):
        t = (torch.ones(batch) * i).to(device)
        x_ = denoising_step(x, t, model=model, logvar=logvar, betas=betas, randn_like=randn_like)
        x = x0 * a[i].sqrt() + e * (1.0 - a[i]).sqrt()
        x[:, (mask != 1.0)] = x_[:, (mask != 1.0)]
    return x
