"""Text-conditioned denoisers: prompts -> conditioning -> guided predictions for one batch.

Classifier-free guidance (Ho & Salimans, 2022): pred = pred_u + g (pred_c - pred_u), pred_u from
the negative prompt, both passes as one network call on [uncond rows; cond rows] as diffusers
does; only the conditional pass when g == 1. Guidance-distilled families (Flux-dev) take g as an
input in their conditioning instead, and guidance-free ones (Flux-schnell) take none
(`sdedit.conditioning.TextSpec`). The prediction is whatever the model's noise process samples
with (eps, velocity): guidance combines it the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from sdedit.conditioning import Conditioning, PromptEncoder, cfg_combine

__all__ = ["Guided", "conditioned_denoiser"]


class Guided:
    """The denoiser of one batch of a text-conditioned model (see the module docstring).

    The samplers may call a denoiser with a subset of the batch: the samples whose (end-aligned)
    step lists still have a step to take, i.e. at any call, the samples with the most remaining
    steps. Such a subset is fixed by its size, so the rows' conditioning is found from the batch
    size alone (no device sync); a size no such subset has raises RuntimeError.

    Args:
        denoise: (x (B, C, h, w), t (B,), conditioning of B rows) -> float32 (B, C, h, w).
        cond: the conditioning of each sample's prompt (N rows).
        uncond: the conditioning of each sample's negative prompt (N rows), or None for one
            pass (no classifier-free guidance).
        scale: the guidance scale g (used with `uncond`).
        lengths: each sample's number of reverse steps (network evaluations) per round.
        combine: (pred_u, pred_c, g) -> the guided prediction; default pred_u + g (pred_c -
            pred_u) (a family's `PromptEncoder.combine`).
    """

    def __init__(self, denoise: Callable[[torch.Tensor, torch.Tensor, Conditioning],
                                         torch.Tensor],
                 cond: Conditioning, uncond: Conditioning | None, scale: float,
                 lengths: Sequence[int],
                 combine: Callable[[torch.Tensor, torch.Tensor, float],
                                   torch.Tensor] = cfg_combine) -> None:
        self.denoise = denoise
        self.scale = scale
        self.combine = combine
        self.guided = uncond is not None
        self.both = uncond.cat(cond) if uncond is not None else cond
        self.n = len(lengths)
        order = sorted(range(self.n), key=lambda i: -lengths[i])
        device = next(iter(cond.rows.values())).device
        self.subsets: dict[int, torch.Tensor] = {}
        for size in range(1, self.n):
            if lengths[order[size - 1]] != lengths[order[size]]:
                rows = sorted(order[:size])
                both = rows + [self.n + i for i in rows] if self.guided else rows
                self.subsets[size] = torch.tensor(both, device=device)

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x: float32 (B, C, h, w); t: (B,) step values -> guided prediction (B, C, h, w)."""
        size = x.shape[0]
        if size == self.n:
            cond = self.both
        elif size in self.subsets:
            cond = self.both.take(self.subsets[size])
        else:
            raise RuntimeError(f"the sampler asked for {size} of {self.n} samples; no set of "
                               "samples with the most remaining steps has that size")
        if not self.guided:
            return self.denoise(x, t, cond)
        pred_u, pred_c = self.denoise(torch.cat([x, x]), torch.cat([t, t]), cond).chunk(2)
        return self.combine(pred_u, pred_c, self.scale)


Encode = Callable[[list[str], "list[str] | None", tuple[int, int], "float | None"],
                  tuple[Conditioning, "Conditioning | None"]]
"""(prompts, negative prompts or None, size, guidance input) -> (cond, uncond): a prompt
encoder's `encode`, or a model's `encode_prompts` (cached)."""


def conditioned_denoiser(text: PromptEncoder,
                         denoise: Callable[[torch.Tensor, torch.Tensor, Conditioning],
                                           torch.Tensor],
                         prompts: list[str], negatives: list[str], scale: float,
                         lengths: Sequence[int], size: tuple[int, int],
                         encode: Encode | None = None) -> Guided:
    """The guided denoiser of one batch of images of `size` = (H, W) pixels, from the model's
    prompt encoder and conditioned denoiser: every distinct prompt (and negative prompt, with
    classifier-free guidance and g != 1) encoded once, by `encode` (default `text.encode`)."""
    spec = text.spec
    cfg = spec.guidance == "cfg" and scale != 1.0
    embedded = scale if spec.guidance == "embedded" else None
    cond, uncond = (encode or text.encode)(prompts, negatives if cfg else None, size, embedded)
    return Guided(denoise, cond, uncond if cfg else None, scale, lengths, text.combine)
