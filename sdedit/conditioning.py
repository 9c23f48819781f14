"""What a network call needs besides x and t, carried through batching, guidance and CUDA graphs.

A family's prompt encoder makes a `Conditioning` (per-row and shared tensors); the engine never
looks inside: it selects and joins rows, and the family's `NetCall` reads the names it put
there. The seam and the token windows of prompts: docs/models.md#one-seam-for-every-family.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["Conditioning", "NetCall", "PromptCut", "PromptEncoder", "TextSpec", "TokenWindow",
           "cfg_combine", "count_cuts", "join_rows"]


@dataclass(frozen=True)
class Conditioning:
    """Conditioning of B rows: `rows` name -> tensor whose first dimension is B (e.g.
    "encoder_hidden_states" float32 (B, L, D)); `shared` name -> a tensor for every row."""

    rows: Mapping[str, torch.Tensor]
    shared: Mapping[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(next(iter(self.rows.values())).shape[0])

    def take(self, index: torch.Tensor | slice) -> Conditioning:
        """The rows selected by `index` (an int64 index tensor or a slice)."""
        return Conditioning({k: v[index] for k, v in self.rows.items()}, self.shared)

    def cat(self, other: Conditioning) -> Conditioning:
        """These rows, then `other`'s (shared tensors are this one's; `join_rows`)."""
        return join_rows([self, other])

    def to(self, dtype: torch.dtype) -> Conditioning:
        """The floating-point rows cast to `dtype` (a low-precision network's input)."""
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


def join_rows(parts: Sequence[Conditioning]) -> Conditioning:
    """The rows of `parts`, in order (shared tensors: the first's); rows whose second axis
    differs in length are zero-padded (False for a mask) to the longest."""
    rows = {}
    for name in parts[0].rows:
        tensors = [p.rows[name] for p in parts]
        if tensors[0].dim() >= 2 and len({t.shape[1] for t in tensors}) > 1:
            longest = max(t.shape[1] for t in tensors)
            tensors = [torch.nn.functional.pad(t, (0, 0) * (t.dim() - 2)
                                               + (0, longest - t.shape[1]))
                       for t in tensors]
        rows[name] = torch.cat(tensors)
    return Conditioning(rows, parts[0].shared)


NetCall = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor, "Conditioning | None"],
                   torch.Tensor]
"""(network, x float32 (B, C, h, w), network time (B,), conditioning or None) -> raw output
(B, C, h, w). A call that reads per-row values on the host sets `graph_safe = False`, so that
no CUDA graph freezes them."""


@dataclass(frozen=True)
class TextSpec:
    """How a text-conditioned family takes guidance: "cfg" (eps_u + g (eps_c - eps_u), with
    negative prompts), "embedded" (g a network input: Flux-dev) or "none"; `default_guidance`
    is g when the job sets none."""

    guidance: str
    default_guidance: float | None

    @property
    def negative_prompts(self) -> bool:
        """Whether negative prompts are used (only with classifier-free guidance)."""
        return self.guidance == "cfg"


@dataclass(frozen=True)
class TokenWindow:
    """One text encoder (by folder name) and the `max_length` tokens of a prompt it reads,
    special tokens included; `render` wraps a prompt first (a chat template) and `drop` tokens
    at its start are dropped before the window."""

    encoder: str
    tokenizer: Any
    max_length: int
    render: Callable[[str], str] | None = None
    drop: int = 0


@dataclass(frozen=True)
class PromptCut:
    """A text of which `encoder` read only the first `kept` of its `tokens` (special tokens
    included)."""

    encoder: str
    tokens: int
    kept: int


def count_cuts(windows: Sequence[TokenWindow], texts: Sequence[str]
               ) -> list[tuple[PromptCut, ...]]:
    """For each text, the windows that cut it (empty: read whole). Call it where the encoders
    run: a fast tokenizer's truncation setting is shared state."""
    distinct = [text for text in dict.fromkeys(texts) if text]  # "" is never cut
    found: dict[str, list[PromptCut]] = {text: [] for text in distinct}
    for window in windows if distinct else ():
        rendered = [window.render(t) for t in distinct] if window.render else distinct
        ids = window.tokenizer(rendered, add_special_tokens=True).input_ids
        for text, tokens in zip(distinct, ids, strict=True):
            count = len(tokens) - window.drop
            if count > window.max_length:
                found[text].append(PromptCut(window.encoder, count, window.max_length))
    return [tuple(found.get(text, ())) for text in texts]


class PromptEncoder:
    """The text side of a family (an interface each text-conditioned family implements)."""

    spec: TextSpec

    def windows(self) -> list[TokenWindow]:
        """Each text encoder's window, in order; [] = prompts are never cut."""
        return []

    def prompt_cuts(self, texts: Sequence[str]) -> list[tuple[PromptCut, ...]]:
        """For each text, the encoders that read only its first tokens (empty: read whole)."""
        return count_cuts(self.windows(), texts)

    def encode(self, prompts: list[str], negatives: list[str] | None,
               size: tuple[int, int], guidance: float | None
               ) -> tuple[Conditioning, Conditioning | None]:
        """(conditional rows, unconditional rows or None when `negatives` is None) for (H, W)
        pixel images; `guidance` is the scale of "embedded" families, else None."""
        raise NotImplementedError

    def modules(self) -> list[torch.nn.Module]:
        """The encoder networks (moved with the model to its device)."""
        raise NotImplementedError

    def combine(self, pred_u: torch.Tensor, pred_c: torch.Tensor,
                scale: float) -> torch.Tensor:
        """Classifier-free guidance of predictions (B, C, h, w); a family whose pipeline
        reshapes the guided prediction (Qwen-Image) overrides it, g keeping its meaning."""
        return cfg_combine(pred_u, pred_c, scale)


def cfg_combine(pred_u: torch.Tensor, pred_c: torch.Tensor, scale: float) -> torch.Tensor:
    """pred_u + g (pred_c - pred_u): classifier-free guidance (Ho & Salimans, 2022)."""
    return pred_u + scale * (pred_c - pred_u)
