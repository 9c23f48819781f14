"""`sdedit-batch demo-data`: shards of the built-in procedural domain "rooms" (`rooms.py`)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
import webdataset as wds

from pipeline.errors import PipelineError, StorageError
from pipeline.images import encode_image
from pipeline.storage import url_fs
from pipeline.tools.rooms import render_room
from pipeline.tools.strokes import simulate_strokes

__all__ = ["render_room", "write_demo_data"]

logger = logging.getLogger(__name__)


def write_demo_data(out: str, n: int, *, size: int = 64, shard_size: int = 256, seed: int = 0,
                    storage_options: Mapping[str, Any] | None = None,
                    strokes: bool = False) -> list[str]:
    """Write `n` random rooms as shards `{out}/rooms-000000.tar`, ...; returns their URLs.

    Image i is rendered from `numpy.random.default_rng([seed, i])`, so a seed gives
    byte-identical shards whatever `shard_size`. With `strokes`, `{key}.png` is the room's stroke
    painting and `{key}.target.png` the room."""
    if n < 1:
        raise PipelineError(f"n must be >= 1, got {n}")
    if shard_size < 1:
        raise PipelineError(f"shard_size must be >= 1, got {shard_size}")
    if size < 8:
        raise PipelineError(f"size must be >= 8, got {size}")
    fs, root = url_fs(out, storage_options)
    root = root.rstrip("/")
    urls: list[str] = []
    try:
        fs.makedirs(root, exist_ok=True)
        for shard, start in enumerate(range(0, n, shard_size)):
            path = f"{root}/rooms-{shard:06d}.tar"
            with fs.open(path, "wb") as f:
                writer = wds.TarWriter(f, encoder=False, mtime=0.0, user="", group="",
                                       mode=0o644)
                for i in range(start, min(start + shard_size, n)):
                    img = render_room(np.random.default_rng([seed, i]), size)
                    sample = {"__key__": f"room_{i:07d}", "png": encode_image(img)}
                    if strokes:
                        sample["png"] = encode_image(simulate_strokes(img))
                        sample["target.png"] = encode_image(img)
                    writer.write(sample)
                writer.close()
            url = f"{out.rstrip('/')}/rooms-{shard:06d}.tar"
            urls.append(url)
            logger.info("wrote %s (%d images)", url, min(start + shard_size, n) - start)
    except OSError as e:
        raise StorageError(f"cannot write demo data to {out}: {e}") from e
    return urls
