"""From decoded samples to batches for the device: one task per output, grouped by image size.

Batches are decided by the shard's content alone, never by timing: the same shard and batch size
give the same batches, hence the same outputs."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from pipeline.input.reader import Sample
from pipeline.input.rows import RowSettings
from sdedit import NoiseSource

__all__ = ["Prepared", "Task", "by_size", "output_key", "output_seed", "prepare"]


def output_seed(job_seed: int, key: str, index: int) -> int:
    """The 63-bit seed of one output, from (job seed, input key, output index)."""
    digest = hashlib.sha256(f"{job_seed}\x00{key}\x00{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & (2**63 - 1)


def output_key(key: str, index: int, samples_per_input: int) -> str:
    """The output's key: the input key, or `{key}_{index:02d}` with several outputs each."""
    return key if samples_per_input == 1 else f"{key}_{index:02d}"


@dataclass
class Task:
    """One output to make: a sample of a shard, its output index, seed, key and settings."""

    sample: Sample
    input_shard: str
    index: int
    seed: int
    output_key: str
    settings: RowSettings
    steps: int | None  # network evaluations per round at the row's t0
    position: int = 0  # the sample's place in its shard (manifest rows go in input order)
    notes: list[str] = field(default_factory=list)  # row warnings (`pipeline.worker.notices`)


@dataclass
class Prepared:
    """A batch ready for the device: guides float32 (B, 3, H, W) in [-1, 1], masks float32 (B, 1,
    H, W) in {0, 1} or None, and its noise already being drawn."""

    tasks: list[Task]
    images: torch.Tensor
    masks: torch.Tensor | None
    noise: NoiseSource | None

    @property
    def seeds(self) -> list[int]:
        return [task.seed for task in self.tasks]


def prepare(tasks: list[Task], noise: NoiseSource | None = None) -> Prepared:
    """The batch's tensors (in the host pool, while the device works on the batch before)."""
    guides = np.stack([task.sample.guide for task in tasks])  # (B, H, W, 3) uint8
    images = torch.from_numpy(guides).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    masks = None
    if tasks[0].sample.mask is not None:
        masks = torch.from_numpy(np.stack([task.sample.mask for task in tasks]))[:, None].float()
    return Prepared(tasks, images, masks, noise)


def by_size(tasks: Iterable[Task], size: int) -> Iterator[list[Task]]:
    """Batches of `size` tasks of one image size (and mask or not), in arrival order.

    Beyond 2 * size waiting tasks the largest bucket goes as a partial batch, so many distinct
    sizes cannot hold a shard in memory; the rest go at the end."""
    buckets: dict[tuple[object, ...], list[Task]] = {}
    waiting = 0
    for task in tasks:
        sample = task.sample
        shape = (*sample.guide.shape, sample.mask is not None)  # type: ignore[union-attr]
        bucket = buckets.setdefault(shape, [])
        bucket.append(task)
        waiting += 1
        if len(bucket) == size:
            waiting -= size
            yield buckets.pop(shape)
        elif waiting > 2 * size:
            largest = max(buckets, key=lambda s: len(buckets[s]))
            waiting -= len(buckets[largest])
            yield buckets.pop(largest)
    yield from buckets.values()
