"""Prompt embeddings across batches: a bounded cache, and text encoders that leave the device.

Each distinct prompt pair is encoded once and alone, so its embedding never depends on the
batch it came in; offload "text" swaps the text encoders and the network on the device so the
two are never there at once. Neither changes outputs. docs/performance.md#the-memory-plan.
"""

from __future__ import annotations

import contextlib
import logging
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from sdedit.conditioning import Conditioning, PromptEncoder, join_rows

logger = logging.getLogger(__name__)

__all__ = ["MAX_CACHE_BYTES", "OFFLOADS", "PromptCache", "swapped"]

OFFLOADS = ("none", "text")
"""The values of `DiffusionModel.offload`."""
MAX_CACHE_BYTES = 256 * 2**20
"""Bytes of embeddings a model's prompt cache holds at most."""

Key = tuple[str, str | None, tuple[int, int], float | None]


@dataclass
class _Entry:
    cond: Conditioning
    uncond: Conditioning | None
    nbytes: int


def _bytes(cond: Conditioning | None) -> int:
    if cond is None:
        return 0
    tensors = [*cond.rows.values(), *cond.shared.values()]
    return sum(t.numel() * t.element_size() for t in tensors)


class PromptCache:
    """Conditioning rows by (prompt, negative prompt or None, size, guidance input), least
    recently used out past `max_bytes` (0: nothing is kept)."""

    def __init__(self, max_bytes: int = MAX_CACHE_BYTES) -> None:
        self.max_bytes = max_bytes
        self.entries: OrderedDict[Key, _Entry] = OrderedDict()
        self.nbytes = 0
        self.encoded = 0
        """Distinct pairs encoded so far."""

    def clear(self) -> None:
        """Forget every embedding (the text encoders changed, e.g. a LoRA was fused)."""
        self.entries.clear()
        self.nbytes = 0

    def encode(self, text: PromptEncoder, prompts: list[str], negatives: list[str] | None,
               size: tuple[int, int], guidance: float | None,
               around: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext
               ) -> tuple[Conditioning, Conditioning | None]:
        """`text.encode(prompts, negatives, size, guidance)`, encoding only the pairs the cache
        lacks, each alone, inside `around()` (the offload swap)."""
        keys: list[Key] = [(p, None if negatives is None else negatives[i], size, guidance)
                           for i, p in enumerate(prompts)]
        fresh: dict[Key, _Entry] = {}
        missing = [k for k in dict.fromkeys(keys) if k not in self.entries]
        if missing:
            with around():
                for key in missing:
                    c, u = text.encode([key[0]], None if negatives is None else [str(key[1])],
                                       size, guidance)
                    fresh[key] = _Entry(c, u, _bytes(c) + _bytes(u))
            self.encoded += len(missing)
        entries = []
        for key in keys:
            entry = fresh.get(key) or self.entries[key]
            if key in self.entries:
                self.entries.move_to_end(key)
            entries.append(entry)
        for key, entry in fresh.items():
            self._keep(key, entry)
        return join_rows([e.cond for e in entries]), (
            None if entries[0].uncond is None else
            join_rows([e.uncond for e in entries if e.uncond is not None]))

    def _keep(self, key: Key, entry: _Entry) -> None:
        if entry.nbytes > self.max_bytes:
            return
        self.entries[key] = entry
        self.nbytes += entry.nbytes
        while self.nbytes > self.max_bytes:
            _, old = self.entries.popitem(last=False)
            self.nbytes -= old.nbytes


@contextlib.contextmanager
def swapped(net: torch.nn.Module, encoders: Sequence[torch.nn.Module],
            device: torch.device) -> Iterator[None]:
    """The text encoders on `device` and the network in host memory while inside, then back;
    a no-op on the CPU."""
    if device.type == "cpu" or not encoders:
        yield
        return
    host = torch.device("cpu")
    net.to(host)
    for encoder in encoders:
        encoder.to(device)
    try:
        yield
    finally:
        for encoder in encoders:
            encoder.to(host)
        net.to(device)
        logger.debug("offload: text encoders used on %s, network back", device)
