"""Training data for `sdedit-batch train`: endless shuffled image batches from WebDataset shards,
each sample's first image member centre-cropped to a square and resized."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import webdataset.tariterators as wds_tar
from PIL import Image

from pipeline.errors import PipelineError, StorageError
from pipeline.images import IMAGE_EXTS
from pipeline.storage import url_fs

logger = logging.getLogger(__name__)


def _decode_image(sample: Mapping[str, Any], size: int) -> torch.Tensor | None:
    """The first image member of a WebDataset sample as a tensor (3, size, size) in [-1, 1]."""
    ext = next((e for e in IMAGE_EXTS if e in sample), None)
    if ext is None:
        return None
    try:
        img = Image.open(io.BytesIO(sample[ext])).convert("RGB")
    except (OSError, ValueError) as e:
        logger.warning("skipping unreadable image %s.%s: %s", sample.get("__key__"), ext, e)
        return None
    w, h = img.size
    side = min(w, h)
    if w != h:
        left, top = (w - side) // 2, (h - side) // 2
        img = img.crop((left, top, left + side, top + side))
    if side != size:
        img = img.resize((size, size), Image.Resampling.BICUBIC)
    arr = np.asarray(img, dtype=np.float32)  # (size, size, 3) in [0, 255]
    return torch.from_numpy(arr).permute(2, 0, 1) / 127.5 - 1.0


def _samples(urls: Sequence[str], rng: np.random.Generator,
             storage_options: Mapping[str, Any] | None) -> Iterator[dict[str, Any]]:
    """WebDataset samples of every shard, in a new random shard order each epoch, forever."""
    opts = dict(storage_options or {})

    def streams() -> Iterator[dict[str, Any]]:
        for i in rng.permutation(len(urls)):
            try:
                fs, path = url_fs(urls[i], opts)
                with fs.open(path, "rb") as f:
                    yield {"url": urls[i], "stream": f}
            except OSError as e:
                raise StorageError(f"cannot read training shard {urls[i]}: {e}") from e

    while True:
        n = 0
        for sample in wds_tar.group_by_keys(wds_tar.tar_file_expander(streams())):
            n += 1
            yield sample
        if n == 0:
            raise PipelineError(f"the training shards hold no samples: {urls[:3]}...")


def image_batches(urls: Sequence[str], size: int, batch_size: int, *, rng: np.random.Generator,
                  shuffle_buffer: int = 1000, skip_batches: int = 0,
                  storage_options: Mapping[str, Any] | None = None) -> Iterator[torch.Tensor]:
    """Endless shuffled batches (batch_size, 3, size, size), float32 in [-1, 1], from shards.

    Only emitted samples are decoded; the first `skip_batches` are drawn but not decoded, so a
    resumed run sees exactly the batches it would have."""
    buffer: list[Mapping[str, Any]] = []
    batch: list[torch.Tensor] = []
    to_skip = skip_batches * batch_size
    for sample in _samples(urls, rng, storage_options):
        if not any(e in sample for e in IMAGE_EXTS):
            continue
        if len(buffer) < shuffle_buffer:
            buffer.append(sample)
            if len(buffer) < min(shuffle_buffer, 100):
                continue
            sample = buffer.pop(int(rng.integers(len(buffer))))
        else:
            j = int(rng.integers(len(buffer)))
            buffer[j], sample = sample, buffer[j]
        if to_skip > 0:
            to_skip -= 1
            continue
        image = _decode_image(sample, size)
        if image is None:
            continue
        batch.append(image)
        if len(batch) == batch_size:
            yield torch.stack(batch)
            batch = []
