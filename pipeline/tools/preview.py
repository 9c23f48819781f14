"""Contact sheets of a finished (or running) job: guide | output | target, one row per output.

The sheet reads `OUT/shards/*.tar`: each output (any `output.image_format`), its guide and target
when present, and its json for the caption (key and t0). Each output of an input has its own row."""

from __future__ import annotations

import bisect
import io
import json
import logging
from dataclasses import dataclass
from typing import Any

from PIL import Image, ImageDraw, ImageFont, ImageOps
from webdataset.tariterators import group_by_keys, tar_file_iterator

from pipeline.errors import PipelineError, StorageError, count
from pipeline.images import OUTPUT_FORMATS, encode_image
from pipeline.output.layout import SHARDS
from pipeline.storage import FileSystem, put_bytes_atomic, url_fs

__all__ = ["CAPTION_HEIGHT", "DEFAULT_ROWS", "HEADER_HEIGHT", "PADDING", "Preview", "grid_size",
           "make_preview", "render_preview", "write_preview"]

log = logging.getLogger(__name__)

DEFAULT_ROWS = 32
"""Outputs a preview draws unless told otherwise: all of the quickstart's."""
PADDING = 4
"""Pixels between tiles and around the sheet."""
CAPTION_HEIGHT = 14
"""Pixels of the caption strip under each row (key and t0)."""
HEADER_HEIGHT = 14
"""Pixels of the column-title strip at the top (guide / output / target)."""
_BACKGROUND = (255, 255, 255)
_TEXT = (0, 0, 0)


@dataclass(frozen=True)
class _Sample:
    """The members of one output sample, still encoded; `key` is the output's key."""

    key: str
    output: bytes
    guide: bytes | None
    target: bytes | None
    meta: dict[str, Any]


def grid_size(rows: int, columns: int, tile: int) -> tuple[int, int]:
    """(width, height) in pixels of a contact sheet of `rows` x `columns` square tiles."""
    width = columns * tile + (columns + 1) * PADDING
    height = HEADER_HEIGHT + rows * (tile + CAPTION_HEIGHT) + (rows + 1) * PADDING
    return width, height


def _shard_paths(fs: FileSystem, root: str, out: str) -> list[str]:
    """Sorted paths of OUT/shards/*.tar; PipelineError naming `out` when there are none."""
    try:
        paths = sorted(fs.glob(f"{root}/{SHARDS}/*.tar"))
    except OSError as exc:
        raise StorageError(f"cannot list the shards of {out}: {exc}") from exc
    if not paths:
        raise PipelineError(f"no output shards in {out} (expected {out}/{SHARDS}/*.tar); "
                            "has the job written any shard yet?")
    return paths


def _read_samples(fs: FileSystem, path: str) -> list[_Sample]:
    """All samples with an output image of one output tar, in tar order."""
    samples = []
    incomplete = 0
    with fs.open(path, "rb") as stream:
        members = ({**member, "__url__": path} for member in tar_file_iterator(stream))
        for sample in group_by_keys(members):
            output = next((sample[ext] for ext in OUTPUT_FORMATS if ext in sample), None)
            if output is None:
                incomplete += 1
                continue
            meta = json.loads(sample["json"]) if "json" in sample else {}
            samples.append(_Sample(
                key=str(meta.get("output_key", sample["__key__"])), output=output,
                guide=sample.get("guide.png"), target=sample.get("target.png"), meta=meta))
    if incomplete:
        log.warning("%s: %s without an output image left out of the preview",
                    path, count(incomplete, "sample"))
    return samples


def _first_samples(fs: FileSystem, paths: list[str], n: int) -> list[_Sample]:
    """The first `n` samples (shards in name order, keys sorted within each), reading whole
    shards only until `n` are found."""
    chosen: list[_Sample] = []
    for path in paths:
        in_shard: list[_Sample] = []
        keys: list[str] = []
        for sample in _read_samples(fs, path):
            index = bisect.bisect(keys, sample.key)
            if index >= n - len(chosen):
                continue
            keys.insert(index, sample.key)
            in_shard.insert(index, sample)
            del keys[n - len(chosen):], in_shard[n - len(chosen):]
        chosen += in_shard
        if len(chosen) >= n:
            break
    return chosen


def _tile(data: bytes, tile: int) -> Image.Image:
    """Decode an image and fit it into a (tile, tile) RGB square, aspect kept, padded white."""
    with Image.open(io.BytesIO(data)) as image:
        return ImageOps.pad(image.convert("RGB"), (tile, tile), color=_BACKGROUND)


def _caption(sample: _Sample) -> str:
    t0 = sample.meta.get("t0")
    if isinstance(t0, (int, float)):
        return f"{sample.key}  t0={t0:g}"
    return sample.key if t0 is None else f"{sample.key}  t0={t0}"


def _draw_text(draw: ImageDraw.ImageDraw, xy: tuple[int, int], text: str, width: int,
               font: ImageFont.ImageFont | ImageFont.FreeTypeFont) -> None:
    """Draw `text` at `xy`, cut with '...' so it fits in `width` pixels."""
    if draw.textlength(text, font=font) > width:
        while text and draw.textlength(text + "...", font=font) > width:
            text = text[:-1]
        text += "..."
    draw.text(xy, text, fill=_TEXT, font=font)


@dataclass(frozen=True)
class Preview:
    """A contact sheet and what it shows."""

    sheet: Image.Image
    rows: int
    """Outputs drawn."""
    more: bool
    """Whether the shards hold outputs beyond those drawn."""


def make_preview(
    out: str,
    n: int = DEFAULT_ROWS,
    storage_options: dict[str, Any] | None = None,
    *,
    tile: int | None = None,
) -> Image.Image:
    """The sheet of `render_preview` (a PIL RGB image)."""
    return render_preview(out, n, storage_options, tile=tile).sheet


def render_preview(
    out: str,
    n: int = DEFAULT_ROWS,
    storage_options: dict[str, Any] | None = None,
    *,
    tile: int | None = None,
) -> Preview:
    """A contact sheet of the first `n` (>= 1) outputs in `out` (shards in name order, keys
    sorted).

    A column (guide, output, target) only where some shown output has it; a caption of key and t0
    under each row. `tile`: side of each square tile in pixels (None: the first output's larger
    side). PipelineError when `out` holds no shards or no complete sample, or `n` / `tile` < 1."""
    if n < 1:
        raise PipelineError(f"n must be >= 1, got {n}")
    if tile is not None and tile < 1:
        raise PipelineError(f"tile must be >= 1 pixel, got {tile}")
    out = out.rstrip("/")
    fs, root = url_fs(out, storage_options)
    samples = _first_samples(fs, _shard_paths(fs, root, out), n + 1)  # one more: are there more?
    more = len(samples) > n
    samples = samples[:n]
    if not samples:
        raise PipelineError(f"the shards of {out} hold no sample with an output image")
    if tile is None:
        with Image.open(io.BytesIO(samples[0].output)) as first:
            tile = max(first.size)

    columns = {"guide": lambda s: s.guide, "output": lambda s: s.output,
               "target": lambda s: s.target}
    titles = [t for t, member in columns.items()
              if t == "output" or any(member(s) for s in samples)]
    width, height = grid_size(len(samples), len(titles), tile)
    sheet = Image.new("RGB", (width, height), _BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    for column, title in enumerate(titles):
        x = PADDING + column * (tile + PADDING)
        _draw_text(draw, (x, PADDING // 2), title, tile, font)
    for row, sample in enumerate(samples):
        y = HEADER_HEIGHT + PADDING + row * (tile + CAPTION_HEIGHT + PADDING)
        for column, data in enumerate(columns[title](sample) for title in titles):
            if data is not None:
                sheet.paste(_tile(data, tile), (PADDING + column * (tile + PADDING), y))
        _draw_text(draw, (PADDING, y + tile + 1), _caption(sample), width - 2 * PADDING, font)
    log.info("preview of %d outputs from %s: %dx%d px", len(samples), out, width, height)
    return Preview(sheet, len(samples), more)


def write_preview(out: str, path: str, n: int = DEFAULT_ROWS,
                  storage_options: dict[str, Any] | None = None, *,
                  tile: int | None = None) -> Preview:
    """`render_preview`, its sheet written as PNG to `path` (local or fsspec URL, with the same
    options); StorageError when it cannot be written."""
    preview = render_preview(out, n, storage_options, tile=tile)
    try:
        put_bytes_atomic(path, encode_image(preview.sheet, "png"), storage_options)
    except OSError as exc:
        raise StorageError(f"cannot write {path}: {exc}") from exc
    return preview
