"""What a network call needs besides x and t, carried through batching, guidance and CUDA graphs.

A model family's prompt encoder (`sdedit.families`) turns prompts into a `Conditioning`: per-row
tensors (prompt embeddings, pooled embeddings, SDXL's size ids, Flux's guidance value) and shared
tensors (Flux's text and image position ids). The engine never looks inside: it selects rows
(samplers step a subset of the batch), joins the unconditional and conditional rows of
classifier-free guidance, and the family's network call (`NetCall`) reads the names it put there.

Each text encoder takes at most its window of tokens of a prompt (CLIP 77, T5 the pipeline's
`max_sequence_length`); a longer prompt is cut there, as in diffusers. A prompt encoder lists its
windows (`PromptEncoder.windows`), and `PromptEncoder.prompt_cuts` says which prompts are cut,
where: so a caller can record that a prompt was not used whole.
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
        """These rows, then `other`'s (shared tensors are this one's; `join_rows`)."""
        return join_rows([self, other])

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


def join_rows(parts: Sequence[Conditioning]) -> Conditioning:
    """The rows of `parts`, in order, as one Conditioning (shared tensors: the first's). Rows
    whose second axis differs in length (texts of their own lengths, beside a mask or their
    lengths) are zero-padded (False for a mask) to the longest, as a family pads the texts of
    one encoder call."""
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
"""(network, x float32 (B, C, h, w), network time (B,), conditioning or None) -> the raw output,
(B, C, h, w): how a family calls its diffusers network (keyword names, packing). A call that
reads per-row values on the host (Z-Image's caption lengths) sets the attribute
`graph_safe = False`: CUDA graphs are then not captured for it (`sdedit.accel`)."""


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


@dataclass(frozen=True)
class TokenWindow:
    """One text encoder's tokenizer and the tokens of a prompt it takes.

    Attributes:
        encoder: the encoder's folder in the model directory ("text_encoder", "text_encoder_2",
            ...), for messages and records.
        tokenizer: a transformers tokenizer: `tokenizer(texts).input_ids` are the texts' tokens,
            special tokens included, as the encoder's own call counts them.
        max_length: tokens the encoder takes (it is called with `truncation=True` at this
            length), special tokens included.
        render: how the family wraps a prompt before tokenising it (a chat template), or None.
        drop: tokens at the start of the rendered prompt the family drops before the window.
    """

    encoder: str
    tokenizer: Any
    max_length: int
    render: Callable[[str], str] | None = None
    drop: int = 0


@dataclass(frozen=True)
class PromptCut:
    """A text that a text encoder took only the first `kept` of its `tokens` (special tokens
    included) of; `encoder` as in `TokenWindow`."""

    encoder: str
    tokens: int
    kept: int


def count_cuts(windows: Sequence[TokenWindow], texts: Sequence[str]
               ) -> list[tuple[PromptCut, ...]]:
    """For each of `texts`, the windows that cut it, in the order of `windows` (an empty
    tuple: every encoder takes it whole). Each distinct text is tokenised once per window,
    without truncation. Not thread-safe with other calls of the same tokenizers (a fast
    tokenizer's truncation setting is shared state): call it where the encoders run."""
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
    """The text side of a family (an interface; each text-conditioned family implements it).

    Attributes:
        spec: how it takes prompts and guidance.
    """

    spec: TextSpec

    def windows(self) -> list[TokenWindow]:
        """Each text encoder's tokenizer and window, in order (what `prompt_cuts` measures).
        A family lists its embedders' `window()` here (`ClipEmbedder`, `T5Embedder`); the
        default, [], says that prompts are never cut."""
        return []

    def prompt_cuts(self, texts: Sequence[str]) -> list[tuple[PromptCut, ...]]:
        """For each text, the encoders that take only its first tokens (`count_cuts` over
        `windows()`); an empty tuple: the text is taken whole."""
        return count_cuts(self.windows(), texts)

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

    def combine(self, pred_u: torch.Tensor, pred_c: torch.Tensor,
                scale: float) -> torch.Tensor:
        """Classifier-free guidance of the unconditional and conditional predictions (B, C, h, w):
        pred_u + g (pred_c - pred_u). A family whose pipeline reshapes the guided prediction
        (Qwen-Image rescales its norm) overrides this; g keeps the same meaning."""
        return cfg_combine(pred_u, pred_c, scale)


def cfg_combine(pred_u: torch.Tensor, pred_c: torch.Tensor, scale: float) -> torch.Tensor:
    """pred_u + g (pred_c - pred_u): classifier-free guidance (Ho & Salimans, 2022)."""
    return pred_u + scale * (pred_c - pred_u)
