"""Warnings that reach the user, counted by kind in the actor and summed in `run`'s summary and
`status`: row warnings (a prompt cut, a setting the model does not use) and Python warnings the
actor's process raised. See docs/outputs.md, "warnings"."""

from __future__ import annotations

import threading
import warnings
from collections.abc import Sequence
from pathlib import PurePath
from typing import Any

from sdedit import PromptCut

__all__ = ["MAX_KINDS", "ActorWarnings", "cut_notes", "describe_cuts"]

MAX_KINDS = 20
"""Kinds of actor warnings counted apart; later kinds are counted as `OTHER`."""
OTHER = "other warnings"
_MESSAGE_CHARS = 120


def describe_cuts(cuts: Sequence[PromptCut]) -> str | None:
    """The manifest's record of a prompt's cuts, "text_encoder kept 77 of 95 tokens" (joined by
    "; "), or None when every encoder took it whole."""
    return "; ".join(f"{c.encoder} kept {c.kept} of {c.tokens} tokens" for c in cuts) or None


def cut_notes(what: str, cuts: Sequence[PromptCut]) -> list[str]:
    """The row warning of a prompt (`what`: "prompt" or "negative prompt") cut by some encoders,
    "prompt cut at 77 tokens by text_encoder, ..."; [] when it was taken whole."""
    if not cuts:
        return []
    by_length: dict[int, list[str]] = {}
    for cut in cuts:
        by_length.setdefault(cut.kept, []).append(cut.encoder)
    parts = [f"at {kept} tokens by {', '.join(names)}" if i == 0 else
             f"at {kept} by {', '.join(names)}"
             for i, (kept, names) in enumerate(by_length.items())]
    return [f"{what} cut " + ", ".join(parts)]


class ActorWarnings:
    """Counts the Python warnings this process shows, by kind; `take` hands over the counts since
    the last call. It wraps `warnings.showwarning` process-wide (they still show), so one object
    serves every worker of a process (`shared`). Thread-safe."""

    _shared: ActorWarnings | None = None
    _lock = threading.Lock()

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.lock = threading.Lock()
        self.installed_over: Any = None

    @classmethod
    def shared(cls) -> ActorWarnings:
        """The process's counter, installed on first use."""
        with cls._lock:
            if cls._shared is None or warnings.showwarning != cls._shared._show:
                cls._shared = cls()  # first use, or someone replaced the hook since
                cls._shared.install()
            return cls._shared

    def install(self) -> None:
        self.installed_over = warnings.showwarning
        warnings.showwarning = self._show

    def _show(self, message: Warning | str, category: type[Warning], filename: str,
              lineno: int, file: Any = None, line: str | None = None) -> None:
        self.count(kind_of(message, category, filename, lineno))
        self.installed_over(message, category, filename, lineno, file, line)

    def count(self, kind: str) -> None:
        with self.lock:
            if kind not in self.counts and len(self.counts) >= MAX_KINDS:
                kind = OTHER
            self.counts[kind] = self.counts.get(kind, 0) + 1

    def take(self) -> dict[str, int]:
        """The counts since the last `take`, by kind."""
        with self.lock:
            counts, self.counts = self.counts, {}
        return dict(sorted(counts.items()))


def kind_of(message: Warning | str, category: type[Warning], filename: str,
            lineno: int) -> str:
    """"Category: first line of the message (file.py:line)", the message at most 120 characters."""
    text = str(message).strip().splitlines()[0] if str(message).strip() else ""
    if len(text) > _MESSAGE_CHARS:
        text = text[:_MESSAGE_CHARS] + "..."
    return f"{category.__name__}: {text} ({PurePath(filename).name}:{lineno})"
