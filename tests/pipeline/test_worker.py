"""ShardWorker without Ray: outputs, manifest rows, errors as rows, determinism, commit order."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

from pipeline import testhooks
from pipeline.errors import ShardError
from pipeline.worker import ShardWorker, output_seed
from pipeline.writer import MANIFEST_SCHEMA
from tests.support.shards import make_spec, png, write_shards


@pytest.fixture
def shards(tmp_path):
    return write_shards(tmp_path / "in", n_shards=3, per_shard=4)


def _rows(out):
    return pads.dataset(str(out / "manifests"), format="parquet").to_table().to_pylist()


def test_shard_outputs_manifest_and_marker(tiny_vp, tiny_vp_dir, shards, tmp_path):
    out = tmp_path / "out"
    spec = make_spec(tiny_vp_dir, shards, out, sdedit={"samples_per_input": 2})
    worker = ShardWorker(spec, model=tiny_vp, worker_id="w1")
    for url in shards:
        stats = worker.process(url)
        assert not stats.skipped
    rows = _rows(out)
    assert pq.read_schema(out / "manifests" / "part-000000.parquet").equals(MANIFEST_SCHEMA)
    # exactly one row per input key x output index, errors included
    pairs = sorted((r["key"], r["sample_index"]) for r in rows)
    keys = [f"s{s}_{i:03d}" for s in range(3) for i in range(4)]
    assert pairs == sorted((k, n) for k in keys for n in range(2))
    errors = {r["key"]: r["error"] for r in rows if r["status"] == "error"}
    assert set(errors) == {"s1_001", "s2_002"}
    assert "cannot decode s1_001.png" in errors["s1_001"]
    assert "missing guide member s2_002" in errors["s2_002"]
    ok = [r for r in rows if r["status"] == "ok"]
    assert all(r["output_key"] == f"{r['key']}_{r['sample_index']:02d}" for r in ok)
    assert all(r["seed"] == output_seed(7, r["key"], r["sample_index"]) for r in rows)
    assert all(r["steps"] == 40 and r["width"] == 16 and 0 < r["faithfulness_l2"] < 255
               for r in ok)
    assert all(r["steps"] == 40 for r in rows)  # error rows too: the resolved count
    # outputs decode with webdataset as they are
    decoded = list(wds.WebDataset([str(out / "shards" / "part-000001.tar")], shardshuffle=False)
                   .decode("rgb8"))
    assert len(decoded) == 2 * 3 and all(s["png"].shape == (16, 16, 3) for s in decoded)
    meta = decoded[0]["json"]  # webdataset decodes .json members itself
    assert meta["key"] == "s1_000" and meta["t0"] == 0.04 and "guide.png" in decoded[0]
    marker = json.loads((out / "done" / "part-000002.json").read_text())
    assert marker["samples"] == 4 and marker["outputs_ok"] == 6 and marker["outputs_error"] == 2
    # a committed shard is not redone
    assert worker.process(shards[0]).skipped


def test_faithfulness_l2_is_rms_in_255_units(tiny_vp, tiny_vp_dir, shards, tmp_path):
    out = tmp_path / "out"
    spec = make_spec(tiny_vp_dir, shards[:1], out)
    ShardWorker(spec, model=tiny_vp).process(shards[0])
    with tarfile.open(out / "shards" / "part-000000.tar") as tar:
        output = np.asarray(Image.open(io.BytesIO(tar.extractfile("s0_000.png").read())))
        guide = np.asarray(Image.open(io.BytesIO(tar.extractfile("s0_000.guide.png").read())))
    expected = np.sqrt(np.mean((output.astype(float) - guide.astype(float)) ** 2))
    row = next(r for r in _rows(out) if r["key"] == "s0_000")
    assert row["faithfulness_l2"] == pytest.approx(expected, abs=1e-5)


def test_outputs_do_not_depend_on_batch_size(tiny_vp, tiny_vp_dir, shards, tmp_path):
    tars = []
    for batch in (1, 4):
        out = tmp_path / f"out{batch}"
        spec = make_spec(tiny_vp_dir, shards[:1], out, compute={"batch_size": batch})
        ShardWorker(spec, model=tiny_vp).process(shards[0])
        tars.append((out / "shards" / "part-000000.tar").read_bytes())
    assert tars[0] == tars[1]


def test_masks_sizes_and_keys_become_error_rows(tiny_vp, tiny_vp_dir, tmp_path):
    rng = np.random.default_rng(1)
    url = str(tmp_path / "odd.tar")
    mask = np.zeros((16, 16), np.uint8)
    mask[:, 8:] = 255
    with wds.TarWriter(url) as writer:
        guide = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
        writer.write({"__key__": "good", "png": png(guide), "mask.png": png(mask),
                      "target.png": png(guide)})
        writer.write({"__key__": "badmask", "png": png(guide), "mask.png": png(mask[:8])})
        writer.write({"__key__": "nomask", "png": png(guide)})
        writer.write({"__key__": "odd", "png": png(guide[:15]), "mask.png": png(mask[:15])})
    spec = make_spec(tiny_vp_dir, [url], tmp_path / "out", input={"mask": "mask.png"})
    ShardWorker(spec, model=tiny_vp).process(url)
    rows = {r["key"]: r for r in _rows(tmp_path / "out")}
    assert rows["good"]["status"] == "ok"
    assert "allowed: the same size" in rows["badmask"]["error"]
    assert "missing mask member nomask.mask.png" in rows["nomask"]["error"]
    assert "multiples of 2" in rows["odd"]["error"]
    with tarfile.open(tmp_path / "out" / "shards" / "odd.tar") as tar:
        names = sorted(tar.getnames())
        output = np.asarray(Image.open(io.BytesIO(tar.extractfile("good.png").read())))
    assert names == ["good.guide.png", "good.json", "good.mask.png", "good.png",
                     "good.target.png"]
    assert np.array_equal(output[:, :8], guide[:, :8])  # kept (black) half is the guide
    assert not np.array_equal(output[:, 8:], guide[:, 8:])


def test_truncated_tar_is_a_shard_error_and_commits_nothing(tiny_vp, tiny_vp_dir, shards,
                                                            tmp_path):
    data = Path(shards[0]).read_bytes()
    bad = tmp_path / "in" / "trunc.tar"
    bad.write_bytes(data[: len(data) // 2 + 100])
    out = tmp_path / "out"
    spec = make_spec(tiny_vp_dir, [str(bad)], out)
    with pytest.raises(ShardError, match=r"trunc\.tar: cannot read"):
        ShardWorker(spec, model=tiny_vp).process(str(bad))
    assert not (out / "done").exists() and not (out / "manifests").exists()
    assert not any(p.name.startswith(".trunc") for p in (out / "shards").iterdir())


def test_test_hooks_are_off_unless_a_test_sets_them(tiny_vp, tiny_vp_dir, shards, tmp_path,
                                                    monkeypatch):
    monkeypatch.delenv(testhooks.ENV, raising=False)
    assert testhooks.from_env() is None
    assert ShardWorker(make_spec(tiny_vp_dir, shards, tmp_path), model=tiny_vp).hooks is None
    monkeypatch.setenv(*next(iter(testhooks.hooks_env(batch_delay=0.01).items())))
    assert testhooks.from_env() == testhooks.Hooks(batch_delay=0.01)
    with pytest.raises(TypeError):
        testhooks.hooks_env(crahs="x:1:y")  # a misspelt hook fails at once
