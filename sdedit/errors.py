"""The engine's own error class for inputs it refuses, and how a message quotes a value.

`EditInputError` is what `sdedit.edit` (and the plan of its noise process) raises for an input
it cannot take: the message names the argument, its value and what is allowed. It is a
`ValueError`, so callers that catch `ValueError` keep working; a caller that turns refused
inputs into per-sample results (the pipeline's `edit` rows) catches exactly this class, so a
bug elsewhere (a `ValueError` from torch, diffusers or the pipeline) is never mistaken for a
bad input.

A message quotes a value with `quoted`: its repr, of a long value only a prefix and its length,
so that no message (nor a manifest row or log line holding it) repeats a whole prompt.
"""

from __future__ import annotations

import reprlib
from typing import Any

__all__ = ["QUOTE_CHARS", "EditInputError", "quoted"]

QUOTE_CHARS = 80
"""Characters of a value a message quotes at most (then "... (N characters)")."""


class EditInputError(ValueError):
    """An input of `sdedit.edit` the engine refuses (argument, value and what is allowed)."""


def quoted(value: Any, limit: int = QUOTE_CHARS) -> str:
    """`repr(value)` for a message, at most about `limit` characters of the value: a longer
    string as the repr of its first `limit` characters, "..." and its length
    ('a bedroom, ...'... (10,485,760 characters)); other values through `reprlib`, whose
    repr never builds the whole of a large container."""
    if isinstance(value, str):
        if len(value) <= limit:
            return repr(value)
        return f"{value[:limit]!r}... ({len(value):,} characters)"
    short = reprlib.Repr()
    short.maxstring = short.maxother = short.maxlong = limit
    try:
        text = short.repr(value)
    except ValueError:  # an int of more digits than Python converts to text
        return f"an {type(value).__name__} too long to show"
    return text if len(text) <= 2 * limit else text[:limit] + "..."
