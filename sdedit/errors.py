"""The engine's own error class for inputs it refuses.

`EditInputError` is what `sdedit.edit` (and the plan of its noise process) raises for an input
it cannot take: the message names the argument, its value and what is allowed. It is a
`ValueError`, so callers that catch `ValueError` keep working; a caller that turns refused
inputs into per-sample results (the pipeline's `edit` rows) catches exactly this class, so a
bug elsewhere (a `ValueError` from torch, diffusers or the pipeline) is never mistaken for a
bad input.
"""

from __future__ import annotations

__all__ = ["EditInputError"]


class EditInputError(ValueError):
    """An input of `sdedit.edit` the engine refuses (argument, value and what is allowed)."""
