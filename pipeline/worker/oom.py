"""Device batches that run out of memory: split in halves and retried, recursively, so no sample
is lost to a batch too large for the device; a single sample that still does not fit is its own
"device" error row."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch

logger = logging.getLogger(__name__)

__all__ = ["EditFailure", "split_on_oom"]

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class EditFailure:
    """Why a part of a batch produced no outputs: kind "device" (out of memory alone) or "edit"
    (the engine refused the inputs), and the message for its error rows."""

    kind: str
    message: str


def split_on_oom(items: Sequence[T], run: Callable[[Sequence[T]], R]
                 ) -> Iterator[tuple[Sequence[T], R | EditFailure]]:
    """(part, run(part)) covering `items` in order: all at once or, on torch.OutOfMemoryError,
    each half the same way; a single item still out of memory gives an `EditFailure` of kind
    "device". The exception and the tensors it holds are dropped, and cached memory released,
    before the halves."""
    try:
        result = run(items)
    except torch.OutOfMemoryError as exc:
        lines = str(exc).strip().splitlines()
        message = lines[0] if lines else type(exc).__name__
    else:
        yield items, result
        return
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if len(items) == 1:
        yield items, EditFailure("device", f"out of device memory even alone (batch of 1): "
                                 f"{message}; allowed: an image that fits "
                                 "the device (smaller, or a device with more memory)")
        return
    half = (len(items) + 1) // 2
    logger.warning("out of device memory on a batch of %d; retrying as %d + %d", len(items),
                   half, len(items) - half)
    yield from split_on_oom(items[:half], run)
    yield from split_on_oom(items[half:], run)
