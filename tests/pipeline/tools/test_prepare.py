"""Tests of `pipeline.prepare`: folders / globs / lists of images -> WebDataset shards."""

from __future__ import annotations

import io
import logging
import tarfile
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
from pipeline.tools.prepare import prepare, sanitize_key


def _write_image(path: Path, size: tuple[int, int], seed: int, fmt: str = "PNG") -> None:
    rng = np.random.default_rng(seed)
    array = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format=fmt)


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """7 good images (mixed sizes, formats, dotted names, a subfolder), 1 corrupt, 1 text file."""
    root = tmp_path / "src"
    _write_image(root / "a.png", (40, 30), 0)
    _write_image(root / "b.jpg", (30, 50), 1, "JPEG")
    _write_image(root / "c.d.png", (32, 32), 2)
    _write_image(root / "sub" / "a.png", (24, 24), 3)
    _write_image(root / "sub" / "e.png", (64, 48), 4)
    _write_image(root / "sub.a.png", (20, 20), 5)  # collides with sub/a.png after sanitizing
    _write_image(root / "z.webp", (36, 36), 6, "WEBP")
    good = io.BytesIO()
    Image.new("RGB", (32, 32), (1, 2, 3)).save(good, format="PNG")
    (root / "corrupt.png").write_bytes(good.getvalue()[:60])
    (root / "notes.txt").write_text("not an image\n")
    return root


def _members(shard: str) -> list[str]:
    with fsspec.open(shard, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
        return [member.name for member in tar]


def test_sanitize_key() -> None:
    assert sanitize_key("rooms/a.b/x.1.jpg") == "rooms_a_b_x_1"
    assert sanitize_key("../up/it's here.png") == "___up_it_s_here"
    assert "." not in sanitize_key("a..b/.hidden")


def test_prepare_folder_writes_shards_and_reports_bad_files(
    image_folder: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "shards"
    with caplog.at_level(logging.WARNING, logger="pipeline.prepare"):
        report = prepare([str(image_folder)], str(out), shard_size=3, size=16, progress=False)

    assert report.n_images == 7 and report.n_files == 9
    assert report.n_shards == 3 and len(report.shards) == 3
    assert [Path(s).name for s in report.shards] == [
        "shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert sorted(Path(name).name for name, _ in report.skipped) == ["corrupt.png", "notes.txt"]
    assert all(error for _, error in report.skipped)
    assert "corrupt.png" in caplog.text and "notes.txt" in caplog.text

    names = [name for shard in report.shards for name in _members(shard)]
    assert len(names) == 7  # one member per sample without strokes
    assert all(name.count(".") == 1 and name.endswith(".png") for name in names)
    keys = [name.removesuffix(".png") for name in names]
    # sorted by relative path ("sub.a.png" < "sub/a.png"), the later duplicate gets a suffix
    assert keys == ["a", "b", "c_d", "sub_a", "sub_a_1", "sub_e", "z"]

    samples = list(wds.WebDataset([str(s) for s in report.shards], shardshuffle=False))
    assert [s["__key__"] for s in samples] == keys
    for sample in samples:
        assert set(sample) >= {"__key__", "png"} and "target.png" not in sample
        with Image.open(io.BytesIO(sample["png"])) as image:
            assert image.size == (16, 16) and image.mode == "RGB"


def test_prepare_simulate_writes_guide_and_target(image_folder: Path, tmp_path: Path) -> None:
    report = prepare([str(image_folder / "sub" / "*.png"), str(image_folder / "a.png")],
                     str(tmp_path / "out"), size=32, strokes="simulate", progress=False)
    assert report.n_images == 3 and report.n_shards == 1 and not report.skipped
    samples = list(wds.WebDataset(report.shards, shardshuffle=False))
    # keys are relative to each source's root, deduplicated across sources
    assert sorted(s["__key__"] for s in samples) == ["a", "a_1", "e"]
    for sample in samples:
        guide = np.asarray(Image.open(io.BytesIO(sample["png"])))
        target = np.asarray(Image.open(io.BytesIO(sample["target.png"])))
        assert guide.shape == target.shape == (32, 32, 3)
        assert len(np.unique(guide.reshape(-1, 3), axis=0)) <= 6
        assert len(np.unique(target.reshape(-1, 3), axis=0)) > 6


def test_prepare_from_a_list_file_to_memory(image_folder: Path, tmp_path: Path) -> None:
    listing = tmp_path / "urls.txt"
    listing.write_text(f"# images\n{image_folder / 'a.png'}\n\n../src/sub/e.png\n"
                       f"file://{image_folder / 'missing.png'}\n")
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "urls.txt").write_text(listing.read_text())
    out = f"memory://prepare-test-{uuid.uuid4().hex}/in"
    report = prepare([str(tmp_path / "lists" / "urls.txt")], out, size=16, progress=False)
    assert report.n_images == 2 and report.n_shards == 1
    assert report.shards == [f"{out}/shard-000000.tar"]
    assert [Path(name).name for name, _ in report.skipped] == ["missing.png"]
    assert _members(report.shards[0]) == ["a.png", "sub_e.png"]


def test_prepare_is_deterministic_and_refuses_to_mix_with_old_shards(
    image_folder: Path, tmp_path: Path
) -> None:
    first = prepare([str(image_folder)], str(tmp_path / "one"), size=16, progress=False)
    second = prepare([str(image_folder)], str(tmp_path / "two"), size=16, progress=False)
    assert Path(first.shards[0]).read_bytes() == Path(second.shards[0]).read_bytes()
    with pytest.raises(PipelineError, match="already holds 1 shard"):
        prepare([str(image_folder)], str(tmp_path / "one"), size=16, progress=False)
    again = prepare([str(image_folder)], str(tmp_path / "one"), size=16, shard_size=4,
                    progress=False, overwrite=True)
    assert sorted(p.name for p in (tmp_path / "one").iterdir()) == [
        "shard-000000.tar", "shard-000001.tar"]
    assert again.n_shards == 2


def test_missing_source_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(PipelineError, match="does not exist"):
        prepare([str(tmp_path / "nope")], str(tmp_path / "out"), progress=False)
    with pytest.raises(PipelineError, match="matches no files"):
        prepare([str(tmp_path / "*.png")], str(tmp_path / "out"), progress=False)


def test_cli_prepare_prints_the_report(image_folder: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["prepare", str(image_folder), "--out",
                                       str(tmp_path / "out"), "--size", "16", "--shard-size",
                                       "5", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "wrote 7 of 9 files in 2 shards" in result.output
    assert "skipped 2 unreadable files" in result.output
    assert "corrupt.png" in result.output and "notes.txt" in result.output


def test_cli_prepare_exits_1_when_nothing_is_readable(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "x.txt").write_text("hello")
    result = CliRunner().invoke(main, ["prepare", str(tmp_path / "src"), "--out",
                                       str(tmp_path / "out"), "--no-progress"])
    assert result.exit_code == 1
    assert "x.txt" in result.output and "no file could be read" in result.output


def test_cli_prepare_error_and_help(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["prepare", str(tmp_path / "nope"), "--out",
                                       str(tmp_path / "out")])
    assert result.exit_code == PipelineError.exit_code
    assert "error:" in result.output and "does not exist" in result.output
    help_text = CliRunner().invoke(main, ["prepare", "--help"]).output
    assert "--strokes" in help_text and "--shard-size" in help_text
