"""The procedural "rooms" domain: deterministic images and byte-identical WebDataset shards."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import fsspec
import numpy as np
import pytest
from PIL import Image

from pipeline.errors import PipelineError
from pipeline.tools.demo_data import render_room, write_demo_data


def _members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}  # type: ignore[union-attr]


def test_render_room_is_deterministic_rgb_and_varied() -> None:
    a = render_room(np.random.default_rng(3), 32)
    b = render_room(np.random.default_rng(3), 32)
    c = render_room(np.random.default_rng(4), 32)
    assert a.mode == "RGB" and a.size == (32, 32)
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(c))
    pixels = np.asarray(a, dtype=np.float32)
    assert pixels.std() > 10  # a scene, not a flat colour
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50


def test_render_room_rejects_tiny_sizes() -> None:
    with pytest.raises(ValueError, match="size"):
        render_room(np.random.default_rng(0), 4)


def test_shards_are_byte_identical_for_a_seed(tmp_path: Path) -> None:
    urls_a = write_demo_data(str(tmp_path / "a"), 5, size=24, shard_size=2, seed=1)
    write_demo_data(str(tmp_path / "b"), 5, size=24, shard_size=2, seed=1)
    write_demo_data(str(tmp_path / "c"), 5, size=24, shard_size=2, seed=2)
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == ["rooms-000000.tar", "rooms-000001.tar", "rooms-000002.tar"]
    assert len(urls_a) == 3 and urls_a[0].endswith("a/rooms-000000.tar")
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
        assert (tmp_path / "a" / name).read_bytes() != (tmp_path / "c" / name).read_bytes()

    members = _members(tmp_path / "a" / "rooms-000000.tar")
    assert list(members) == ["room_0000000.png", "room_0000001.png"]
    assert list(_members(tmp_path / "a" / "rooms-000002.tar")) == ["room_0000004.png"]
    for data in members.values():
        with Image.open(io.BytesIO(data)) as img:
            assert img.format == "PNG" and img.mode == "RGB" and img.size == (24, 24)


def test_image_i_does_not_depend_on_shard_size(tmp_path: Path) -> None:
    write_demo_data(str(tmp_path / "a"), 3, size=16, shard_size=1, seed=5)
    write_demo_data(str(tmp_path / "b"), 3, size=16, shard_size=3, seed=5)
    assert (_members(tmp_path / "a" / "rooms-000002.tar")["room_0000002.png"]
            == _members(tmp_path / "b" / "rooms-000000.tar")["room_0000002.png"])


def test_writes_to_any_fsspec_url() -> None:
    urls = write_demo_data("memory://demo-rooms", 3, size=16, shard_size=2, seed=0)
    assert urls == ["memory://demo-rooms/rooms-000000.tar", "memory://demo-rooms/rooms-000001.tar"]
    fs = fsspec.filesystem("memory")
    with fs.open("/demo-rooms/rooms-000001.tar", "rb") as f, tarfile.open(fileobj=f) as tar:
        assert tar.getnames() == ["room_0000002.png"]
    fs.rm("/demo-rooms", recursive=True)


@pytest.mark.parametrize("kwargs", [{"n": 0}, {"n": 2, "shard_size": 0}, {"n": 2, "size": 4}])
def test_rejects_bad_arguments(tmp_path: Path, kwargs: dict[str, int]) -> None:
    n = kwargs.pop("n")
    with pytest.raises(PipelineError):
        write_demo_data(str(tmp_path), n, **kwargs)


def test_cli_demo_data(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from pipeline.cli import main

    out = tmp_path / "rooms"
    result = CliRunner().invoke(main, ["demo-data", "--out", str(out), "--n", "3", "--size", "16",
                                       "--shard-size", "2", "--seed", "1"])
    assert result.exit_code == 0, result.output
    assert "wrote 3 images in 2 shards" in result.output
    assert sorted(p.name for p in out.iterdir()) == ["rooms-000000.tar", "rooms-000001.tar"]
    bad = CliRunner().invoke(main, ["demo-data", "--out", str(out), "--n", "0"])
    assert bad.exit_code == 2 and "--n" in bad.output


def test_strokes_option_writes_guides_and_targets(tmp_path):
    import io

    import numpy as np
    import webdataset as wds
    from PIL import Image

    from pipeline.tools.demo_data import write_demo_data

    (url,) = write_demo_data(str(tmp_path / "s"), 3, size=32, seed=5, strokes=True)
    samples = list(wds.WebDataset([url], shardshuffle=False))
    assert [s["__key__"] for s in samples] == ["room_0000000", "room_0000001", "room_0000002"]
    for s in samples:
        guide = np.asarray(Image.open(io.BytesIO(s["png"])).convert("RGB"))
        target = np.asarray(Image.open(io.BytesIO(s["target.png"])).convert("RGB"))
        assert guide.shape == target.shape == (32, 32, 3)
        assert len(np.unique(guide.reshape(-1, 3), axis=0)) <= 6  # a 6-colour stroke painting
        assert len(np.unique(target.reshape(-1, 3), axis=0)) > 6
