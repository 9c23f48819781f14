"""Image facts in one place: member extensions, output formats, encoding and strict decoding.

Arrays are uint8 (H, W, 3) RGB or (H, W) greyscale in [0, 255]. Decoding is where untrusted bytes
become pixels: the size is checked from the header before decoding, every mode is converted as
what it shows or refused, masks must be black and white; each refusal is an `ImageError`. The
rules are in docs/inputs.md."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from PIL import Image, ImageOps

__all__ = ["DEFAULT_MAX_PIXELS", "DEFAULT_QUALITY", "IMAGE_EXTS", "MASK_BLACK_MAX",
           "MASK_MID_FRACTION", "MASK_WHITE_MIN", "OUTPUT_FORMATS", "ImageError", "decode_guide",
           "decode_guide_member", "decode_mask",
           "encode_image", "is_rgb8_png", "to_rgb"]

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")
"""Member extensions read as images; the guide is the first present when input.image is null."""

DEFAULT_QUALITY = 95
"""Pillow quality (0-100) of jpg and webp outputs unless output.jpeg_quality / webp_quality say."""
OUTPUT_FORMATS: dict[str, tuple[str, dict[str, Any]]] = {
    "png": ("PNG", {}),
    "jpg": ("JPEG", {"quality": DEFAULT_QUALITY}),
    "webp": ("WEBP", {"quality": DEFAULT_QUALITY}),
}
"""output.image_format -> (Pillow format, save options)."""

DEFAULT_MAX_PIXELS = 4096 * 4096
"""input.max_pixels default: larger images are error rows, read from the header, never decoded."""
MASK_BLACK_MAX = 32
"""A mask value <= this is black (keep)."""
MASK_WHITE_MIN = 223
"""A mask value >= this is white (regenerate)."""
MASK_MID_FRACTION = 0.01
"""Most of a mask's pixels that may lie between black and white (the ringing of lossy encodings);
each goes to the nearer of the two. More is an error."""

EIGHT_BIT_MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr")
"""Modes Pillow converts itself (8 bits per channel; 16-bit RGB(A) PNGs open with the high byte)."""
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
"""Greyscale modes of 16-bit values (mode I when within 0..65535), scaled round(v / 257)."""


class ImageError(ValueError):
    """A member that cannot become a correct guide or mask; `kind`: "decode", "size" or "mask"."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def encode_image(image: np.ndarray | Image.Image, fmt: str = "png",
                 png_compress_level: int | None = None, quality: int | None = None) -> bytes:
    """`image` (uint8 array or PIL image) encoded as `fmt`, in deterministic bytes.

    `png_compress_level` is zlib's 0-9 (None: Pillow's 6); `quality` is 0-100 for jpg and webp
    (None: `DEFAULT_QUALITY`), ignored by png."""
    name, options = OUTPUT_FORMATS[fmt]
    if fmt == "png" and png_compress_level is not None:
        options = {**options, "compress_level": png_compress_level}
    if fmt != "png" and quality is not None:
        options = {**options, "quality": quality}
    pil = Image.fromarray(image) if isinstance(image, np.ndarray) else image
    buffer = io.BytesIO()
    pil.save(buffer, format=name, **options)
    return buffer.getvalue()


def _sixteen_bit_to_l(image: Image.Image) -> Image.Image:
    """A 16-bit greyscale image as mode L (LA with transparency), scaled round(v / 257)."""
    values = np.asarray(image)
    if image.mode == "I" and values.size and (values.min() < 0 or values.max() > 65535):
        raise ValueError(f"mode I with values in {values.min()}..{values.max()} cannot be "
                         "converted faithfully; allowed: 16-bit values 0..65535")
    grey = Image.fromarray(((values.astype(np.uint32) * 2 + 257) // 514).astype(np.uint8))
    transparent = image.info.get("transparency")
    if isinstance(transparent, int):
        alpha = np.where(values == transparent, 0, 255).astype(np.uint8)
        return Image.merge("LA", (grey, Image.fromarray(alpha)))
    return grey


def _normalised(image: Image.Image) -> Image.Image:
    """An opened image, EXIF orientation applied, 8-bit, as RGB or (if transparent) RGBA."""
    image.load()
    image = ImageOps.exif_transpose(image)
    if image.mode in SIXTEEN_BIT_MODES:
        image = _sixteen_bit_to_l(image)
    elif image.mode not in EIGHT_BIT_MODES:
        raise ValueError(f"image mode {image.mode} cannot be converted to RGB faithfully; "
                         f"allowed: {', '.join(EIGHT_BIT_MODES + SIXTEEN_BIT_MODES)}")
    if image.mode in ("RGBA", "RGBa", "LA", "PA") or "transparency" in image.info:
        return image.convert("RGBA")
    return image.convert("RGB")


def to_rgb(image: Image.Image) -> Image.Image:
    """An opened image as the RGB image it shows: EXIF orientation applied, 16-bit scaled (never
    clipped), transparency over white. ValueError names a mode that cannot be converted
    faithfully."""
    return _over_white(_normalised(image))


def _over_white(image: Image.Image) -> Image.Image:
    """An RGB or RGBA image as RGB, RGBA composited over white."""
    if image.mode != "RGBA":
        return image
    rgb = Image.new("RGB", image.size, (255, 255, 255))
    rgb.paste(image, mask=image.getchannel("A"))
    return rgb


def _open(data: bytes, name: str, max_pixels: int) -> Image.Image:
    """Open `data` lazily and check its header size against `max_pixels` before decoding."""
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise ImageError("size", f"image {name}: {exc}; allowed: at most Pillow's "
                           "decompression-bomb limit (2 x PIL.Image.MAX_IMAGE_PIXELS)") from exc
    except Image.UnidentifiedImageError as exc:
        raise ImageError("decode", f"cannot decode {name}: not an image in a format Pillow "
                           "reads (PNG, JPEG, WebP, ...)") from exc
    except Exception as exc:
        raise ImageError("decode", f"cannot decode {name}: {type(exc).__name__}: "
                           f"{exc}") from exc
    width, height = image.size
    if width * height > max_pixels:
        image.close()
        raise ImageError("size", f"image {name} is {width}x{height} ({width * height:,} "
                           f"pixels); allowed: at most {max_pixels:,} pixels (input.max_pixels)")
    return image


def _decoded(data: bytes, name: str, max_pixels: int) -> tuple[Image.Image, bool]:
    """The member as RGB or RGBA, and whether its bytes are an 8-bit RGB PNG of that image."""
    with _open(data, name, max_pixels) as image:
        if getattr(image, "is_animated", False):  # APNG, GIF, WebP animations, TIFF pages
            raise ImageError("decode", f"image {name} ({image.format}) has more than one frame "
                                       "(an animation or a multi-page file); allowed: a single "
                                       "image (its first frame is never taken silently)")
        try:
            plain = is_rgb8_png(image)
            return _normalised(image), plain
        except Image.DecompressionBombError as exc:
            raise ImageError("size", f"image {name}: {exc}") from exc
        except Exception as exc:
            raise ImageError("decode", f"cannot decode {name}: {type(exc).__name__}: "
                               f"{exc}") from exc


def decode_guide(data: bytes, name: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """A guide member as uint8 (H, W, 3) RGB (`to_rgb`); ImageError kind "size" (over
    `max_pixels` width x height, checked before decoding) or "decode"."""
    return decode_guide_member(data, name, max_pixels)[0]


def decode_guide_member(data: bytes, name: str, max_pixels: int = DEFAULT_MAX_PIXELS
                        ) -> tuple[np.ndarray, bytes | None]:
    """`decode_guide`, and `data` itself when it is an 8-bit RGB PNG of exactly those pixels (it
    can be carried to the output unchanged), else None."""
    image, plain = _decoded(data, name, max_pixels)
    return np.asarray(_over_white(image), dtype=np.uint8), data if plain else None


def decode_mask(data: bytes, name: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """A mask member as uint8 (H, W) in {0, 1}, 1 = white = regenerate; read like a guide, but
    opaque.

    Black: every channel <= MASK_BLACK_MAX; white: every channel >= MASK_WHITE_MIN; others, up to
    MASK_MID_FRACTION, go to the nearer. ImageError kind "mask", "size" or "decode"."""
    image, _ = _decoded(data, name, max_pixels)
    if image.mode == "RGBA":
        alpha = np.asarray(image.getchannel("A"))
        if (alpha < 255).any():
            raise ImageError("mask", f"mask {name}: {int((alpha < 255).sum())} of "
                               f"{alpha.size} pixels are transparent or translucent; allowed: "
                               "an opaque black-and-white image (white = regenerate)")
        image = image.convert("RGB")
    rgb = np.asarray(image, dtype=np.uint8)
    low, high = rgb.min(axis=2), rgb.max(axis=2)
    mid = ~((high <= MASK_BLACK_MAX) | (low >= MASK_WHITE_MIN))
    count = int(mid.sum())
    if count > MASK_MID_FRACTION * mid.size:
        raise ImageError("mask", f"mask {name}: {count} of {mid.size} pixels "
                           f"({100 * count / mid.size:.1f}%) are neither black (<= "
                           f"{MASK_BLACK_MAX}) nor white (>= {MASK_WHITE_MIN}): "
                           f"{_value_summary(rgb[mid])}; allowed: black and white, with at "
                           f"most {MASK_MID_FRACTION:.0%} of pixels in between (edge ringing "
                           "of lossy encodings)")
    return (rgb.mean(axis=2) >= 128).astype(np.uint8)


def _value_summary(pixels: np.ndarray, most: int = 5) -> str:
    """The most frequent values of (N, 3) pixels, as "100 x2500, 90 x3", and how many there are."""
    values, counts = np.unique(pixels, axis=0, return_counts=True)
    order = np.argsort(-counts, kind="stable")[:most]
    parts = []
    for index in order:
        r, g, b = (int(v) for v in values[index])
        text = str(r) if r == g == b else f"({r}, {g}, {b})"
        parts.append(f"{text} x{int(counts[index])}")
    more = f" ({len(values)} distinct values)" if len(values) > most else ""
    return "values " + ", ".join(parts) + more


def is_rgb8_png(image: Image.Image) -> bool:
    """Whether an opened, unloaded image is an 8-bit RGB PNG shown as stored (no alpha, no EXIF
    rotation), so its file can be carried instead of encoded again."""
    return (image.format == "PNG" and image.mode == "RGB"
            and all(tile.args == "RGB" for tile in image.tile)
            and "transparency" not in image.info
            and image.getexif().get(0x0112, 1) == 1)
