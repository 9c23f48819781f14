"""Image facts of the pipeline in one place: member extensions, formats and encoding.

Arrays are uint8 (H, W, 3) RGB or (H, W) greyscale in [0, 255]; PIL images are accepted too.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from PIL import Image, ImageOps

__all__ = ["IMAGE_EXTS", "OUTPUT_FORMATS", "encode_image", "is_rgb8_png", "to_rgb"]

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")
"""Member extensions read as images; the guide is the first present when input.image is null."""

OUTPUT_FORMATS: dict[str, tuple[str, dict[str, Any]]] = {
    "png": ("PNG", {}),
    "jpg": ("JPEG", {"quality": 95}),
    "webp": ("WEBP", {"quality": 95}),
}
"""output.image_format -> (Pillow format, save options)."""


def encode_image(image: np.ndarray | Image.Image, fmt: str = "png",
                 png_compress_level: int | None = None) -> bytes:
    """Encode an image as `fmt` (png | jpg | webp); deterministic bytes (no timestamps).

    Args:
        image: uint8 (H, W, 3) or (H, W) array, or a PIL image.
        fmt: a key of `OUTPUT_FORMATS`.
        png_compress_level: zlib level 0-9 for PNG (None: Pillow's default, 6).
    """
    name, options = OUTPUT_FORMATS[fmt]
    if fmt == "png" and png_compress_level is not None:
        options = {**options, "compress_level": png_compress_level}
    pil = Image.fromarray(image) if isinstance(image, np.ndarray) else image
    buffer = io.BytesIO()
    pil.save(buffer, format=name, **options)
    return buffer.getvalue()


def to_rgb(image: Image.Image) -> Image.Image:
    """An opened image as the RGB image it shows: EXIF orientation applied, transparency
    composited over white (a transparent pixel's hidden colour never shows)."""
    image.load()
    image = ImageOps.exif_transpose(image)
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        rgb = Image.new("RGB", rgba.size, (255, 255, 255))
        rgb.paste(rgba, mask=rgba.getchannel("A"))
        return rgb
    return image.convert("RGB")


def is_rgb8_png(image: Image.Image) -> bool:
    """Whether an opened, not yet loaded image is an 8-bit RGB PNG shown as its pixels are
    stored (no alpha or transparency, no EXIF rotation): its file then holds exactly the RGB
    image `to_rgb` gives, and can be carried as it is instead of being encoded again."""
    return (image.format == "PNG" and image.mode == "RGB"
            and all(tile.args == "RGB" for tile in image.tile)
            and "transparency" not in image.info
            and image.getexif().get(0x0112, 1) == 1)
