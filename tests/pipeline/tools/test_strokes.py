"""Tests of stroke simulation and compositing helpers (small images, numpy + PIL only)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pipeline.tools.strokes import composite, mask_from_box, simulate_strokes, stroke_kernel_size


def _noisy_scene(size: int = 64, seed: int = 0) -> np.ndarray:
    """A few flat coloured regions plus strong per-pixel noise: uint8 (size, size, 3)."""
    rng = np.random.default_rng(seed)
    image = np.zeros((size, size, 3), dtype=np.float64)
    image[: size // 2] = (200, 60, 40)
    image[size // 2 :] = (40, 90, 190)
    image[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = (230, 220, 60)
    image += rng.normal(0, 40, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def _total_variation(image: np.ndarray) -> float:
    """Mean absolute difference between horizontal and vertical neighbours."""
    x = image.astype(np.float64)
    return float(np.abs(np.diff(x, axis=0)).mean() + np.abs(np.diff(x, axis=1)).mean())


def _n_colors(image: np.ndarray) -> int:
    return len(np.unique(image.reshape(-1, 3), axis=0))


@pytest.mark.parametrize(
    ("height", "width", "expected"),
    [(256, 256, 23), (512, 512, 47), (128, 128, 13), (64, 64, 7), (16, 16, 3), (256, 1024, 23),
     (1024, 300, 27)],
)
def test_kernel_scales_with_the_short_side_and_is_odd(height: int, width: int,
                                                      expected: int) -> None:
    kernel = stroke_kernel_size(height, width)
    assert kernel == expected
    assert kernel % 2 == 1 and kernel >= 3


def test_strokes_have_at_most_six_colours_are_smoother_and_keep_size() -> None:
    image = _noisy_scene(64)
    assert _n_colors(image) > 1000
    strokes = simulate_strokes(image)
    assert isinstance(strokes, np.ndarray)
    assert strokes.shape == image.shape and strokes.dtype == np.uint8
    assert _n_colors(strokes) <= 6
    assert _total_variation(strokes) < 0.1 * _total_variation(image)
    # the regions survive: the centre stays yellowish, the top left reddish
    assert strokes[32, 32, 0] > 150 and strokes[32, 32, 2] < 120
    assert strokes[4, 4, 0] > 150 and strokes[4, 4, 2] < 100


def test_strokes_of_a_pil_image_is_a_pil_image_of_the_same_size() -> None:
    image = Image.fromarray(_noisy_scene(48)[:, :40])
    strokes = simulate_strokes(image, colors=3)
    assert isinstance(strokes, Image.Image)
    assert strokes.mode == "RGB" and strokes.size == image.size
    assert len(strokes.getcolors()) <= 3


def test_explicit_kernel_is_used() -> None:
    # a 1-pixel dot vanishes under a 3x3 median but a kernel of 1 keeps it
    image = np.zeros((16, 16, 3), dtype=np.uint8)
    image[8, 8] = 255
    assert simulate_strokes(image, kernel=3, colors=2)[8, 8].tolist() == [0, 0, 0]
    assert simulate_strokes(image, kernel=1, colors=2)[8, 8].tolist() == [255, 255, 255]


@pytest.mark.parametrize("kwargs", [{"kernel": 4}, {"kernel": 0}, {"colors": 0},
                                    {"colors": 300}])
def test_bad_arguments_are_named(kwargs: dict) -> None:
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        simulate_strokes(_noisy_scene(16), **kwargs)


def test_bad_array_is_rejected() -> None:
    with pytest.raises(ValueError, match="uint8"):
        simulate_strokes(np.zeros((8, 8, 3), dtype=np.float32))


def test_mask_from_box_shape_and_values() -> None:
    mask = mask_from_box((20, 10), (5, 2, 15, 8))
    assert mask.shape == (10, 20) and mask.dtype == np.uint8
    assert set(np.unique(mask).tolist()) == {0, 255}
    assert (mask[2:8, 5:15] == 255).all()
    assert mask.sum() == 255 * 6 * 10
    clipped = mask_from_box((20, 10), (-5, -5, 3, 3))
    assert clipped.sum() == 255 * 9
    with pytest.raises(ValueError, match="box"):
        mask_from_box((20, 10), (5, 5, 5, 8))


def test_composite_with_a_box_pastes_the_region_and_returns_its_mask() -> None:
    base = np.full((16, 24, 3), 10, dtype=np.uint8)
    patch = np.full((16, 24, 3), 200, dtype=np.uint8)
    guide, mask = composite(base, patch, (4, 2, 12, 10), at=(10, 6))
    assert isinstance(guide, np.ndarray) and guide.shape == base.shape
    assert mask.shape == (16, 24) and mask.dtype == np.uint8
    assert (guide[mask == 255] == 200).all() and (guide[mask == 0] == 10).all()
    assert (mask[6:14, 10:18] == 255).all() and mask.sum() == 255 * 8 * 8
    assert (base == 10).all()  # the inputs are not modified


def test_composite_with_a_mask_and_pil_images() -> None:
    base = Image.new("RGB", (12, 8), (0, 0, 255))
    patch = Image.new("RGB", (12, 8), (255, 0, 0))
    region = np.zeros((8, 12), dtype=bool)
    region[:, :6] = True
    guide, mask = composite(base, patch, region)
    assert isinstance(guide, Image.Image) and isinstance(mask, Image.Image)
    assert guide.size == base.size and mask.mode == "L" and mask.size == base.size
    assert guide.getpixel((0, 0)) == (255, 0, 0) and guide.getpixel((11, 7)) == (0, 0, 255)
    assert np.array_equal(np.asarray(mask), np.where(region, 255, 0).astype(np.uint8))
    with pytest.raises(ValueError, match="shape"):
        composite(base, patch, np.zeros((4, 4), dtype=np.uint8))
