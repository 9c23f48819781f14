"""What a network call needs besides x and t, carried through batching, guidance and CUDA graphs.

A model family's prompt encoder (`sdedit.families`) turns prompts into a `Conditioning`: per-row
tensors (prompt embeddings, pooled embeddings, SDXL's size ids, Flux's guidance value) and shared
tensors (Flux's text and image position ids). The engine never looks inside: it selects rows
(samplers step a subset of the batch), joins the unconditional and conditional rows of
classifier-free guidance, and the family's network call (`NetCall`) reads the names it put there.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["Conditioning", "NetCall", "PromptEncoder", "TextSpec"]


@dataclass(frozen=True)
class Conditioning:
    """Conditioning of B rows.

    Attributes:
        rows: name -> tensor whose first dimension is B (e.g. "encoder_hidden_states" float32
            (B, L, D), "pooled_projections" (B, P), "time_ids" (B, 6), "guidance" (B,)).
        shared: name -> tensor the same for every row (e.g. Flux's "txt_ids" (L, 3)).
    """

    rows: Mapping[str, torch.Tensor]
    shared: Mapping[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(next(iter(self.rows.values())).shape[0])

    def take(self, index: torch.Tensor | slice) -> Conditioning:
        """The rows selected by `index` (an int64 index tensor or a slice)."""
        return Conditioning({k: v[index] for k, v in self.rows.items()}, self.shared)

    def cat(self, other: Conditioning) -> Conditioning:
        """These rows, then `other`'s (shared tensors are this one's)."""
        return Conditioning({k: torch.cat([v, other.rows[k]]) for k, v in self.rows.items()},
                            self.shared)

    def to(self, dtype: torch.dtype) -> Conditioning:
        """The floating-point rows cast to `dtype` (a low-precision network's input); shared
        tensors (position ids) stay as they are."""
        return Conditioning({k: v.to(dtype) if v.is_floating_point() else v
                             for k, v in self.rows.items()}, self.shared)

    def key(self) -> tuple[Any, ...]:
        """Names, shapes and dtypes of every tensor (what a captured CUDA graph depends on)."""
        return tuple((kind, name, tuple(t.shape), t.dtype)
                     for kind, part in (("rows", self.rows), ("shared", self.shared))
                     for name, t in sorted(part.items()))

    def clone(self) -> Conditioning:
        return Conditioning({k: v.clone() for k, v in self.rows.items()},
                            {k: v.clone() for k, v in self.shared.items()})

    def copy_(self, other: Conditioning) -> None:
        """Copy `other`'s values into these tensors in place (same key)."""
        for mine, theirs in ((self.rows, other.rows), (self.shared, other.shared)):
            for name, tensor in mine.items():
                tensor.copy_(theirs[name])


NetCall = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor, "Conditioning | None"],
                   torch.Tensor]
"""(network, x float32 (B, C, h, w), network time (B,), conditioning or None) -> the raw output,
(B, C, h, w): how a family calls its diffusers network (keyword names, packing)."""


@dataclass(frozen=True)
class TextSpec:
    """How a text-conditioned family takes prompts and guidance; known from configs alone.

    Attributes:
        guidance: "cfg" (classifier-free guidance: an unconditional pass from the negative
            prompt, eps_u + g (eps_c - eps_u)), "embedded" (a guidance-distilled model takes g
            as an input, one pass, no negative prompt: Flux-dev) or "none" (no guidance input
            and no negative prompt: Flux-schnell).
        default_guidance: g when the job sets none (None for "none").
    """

    guidance: str
    default_guidance: float | None

    @property
    def negative_prompts(self) -> bool:
        """Whether negative prompts are used (only with classifier-free guidance)."""
        return self.guidance == "cfg"


class PromptEncoder:
    """The text side of a family (an interface; each text-conditioned family implements it).

    Attributes:
        spec: how it takes prompts and guidance.
    """

    spec: TextSpec

    def encode(self, prompts: list[str], negatives: list[str] | None,
               size: tuple[int, int], guidance: float | None
               ) -> tuple[Conditioning, Conditioning | None]:
        """(conditional rows, unconditional rows or None when `negatives` is None) for images
        of `size` = (H, W) pixels; every distinct text is encoded once. `guidance` is the scale
        for "embedded" families (None otherwise)."""
        raise NotImplementedError

    def modules(self) -> list[torch.nn.Module]:
        """The encoder networks (moved with the model to its device)."""
        raise NotImplementedError
