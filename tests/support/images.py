"""Image bytes that Pillow cannot write itself, for tests of bad and unusual inputs."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image

_COLOR_TYPES = {1: 0, 2: 4, 3: 2, 4: 6}
"""PNG colour type by channel count: grey, grey + alpha, RGB, RGBA."""


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png16(array: np.ndarray) -> bytes:
    """A 16-bit PNG of a uint16 (H, W) or (H, W, C) array (C: 2 grey + alpha, 3 RGB, 4 RGBA)."""
    pixels = array if array.ndim == 3 else array[:, :, None]
    height, width, channels = pixels.shape
    raw = b"".join(b"\x00" + pixels[y].astype(">u2").tobytes() for y in range(height))
    header = struct.pack(">IIBBBBB", width, height, 16, _COLOR_TYPES[channels], 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(raw))
            + _chunk(b"IEND", b""))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (8-bit grey) but whose pixel data is one short
    row: opening it works, decoding it fails. An image refused as too large from this proves
    the refusal came before any decoding."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header)
            + _chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + _chunk(b"IEND", b""))


def encode(image: Image.Image, fmt: str = "PNG", **options: object) -> bytes:
    """`image` saved as `fmt` with Pillow."""
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()
