"""Text-conditioned denoisers: prompts -> conditioning -> guided predictions for one batch.

Classifier-free guidance (Ho & Salimans, 2022) runs the unconditional and conditional passes as
one network call, as diffusers does, and only the conditional pass at g = 1; guidance-distilled
families take g in their conditioning instead (docs/jobs.md#guidance).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from sdedit.conditioning import Conditioning, PromptEncoder, cfg_combine

__all__ = ["Guided", "conditioned_denoiser"]


class Guided:
    """The guided denoiser of one batch; `lengths` are each sample's steps per round. Samplers
    step only the samples with the most steps left, so a call's conditioning rows follow from
    its batch size alone (no device sync)."""

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
        """x float32 (B, C, h, w), t (B,) step values -> guided prediction (B, C, h, w)."""
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
"""A prompt encoder's `encode`, or a model's cached `encode_prompts`."""


def conditioned_denoiser(text: PromptEncoder,
                         denoise: Callable[[torch.Tensor, torch.Tensor, Conditioning],
                                           torch.Tensor],
                         prompts: list[str], negatives: list[str], scale: float,
                         lengths: Sequence[int], size: tuple[int, int],
                         encode: Encode | None = None) -> Guided:
    """The guided denoiser of one batch of (H, W) pixel images; negative prompts are encoded
    only where classifier-free guidance runs (g != 1)."""
    spec = text.spec
    cfg = spec.guidance == "cfg" and scale != 1.0
    embedded = scale if spec.guidance == "embedded" else None
    cond, uncond = (encode or text.encode)(prompts, negatives if cfg else None, size, embedded)
    return Guided(denoise, cond, uncond if cfg else None, scale, lengths, text.combine)
