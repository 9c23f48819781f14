"""Stroke-painting simulation and compositing helpers for building SDEdit guides.

Strokes follow the SDEdit paper's evaluation (arXiv 2108.01073, section 5.1): a median filter
(kernel 23 at 256 px), then an adaptive 6-colour palette. Compositing pastes a region of one
image onto another and returns its mask (255 = regenerate, 0 = keep). Images are PIL RGB or uint8
(H, W, 3) arrays; every function returns the type it was given."""

from __future__ import annotations

from typing import TypeVar

import numpy as np
from PIL import Image, ImageFilter

__all__ = [
    "PAPER_KERNEL",
    "PAPER_RESOLUTION",
    "Box",
    "composite",
    "mask_from_box",
    "simulate_strokes",
    "stroke_kernel_size",
]

PAPER_KERNEL = 23
"""Median-filter kernel of the paper's stroke simulation at `PAPER_RESOLUTION` pixels."""
PAPER_RESOLUTION = 256

Box = tuple[int, int, int, int]
"""A pixel box (left, upper, right, lower), right / lower exclusive, as in PIL."""

ImageLike = TypeVar("ImageLike", Image.Image, np.ndarray)


def stroke_kernel_size(height: int, width: int) -> int:
    """The median-filter kernel for an image of this size: 23 at 256 px scaled linearly by the
    shorter side, rounded half up, made odd and at least 3 (512 -> 47, 64 -> 7)."""
    if height < 1 or width < 1:
        raise ValueError(f"height and width must be >= 1, got height={height}, width={width}")
    kernel = int(PAPER_KERNEL * min(height, width) / PAPER_RESOLUTION + 0.5)
    if kernel % 2 == 0:
        kernel += 1
    return max(kernel, 3)


def _to_pil_rgb(image: Image.Image | np.ndarray, name: str) -> Image.Image:
    """`image` validated, as a PIL RGB image."""
    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else image.convert("RGB")
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(
                f"{name} must be a uint8 array of shape (H, W, 3), got dtype={image.dtype}, "
                f"shape={image.shape}"
            )
        return Image.fromarray(image)
    raise TypeError(f"{name} must be a PIL.Image.Image or numpy.ndarray, got {type(image)!r}")


def _like(result: Image.Image, reference: Image.Image | np.ndarray) -> Image.Image | np.ndarray:
    """`result` as the type of `reference` (PIL image or uint8 array)."""
    return np.asarray(result).copy() if isinstance(reference, np.ndarray) else result


def simulate_strokes(
    image: ImageLike, *, kernel: int | None = None, colors: int = 6
) -> ImageLike:
    """A stroke painting of a real image, as in the paper, of `image`'s size and type: a median
    filter of size `kernel` (None: `stroke_kernel_size`), then an adaptive palette of `colors`
    (1..256)."""
    pil = _to_pil_rgb(image, "image")
    if kernel is None:
        kernel = stroke_kernel_size(pil.height, pil.width)
    elif isinstance(kernel, bool) or not isinstance(kernel, int) or kernel < 1 or kernel % 2 == 0:
        raise ValueError(f"kernel must be an odd integer >= 1 or None, got {kernel!r}")
    if isinstance(colors, bool) or not isinstance(colors, int) or not 1 <= colors <= 256:
        raise ValueError(f"colors must be an integer in [1, 256], got {colors!r}")
    smoothed = pil.filter(ImageFilter.MedianFilter(kernel)) if kernel > 1 else pil
    strokes = smoothed.quantize(colors=colors, method=Image.Quantize.MEDIANCUT).convert("RGB")
    return _like(strokes, image)  # type: ignore[return-value]


def mask_from_box(size: tuple[int, int], box: Box) -> np.ndarray:
    """uint8 (height, width) in {0, 255}, 255 inside `box`; `size` is PIL's (width, height)."""
    width, height = size
    if width < 1 or height < 1:
        raise ValueError(f"size must be (width, height) with both >= 1, got {size!r}")
    left, upper, right, lower = box
    if right <= left or lower <= upper:
        raise ValueError(f"box must be (left, upper, right, lower) with right > left and "
                         f"lower > upper, got {box!r}")
    if right <= 0 or lower <= 0 or left >= width or upper >= height:
        raise ValueError(f"box {box!r} lies outside an image of size (width, height)={size!r}")
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[max(upper, 0):min(lower, height), max(left, 0):min(right, width)] = 255
    return mask


def composite(
    base: ImageLike,
    patch: Image.Image | np.ndarray,
    region: Box | np.ndarray | Image.Image,
    *,
    at: tuple[int, int] | None = None,
) -> tuple[ImageLike, ImageLike]:
    """Paste a region of `patch` onto `base`: (the composite guide, its mask, 255 where pasted).

    `region` is a box in `patch` pixels, placed with its corner at `at` (default: its own corner)
    and cropped to `base`; or a mask of `base`'s size (nonzero = paste), `patch` then of `base`'s
    size too. The guide has `base`'s type; the mask is a PIL "L" image for a PIL `base`, else
    uint8 (H, W)."""
    base_pil = _to_pil_rgb(base, "base")
    patch_pil = _to_pil_rgb(patch, "patch")
    if isinstance(region, tuple):
        left, upper, right, lower = region
        if not (0 <= left < right <= patch_pil.width and 0 <= upper < lower <= patch_pil.height):
            raise ValueError(f"region box {region!r} must lie inside patch of size "
                             f"(width, height)={patch_pil.size}")
        x, y = (left, upper) if at is None else at
        mask = mask_from_box(base_pil.size, (x, y, x + right - left, y + lower - upper))
        guide = base_pil.copy()
        guide.paste(patch_pil.crop(region), (x, y))
    else:
        if at is not None:
            raise ValueError("at is only allowed with a box region, not with a mask")
        mask_array = np.asarray(region.convert("L") if isinstance(region, Image.Image) else region)
        if mask_array.shape != (base_pil.height, base_pil.width):
            raise ValueError(f"region mask must have shape (H, W)="
                             f"{(base_pil.height, base_pil.width)}, got {mask_array.shape}")
        if patch_pil.size != base_pil.size:
            raise ValueError(f"with a mask region, patch size {patch_pil.size} must equal base "
                             f"size {base_pil.size}")
        mask = np.where(mask_array != 0, 255, 0).astype(np.uint8)
        guide = Image.composite(patch_pil, base_pil, Image.fromarray(mask))
    if isinstance(base, np.ndarray):
        return np.asarray(guide).copy(), mask  # type: ignore[return-value]
    return guide, Image.fromarray(mask)  # type: ignore[return-value]
