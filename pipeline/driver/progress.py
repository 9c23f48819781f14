"""The run's progress: images as they finish, images/s, an ETA, shards done and failed.

The total is an estimate (counting images would mean reading every tar): the images of the shards
committed so far plus the pending shards times the images per committed shard. Before the first
batch is written the phase shows instead. On a terminal it is a tqdm bar; to a file or pipe,
plain lines (per phase, every `interval` seconds, at the end). See docs/jobs.md."""

from __future__ import annotations

import sys
import time
from typing import TextIO

from tqdm import tqdm

from pipeline.errors import count

_WITH_TOTAL = ("{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} "
               "[{elapsed}<{remaining}, {rate_noinv_fmt}{postfix}]")
_WITHOUT_TOTAL = "{desc}: {n_fmt} img [{elapsed}, {rate_noinv_fmt}{postfix}]"
"""tqdm formats that keep the rate in images/s below one image a second (tqdm shows s/img there)."""


class RunProgress:
    """Progress of a run over `shards` pending shards, labelled `name`, on `stream` (default
    stderr); `interval` is the seconds between lines when `stream` is not a terminal."""

    def __init__(self, shards: int, name: str, enabled: bool, stream: TextIO | None = None,
                 interval: float = 30.0) -> None:
        self.shards, self.name = shards, name
        self.done_shards = self.failed_shards = 0
        self.images_in_done = self.finished = 0
        self.actors = self.actors_ready = 0
        self.stream = stream if stream is not None else sys.stderr
        self.interval = interval
        self.started = self.last_line = self.last_draw = time.monotonic()
        terminal = enabled and _is_terminal(self.stream)
        self.lines = enabled and not terminal
        self.last_phase = "starting" if self.lines else ""
        """The phase last shown (a change is shown at once)."""
        self.bar = tqdm(total=None, unit="img", desc=name, disable=not terminal,
                        file=self.stream, dynamic_ncols=True, smoothing=0.1, mininterval=0.5,
                        bar_format=_WITHOUT_TOTAL)
        self._refresh(force=True)

    def actors_started(self, n: int) -> None:
        """`n` more actors were asked for (each loads the model before its first shard)."""
        self.actors += n
        self._refresh(force=True)

    def actor_ready(self, n: int = 1) -> None:
        """`n` actors have loaded the model and are editing."""
        self.actors_ready += n
        self._refresh(force=True)

    def images(self, finished: int) -> None:
        """All images finished so far, from the actors; the count never runs backwards."""
        if finished > self.finished:
            self.bar.update(finished - self.finished)
            self.finished = finished
        self._refresh()

    def shard_done(self, images: int) -> None:
        """A shard of `images` outputs was committed (they count as finished at once)."""
        self.done_shards += 1
        self.images_in_done += images
        if self.images_in_done > self.finished:
            self.bar.update(self.images_in_done - self.finished)
            self.finished = self.images_in_done
        self._refresh(force=True)

    def shard_failed(self) -> None:
        self.failed_shards += 1
        self._refresh(force=True)

    def estimated_total(self) -> int | None:
        """Images the run will have finished, from the shards committed so far."""
        if not self.done_shards:
            return None
        left = self.shards - self.done_shards - self.failed_shards
        per_shard = self.images_in_done / self.done_shards
        return max(self.finished, round(self.images_in_done + left * per_shard))

    def phase(self) -> str:
        """What the run is doing before its first image is written ("" after)."""
        if self.finished or self.done_shards or self.failed_shards:
            return ""
        if self.actors_ready:
            return "editing the first batches"
        if self.actors:
            return f"starting {count(self.actors, 'actor')} (loading the model)"
        return "starting"

    def describe(self) -> str:
        """One line: images (of the estimated total), rate, shards, ETA; or the phase."""
        elapsed = time.monotonic() - self.started
        total = self.estimated_total()
        images = f"{self.name}: images {self.finished}" + ("" if total is None else f"/{total}")
        rate = self.finished / elapsed if elapsed > 0 else 0.0
        parts = [images, f"{rate:.2f} images/s",
                 f"shards {self.done_shards}/{self.shards} done", f"{self.failed_shards} failed",
                 f"{tqdm.format_interval(elapsed)} elapsed"]
        if total is not None and rate > 0 and total > self.finished:
            parts.append(f"ETA {tqdm.format_interval((total - self.finished) / rate)}")
        if self.phase():
            parts.append(self.phase())
        return ", ".join(parts)

    def _line(self) -> None:
        self.stream.write(self.describe() + "\n")
        self.stream.flush()
        self.last_line, self.last_phase = time.monotonic(), self.phase()

    def _refresh(self, force: bool = False) -> None:
        """Redraw the bar (at most every 0.5 s unless `force`), or write a line when due."""
        now, phase = time.monotonic(), self.phase()
        changed = phase != self.last_phase
        if self.lines:
            if changed or now - self.last_line >= self.interval:
                self._line()
            return
        if self.bar.disable or not (force or changed or now - self.last_draw >= 0.5):
            return
        total = self.estimated_total()
        self.bar.total = total
        self.bar.bar_format = _WITHOUT_TOTAL if total is None else _WITH_TOTAL
        self.bar.set_postfix_str(phase or f"shards {self.done_shards}/{self.shards}, "
                                 f"{self.failed_shards} failed", refresh=False)
        self.bar.refresh()
        self.last_draw, self.last_phase = now, phase

    def close(self) -> None:
        if self.lines:
            self._line()
        self.bar.close()


def _is_terminal(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False
