"""The size of a job's guides before any work: the first guide's header, or the largest size
`input.max_pixels` allows (what the memory plan is made for, `pipeline.job.memory`)."""

from __future__ import annotations

import io
import logging
import math
import tarfile
import threading
from collections.abc import Mapping, Sequence
from typing import Any

from PIL import Image

from pipeline.images import IMAGE_EXTS
from pipeline.storage import url_fs

logger = logging.getLogger(__name__)

__all__ = ["first_guide_size", "guide_size"]


PEEK_TIMEOUT_S = 4.0
"""Seconds the first guide's header may take to arrive; past that the plan takes the largest size
input.max_pixels allows, so a store that never answers cannot hold up validate or run."""


def first_guide_size(urls: Sequence[str], storage_options: Mapping[str, Any] | None,
                     image: str | None, timeout: float = PEEK_TIMEOUT_S
                     ) -> tuple[int, int] | None:
    """(H, W) of the first guide of the first shard, from its image header (the tar streamed up
    to that member only), or None when it cannot be read within `timeout` seconds."""
    if not urls:
        return None
    found: list[tuple[int, int] | None] = []
    reader = threading.Thread(target=lambda: found.append(_first_size(urls[0], storage_options,
                                                                      image)),
                              name="guide-size", daemon=True)  # a hung read is left behind
    reader.start()
    reader.join(timeout)
    return found[0] if found else None


def _first_size(url: str, storage_options: Mapping[str, Any] | None,
                image: str | None) -> tuple[int, int] | None:
    extensions = (image,) if image else IMAGE_EXTS
    try:
        fs, path = url_fs(url, storage_options)
        with fs.open(path, "rb") as handle, tarfile.open(fileobj=handle, mode="r|*") as tar:
            for member in tar:
                name = member.name.rsplit("/", 1)[-1]
                if member.isfile() and name.partition(".")[2].lower() in extensions:
                    data = tar.extractfile(member).read()  # type: ignore[union-attr]
                    width, height = Image.open(io.BytesIO(data)).size
                    return height, width
    except Exception as exc:  # the shard's own problems are the input checks' to report
        logger.debug("guide size of %s not read: %s", url, exc)
    return None


def guide_size(urls: Sequence[str] | None, storage_options: Mapping[str, Any] | None,
               image: str | None, max_pixels: int, factor: int) -> tuple[tuple[int, int], str]:
    """((H, W), where it came from): the first guide's size, else the largest square
    `max_pixels` allows, its side a multiple of `factor`."""
    size = first_guide_size(urls or [], storage_options, image)
    if size is not None:
        return size, f"{size[1]}x{size[0]}, the first guide's ({(urls or [''])[0]})"
    side = max(factor, math.isqrt(max_pixels) // factor * factor)
    return (side, side), (f"{side}x{side}, the largest input.max_pixels ({max_pixels}) allows "
                          "(the first guide could not be read)")
