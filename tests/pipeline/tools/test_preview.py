"""Tests of `pipeline.preview`: contact sheets built from a fake output layout.

The fake layout is written here with webdataset.TarWriter (members `{key}.png`,
`{key}.guide.png`, optional `{key}.target.png` / `{key}.mask.png`, `{key}.json`), so these tests
do not depend on the pipeline's own writer.
"""

from __future__ import annotations

import io
import json
import uuid
from pathlib import Path

import fsspec
import numpy as np
import pytest
import webdataset as wds
from click.testing import CliRunner
from PIL import Image

from pipeline.cli import main
from pipeline.errors import PipelineError
from pipeline.tools.preview import CAPTION_HEIGHT, HEADER_HEIGHT, PADDING, grid_size, make_preview

TILE = 16


def _png(color: tuple[int, int, int], size: int = TILE, mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (size, size), color if mode == "RGB" else color[0]).save(buffer, "PNG")
    return buffer.getvalue()


def _write_job(out: str, shards: dict[str, list[str]], *, targets: bool = False,
               masks: bool = False) -> None:
    """A fake job output: OUT/shards/{stem}.tar with samples keyed as given (any order).

    Output tiles are green, guides red, targets blue.
    """
    for stem, keys in shards.items():
        with fsspec.open(f"{out}/shards/{stem}.tar", "wb") as f:
            writer = wds.TarWriter(f)
            for i, key in enumerate(keys):
                sample = {"__key__": key, "png": _png((0, 255, 0)),
                          "guide.png": _png((255, 0, 0)),
                          "json": json.dumps({"key": key, "t0": 0.5, "index": i}).encode()}
                if targets:
                    sample["target.png"] = _png((0, 0, 255))
                if masks:
                    sample["mask.png"] = _png((255, 255, 255), mode="L")
                writer.write(sample)
            writer.close()


def _rows_top(row: int) -> int:
    return HEADER_HEIGHT + PADDING + row * (TILE + CAPTION_HEIGHT + PADDING)


def test_grid_size_formula() -> None:
    assert grid_size(rows=3, columns=2, tile=16) == (2 * 16 + 3 * PADDING,
                                                     HEADER_HEIGHT + 3 * (16 + CAPTION_HEIGHT)
                                                     + 4 * PADDING)


def test_preview_has_one_row_per_sample_and_guide_output_columns(tmp_path: Path) -> None:
    out = str(tmp_path / "job")
    _write_job(out, {"in-000001": ["k5", "k4", "k3"], "in-000000": ["k2", "k1", "k0"]},
               masks=True)
    sheet = make_preview(out, n=4)
    width = 2 * TILE + 3 * PADDING
    height = HEADER_HEIGHT + 4 * (TILE + CAPTION_HEIGHT) + 5 * PADDING
    assert sheet.size == (width, height) == grid_size(4, 2, TILE)
    pixels = np.asarray(sheet)
    for row in range(4):
        y = _rows_top(row) + TILE // 2
        assert tuple(pixels[y, PADDING + TILE // 2]) == (255, 0, 0)  # guide
        assert tuple(pixels[y, 2 * PADDING + TILE + TILE // 2]) == (0, 255, 0)  # output
        caption = pixels[_rows_top(row) + TILE + 1:_rows_top(row) + TILE + CAPTION_HEIGHT]
        assert (caption < 128).any()  # some caption text was drawn


def test_preview_adds_a_target_column_and_can_be_written(tmp_path: Path) -> None:
    out = str(tmp_path / "job")
    _write_job(out, {"in-000000": ["b", "a"]}, targets=True)
    sheet = make_preview(out, n=16)  # fewer samples than n: one row each
    assert sheet.size == grid_size(2, 3, TILE)
    assert sheet.width == 3 * TILE + 4 * PADDING
    y = _rows_top(1) + TILE // 2
    assert tuple(np.asarray(sheet)[y, 3 * PADDING + 2 * TILE + TILE // 2]) == (0, 0, 255)

    result = CliRunner().invoke(main, ["preview", out, "--n", "16", "-o",
                                       str(tmp_path / "grid.png")])
    assert result.exit_code == 0, result.output
    with Image.open(tmp_path / "grid.png") as written:
        assert written.format == "PNG" and written.size == grid_size(2, 3, TILE)


def test_preview_first_n_samples_in_sorted_order(tmp_path: Path) -> None:
    out = f"memory://preview-test-{uuid.uuid4().hex}/job"
    _write_job(out, {"in-000001": ["k5", "k4"], "in-000000": ["k2", "k9", "k0"]})
    from pipeline.tools import preview

    fs, root = fsspec.core.url_to_fs(out)
    chosen = preview._first_samples(fs, preview._shard_paths(fs, root, out), 4)
    assert [s.key for s in chosen] == ["k0", "k2", "k9", "k4"]
    assert make_preview(out, n=4, tile=8).size == grid_size(4, 2, 8)


def test_no_shards_is_an_error_naming_out(tmp_path: Path) -> None:
    out = str(tmp_path / "empty-job")
    with pytest.raises(PipelineError, match="empty-job"):
        make_preview(out)
    result = CliRunner().invoke(main, ["preview", out, "-o", str(tmp_path / "g.png")])
    assert result.exit_code == PipelineError.exit_code
    assert "empty-job" in result.output and not (tmp_path / "g.png").exists()


@pytest.mark.parametrize("fmt", ["jpg", "webp"])
def test_preview_reads_any_output_format_and_jobs_without_guides(tmp_path: Path, fmt: str) -> None:
    """Jobs written with image_format jpg|webp or include_guide: false have previews too."""
    out = str(tmp_path / "job")
    with fsspec.open(f"{out}/shards/in-000000.tar", "wb") as f:
        writer = wds.TarWriter(f)
        for key in ("b", "a"):
            buffer = io.BytesIO()
            Image.new("RGB", (TILE, TILE), (0, 255, 0)).save(
                buffer, {"jpg": "JPEG", "webp": "WEBP"}[fmt], quality=100)
            writer.write({"__key__": key, fmt: buffer.getvalue(),
                          "json": json.dumps({"key": key, "t0": 0.5}).encode()})
        writer.close()
    sheet = make_preview(out, n=4)
    assert sheet.size == grid_size(2, 1, TILE)  # no guide column: output only
    pixel = np.asarray(sheet)[_rows_top(0) + TILE // 2, PADDING + TILE // 2]
    assert abs(int(pixel[1]) - 255) < 8 and int(pixel[0]) < 8  # the green output


def test_each_output_of_an_input_has_its_own_caption(tmp_path: Path) -> None:
    """samples_per_input 2: outputs k_00 and k_01 of input k were both captioned "k"."""
    out = str(tmp_path / "job")
    with fsspec.open(f"{out}/shards/in-000000.tar", "wb") as f:
        writer = wds.TarWriter(f)
        for index in range(2):
            writer.write({"__key__": f"k_{index:02d}", "png": _png((0, 255, 0)),
                          "json": json.dumps({"key": "k", "output_key": f"k_{index:02d}",
                                              "sample_index": index, "t0": 0.5}).encode()})
        writer.close()
    tile = 96  # room for the whole caption
    pixels = np.asarray(make_preview(out, tile=tile))
    tops = [HEADER_HEIGHT + PADDING + row * (tile + CAPTION_HEIGHT + PADDING) for row in (0, 1)]
    captions = [pixels[top + tile + 1:top + tile + CAPTION_HEIGHT] for top in tops]
    assert not np.array_equal(captions[0], captions[1])  # "k_00  t0=0.5" / "k_01  t0=0.5"


def test_by_default_the_preview_draws_the_quickstart_whole_and_says_what_it_drew(
        tmp_path: Path) -> None:
    out = str(tmp_path / "job")
    _write_job(out, {f"in-{s:06d}": [f"k{s}{i}" for i in range(8)] for s in range(4)})
    grid = tmp_path / "grid.png"
    result = CliRunner().invoke(main, ["preview", out, "-o", str(grid)])  # 32 outputs
    assert result.exit_code == 0, result.output
    width, height = grid_size(32, 2, TILE)
    assert result.output == f"wrote {grid} ({width}x{height} px): all 32 outputs of the shards\n"
    _write_job(out, {"in-000004": ["k40"]})  # a 33rd output
    result = CliRunner().invoke(main, ["preview", out, "-o", str(grid), "--n", "4"])
    assert result.output.endswith(": the first 4 outputs; the shards hold more (--n for more "
                                  "rows)\n")
    # the CLI keeps its default as a literal (it does not import the preview module to start)
    from pipeline.tools.cli import preview_cmd
    from pipeline.tools.preview import DEFAULT_ROWS

    assert next(p.default for p in preview_cmd.params if p.name == "n") == DEFAULT_ROWS == 32
