"""pipeline.images: decoding guides and masks with limits, every mode as what it shows."""

from __future__ import annotations

import io
import tracemalloc

import numpy as np
import pytest
from PIL import Image, ImageOps

from pipeline.images import (
    DEFAULT_MAX_PIXELS,
    ImageError,
    decode_guide,
    decode_guide_member,
    decode_mask,
    encode_image,
    to_rgb,
)
from tests.support.images import encode, png16, png_header_only


def test_eight_bit_rgb_png_is_decoded_exactly():
    rgb = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    assert np.array_equal(decode_guide(encode_image(rgb), "k.png"), rgb)


def test_the_png_level_changes_the_size_never_the_pixels():
    room = np.zeros((64, 64, 3), np.uint8)  # flat regions compress, as real images do
    room[:40] = (200, 180, 150)
    room[40:, 20:] = (60, 90, 120)
    encoded = {level: encode_image(room, "png", level) for level in (0, 1, 6, 9)}
    for data in encoded.values():
        assert np.array_equal(decode_guide(data, "k.png"), room)
    assert len(encoded[0]) > 4 * len(encoded[1]) and len(encoded[1]) >= len(encoded[9])
    assert encode_image(room, "png") == encoded[6]  # no level: Pillow's default


@pytest.mark.parametrize("value, expected", [(0, 0), (257, 1), (32768, 128), (65535, 255)])
def test_sixteen_bit_grey_png_is_scaled_not_clipped(value, expected):
    """The issue's case: a 16-bit PNG at half scale was a pure white guide."""
    data = png16(np.full((4, 6), value, np.uint16))
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    guide = decode_guide(data, "k.png")
    assert guide.shape == (4, 6, 3) and guide.dtype == np.uint8
    assert (guide == expected).all()


@pytest.mark.parametrize("mode", ["I;16", "I;16B"])
def test_sixteen_bit_tiff_both_byte_orders(mode):
    ramp = (np.arange(16, dtype=np.uint16) * 4369).reshape(4, 4)  # 0 .. 65535
    data = encode(Image.fromarray(ramp.astype(">u2" if mode == "I;16B" else "<u2")), "TIFF")
    guide = decode_guide(data, "k.tif")
    expected = np.round(ramp / 257).astype(np.uint8)
    assert np.array_equal(guide[:, :, 0], expected) and np.array_equal(guide[:, :, 2], expected)


def test_mode_i_with_sixteen_bit_values_is_scaled_and_other_values_refused():
    ramp = (np.arange(16, dtype=np.uint16) * 4369).reshape(4, 4)
    pgm = encode(Image.fromarray(ramp), "PPM")  # a 16-bit PGM opens as mode I
    assert np.array_equal(decode_guide(pgm, "k.pgm")[:, :, 1], np.round(ramp / 257))
    wide = encode(Image.fromarray(np.array([[-5, 70000]], np.int32)), "TIFF")
    with pytest.raises(ImageError) as info:
        decode_guide(wide, "k.tif")
    assert info.value.kind == "decode"
    assert "mode I with values in -5..70000 cannot be converted faithfully" in str(info.value)


def test_sixteen_bit_rgb_and_rgba_keep_the_high_byte():
    rgb = np.zeros((2, 2, 3), np.uint16)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 32768, 65535, 1999
    assert decode_guide(png16(rgb), "k.png")[0, 0].tolist() == [128, 255, 7]
    rgba = np.zeros((2, 2, 4), np.uint16)
    rgba[..., 0], rgba[0, 0, 3] = 65535, 65535  # one opaque red pixel, the rest transparent
    guide = decode_guide(png16(rgba), "k.png")
    assert guide[0, 0].tolist() == [255, 0, 0] and guide[1, 1].tolist() == [255, 255, 255]


def test_alpha_is_composited_over_white():
    """The issue's case: a fully transparent pixel showed its hidden colour."""
    rgba = np.zeros((1, 3, 4), np.uint8)
    rgba[0, :, 0] = 200  # hidden red everywhere
    rgba[0, :, 3] = (0, 128, 255)  # transparent, half, opaque
    guide = decode_guide(encode_image(rgba), "k.png")
    assert guide[0, 0].tolist() == [255, 255, 255]
    assert guide[0, 1].tolist() == [227, 127, 127]  # 200 * a + 255 * (1 - a), a = 128/255
    assert guide[0, 2].tolist() == [200, 0, 0]
    grey_alpha = Image.fromarray(np.array([[[10, 0], [10, 255]]], np.uint8), mode="LA")
    assert decode_guide(encode(grey_alpha), "k.png")[0].tolist() == [[255] * 3, [10] * 3]
    palette = Image.new("P", (2, 1))
    palette.putpalette([0, 0, 255, 0, 255, 0])
    palette.putdata([0, 1])
    data = encode(palette, transparency=0)  # palette entry 0 (blue) is transparent
    assert decode_guide(data, "k.png").tolist() == [[[255, 255, 255], [0, 255, 0]]]


def test_other_modes_convert_and_unfaithful_ones_are_refused():
    bits = Image.fromarray(np.array([[0, 255]], np.uint8)).convert("1")
    assert decode_guide(encode(bits), "k.png")[0].tolist() == [[0] * 3, [255] * 3]
    cmyk = encode(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG", quality=100)
    red = decode_guide(cmyk, "k.jpg")[4, 4]
    assert red[0] > 240 and red[1] < 15 and red[2] < 15
    grey = decode_guide(encode(Image.new("L", (2, 2), 77)), "k.png")
    assert grey.tolist() == [[[77] * 3] * 2] * 2
    ycbcr = np.asarray(to_rgb(Image.new("YCbCr", (1, 1), (76, 85, 255))))[0, 0]
    assert ycbcr[0] > 250 and ycbcr[1] < 5 and ycbcr[2] < 5  # red
    floats = encode(Image.fromarray(np.full((2, 2), 0.5, np.float32)), "TIFF")
    with pytest.raises(ImageError) as info:
        decode_guide(floats, "k.tif")
    assert info.value.kind == "decode" and "image mode F cannot be converted" in str(info.value)
    assert "allowed: 1, L, LA, P, PA, RGB" in str(info.value)


def test_exif_orientation_is_applied():
    pixels = np.zeros((2, 4, 3), np.uint8)
    pixels[0, 0] = (255, 0, 0)  # top-left red on a 4 wide x 2 high image
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    guide = decode_guide(encode(image, exif=exif), "k.png")
    expected = np.asarray(ImageOps.exif_transpose(Image.open(
        io.BytesIO(encode(image, exif=exif)))))
    assert guide.shape == (4, 2, 3) and np.array_equal(guide, expected)
    assert guide[0, 1].tolist() == [255, 0, 0]  # now top-right


def test_a_huge_image_is_refused_from_its_header_before_decoding():
    """The issue's case: a 12000x12000 PNG of 168 KB got the actor killed for memory."""
    data = png_header_only(12000, 12000)
    tracemalloc.start()
    try:
        with pytest.raises(ImageError) as info:
            decode_guide(data, "big.png")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert info.value.kind == "size"
    assert str(info.value) == ("image big.png is 12000x12000 (144,000,000 pixels); allowed: at "
                               "most 16,777,216 pixels (input.max_pixels)")
    assert peak < 1_000_000  # nothing was decoded (144 MB for the pixels alone)
    assert DEFAULT_MAX_PIXELS == 4096 * 4096
    with pytest.raises(ImageError, match="allowed: at most 100 pixels"):
        decode_guide(encode_image(np.zeros((10, 11, 3), np.uint8)), "k.png", max_pixels=100)
    assert decode_guide(encode_image(np.zeros((10, 10, 3), np.uint8)), "k.png",
                        max_pixels=100).shape == (10, 10, 3)


def test_pillow_decompression_bomb_is_a_size_error():
    with pytest.raises(ImageError) as info:
        decode_guide(png_header_only(20000, 20000), "bomb.png", max_pixels=10**9)
    assert info.value.kind == "size"
    assert "bomb.png" in str(info.value) and "decompression-bomb limit" in str(info.value)


def test_bytes_that_are_no_image_are_a_decode_error():
    with pytest.raises(ImageError) as info:
        decode_guide(b"this is not a png", "k.png")
    assert info.value.kind == "decode"
    assert str(info.value) == ("cannot decode k.png: not an image in a format Pillow reads "
                               "(PNG, JPEG, WebP, ...)")


def _mask(values: np.ndarray) -> bytes:
    return encode_image(values.astype(np.uint8))


def test_black_and_white_masks_and_their_tolerance():
    mask = np.zeros((10, 10), np.uint8)
    mask[:, 5:] = 255
    assert decode_mask(_mask(mask), "k.mask.png").tolist() == (mask // 255).tolist()
    soft = mask.copy()
    soft[:, :5], soft[:, 5:] = 32, 223  # the tolerance limits are black and white
    assert decode_mask(_mask(soft), "k.mask.png").tolist() == (mask // 255).tolist()
    ringing = mask.copy()
    ringing[0, 4], ringing[0, 5] = 100, 140  # 2 of 100 pixels: over 1%
    with pytest.raises(ImageError) as info:
        decode_mask(_mask(ringing), "k.mask.png")
    assert info.value.kind == "mask"
    assert "mask k.mask.png: 2 of 100 pixels (2.0%)" in str(info.value)
    big = np.zeros((20, 20), np.uint8)
    big[:, 10:] = 255
    big[0, 9], big[1, 10] = 100, 140  # 2 of 400 pixels: accepted, to the nearer side
    decoded = decode_mask(_mask(big), "k.mask.png")
    assert decoded[0, 9] == 0 and decoded[1, 10] == 1 and decoded.sum() == 200


def test_a_grey_mask_is_an_error_naming_the_values_never_thresholded():
    """The issue's case: a grey mask (100) was cut at 128 and nothing was edited."""
    with pytest.raises(ImageError) as info:
        decode_mask(_mask(np.full((8, 8), 100)), "k.mask.png")
    assert info.value.kind == "mask"
    assert str(info.value) == (
        "mask k.mask.png: 64 of 64 pixels (100.0%) are neither black (<= 32) nor white "
        "(>= 223): values 100 x64; allowed: black and white, with at most 1% of pixels in "
        "between (edge ringing of lossy encodings)")
    ramp = np.repeat(np.arange(40, 200, 10, dtype=np.uint8)[None], 4, axis=0)
    with pytest.raises(ImageError, match=r"\(16 distinct values\)"):
        decode_mask(_mask(ramp), "k.mask.png")


def test_coloured_and_transparent_masks_are_errors():
    yellow = np.zeros((4, 4, 3), np.uint8)
    yellow[..., :2] = 255  # luminance 226 would pass as white
    with pytest.raises(ImageError, match=r"values \(255, 255, 0\) x16"):
        decode_mask(encode_image(yellow), "k.mask.png")
    clear = np.zeros((4, 4, 4), np.uint8)
    clear[..., 3] = 255
    clear[0, 0, 3] = 0
    with pytest.raises(ImageError) as info:
        decode_mask(encode_image(clear), "k.mask.png")
    assert info.value.kind == "mask"
    assert "1 of 16 pixels are transparent or translucent; allowed: an opaque" in str(info.value)


def test_sixteen_bit_masks_are_scaled_like_guides():
    mask = np.zeros((4, 4), np.uint16)
    mask[:, 2:] = 65535
    assert decode_mask(png16(mask), "k.mask.png").tolist() == [[0, 0, 1, 1]] * 4


def test_to_rgb_is_the_one_conversion_of_prepare_and_the_reader():
    from pipeline.tools import prepare

    assert prepare.to_rgb is to_rgb
    half = Image.open(io.BytesIO(png16(np.full((2, 2), 32768, np.uint16))))
    assert np.asarray(to_rgb(half)).tolist() == [[[128] * 3] * 2] * 2


def test_only_a_plain_rgb8_png_is_carried_unchanged():
    rgb = np.random.default_rng(1).integers(0, 256, (4, 4, 3), dtype=np.uint8)
    plain = encode_image(rgb)
    assert decode_guide_member(plain, "k.png")[1] == plain
    for other in (encode_image(np.dstack([rgb, np.full((4, 4), 9, np.uint8)])),
                  png16(np.full((4, 4), 32768, np.uint16)),
                  encode(Image.fromarray(rgb), "JPEG")):
        pixels, carried = decode_guide_member(other, "k.png")
        assert carried is None and pixels.shape == (4, 4, 3)


@pytest.mark.parametrize("fmt", ["PNG", "GIF", "WEBP", "TIFF"])
def test_multi_frame_guides_and_masks_are_refused_not_cut_to_their_first_frame(fmt):
    """An animated PNG / GIF / WebP or a multi-page TIFF guide was edited as its first frame."""
    frames = [Image.new("RGB", (8, 8), (v, v, v)) for v in (0, 255, 128)]
    buffer = io.BytesIO()
    frames[0].save(buffer, format=fmt, save_all=True, append_images=frames[1:])
    for decode in (decode_guide, decode_mask):
        with pytest.raises(ImageError, match=rf"image k\.x \({fmt}\) has more than one "
                                             "frame") as info:
            decode(buffer.getvalue(), "k.x")
        assert info.value.kind == "decode"
    single = io.BytesIO()
    frames[1].save(single, format=fmt, save_all=True)  # one frame: an image as any other
    assert (decode_guide(single.getvalue(), "k.x") == 255).all()
