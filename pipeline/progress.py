"""The run's progress bar: images as they finish, images/s, an ETA, shards done and failed.

How many images a job holds is not known before its shards are read (listing them would mean
reading every tar), so the bar's total is an estimate: the images of the shards committed so
far, plus the pending shards times the images per committed shard. Until the first shard is
committed the bar shows the count and the rate without a total.
"""

from __future__ import annotations

from tqdm import tqdm


class RunProgress:
    """A tqdm bar in images for a run over `shards` pending shards."""

    def __init__(self, shards: int, name: str, enabled: bool) -> None:
        self.shards = shards
        self.done_shards = self.failed_shards = 0
        self.images_in_done = self.finished = 0
        self.bar = tqdm(total=None, unit="img", desc=name, disable=not enabled,
                        dynamic_ncols=True, smoothing=0.1)

    def images(self, finished: int) -> None:
        """All images finished so far (written to their shard's tar), from the actors; a
        failed attempt's images are dropped there, but the bar never runs backwards."""
        if finished > self.finished:
            self.bar.update(finished - self.finished)
            self.finished = finished
        self._refresh()

    def shard_done(self, images: int) -> None:
        self.done_shards += 1
        self.images_in_done += images
        self._refresh()

    def shard_failed(self) -> None:
        self.failed_shards += 1
        self._refresh()

    def estimated_total(self) -> int | None:
        """Images the run will have finished, from the shards committed so far."""
        if not self.done_shards:
            return None
        left = self.shards - self.done_shards - self.failed_shards
        per_shard = self.images_in_done / self.done_shards
        return max(self.finished, round(self.images_in_done + left * per_shard))

    def _refresh(self) -> None:
        self.bar.total = self.estimated_total()
        self.bar.set_postfix(shards=f"{self.done_shards}/{self.shards}",
                             failed=self.failed_shards, refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()
