"""The engine's error class for inputs it refuses, and how a message quotes a value.

`EditInputError` is a `ValueError`, but its own class, so that a caller turning refused inputs
into per-sample results catches exactly it and never mistakes a bug elsewhere for bad input.
`quoted` keeps a long value (a prompt) out of messages, manifests and logs.
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
    """`repr(value)` for a message, of at most about `limit` characters: a longer string as its
    prefix's repr, "..." and its length; other values through `reprlib`."""
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
