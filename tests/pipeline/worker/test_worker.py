"""ShardWorker without Ray: outputs, manifest rows, errors as rows, determinism, commit order."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import torch
import webdataset as wds
from PIL import Image

from pipeline.errors import ShardError
from pipeline.input import reader
from pipeline.output.manifest import MANIFEST_SCHEMA, ManifestRowError
from pipeline.worker import encode as outputs
from pipeline.worker import hooks as testhooks
from pipeline.worker import shard as worker_module
from pipeline.worker.batching import output_seed
from pipeline.worker.shard import ShardWorker
from sdedit import EditInputError
from tests.support.images import png16, png_header_only
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
    """Each output's noise comes from its own seed, whatever its batch. (The tiny model also
    rounds alike at every batch size; a real one may not: test_reproducibility.py.)"""
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


def test_test_hooks_come_only_as_an_object_never_from_the_environment(
        tiny_vp, tiny_vp_dir, shards, tmp_path, monkeypatch):
    """The issue's case: production processes read hooks from SDEDIT_BATCH_TEST_HOOKS (and the
    runner forwarded every SDEDIT_BATCH_* variable to actors), so the environment could make
    a production worker fail writes or exit. Now only a Hooks object handed over does."""
    flag = tmp_path / "fired"
    monkeypatch.setenv("SDEDIT_BATCH_TEST_HOOKS",
                       json.dumps({"fail_write": f"part-000000:{flag}"}))
    worker = ShardWorker(make_spec(tiny_vp_dir, shards, tmp_path / "a"), model=tiny_vp)
    assert worker.hooks == testhooks.Hooks()  # the no-op default
    assert worker.process(shards[0]).outputs_ok == 4 and not flag.exists()
    hooked = ShardWorker(make_spec(tiny_vp_dir, shards, tmp_path / "b"), model=tiny_vp,
                         hooks=testhooks.Hooks(fail_write=f"part-000000:{flag}"))
    with pytest.raises(OSError, match="test hook: writing shard part-000000 failed"):
        hooked.process(shards[0])
    assert flag.exists()
    with pytest.raises(TypeError):
        testhooks.Hooks(crahs="x:1:y")  # a misspelt hook fails at once


def _tar(url, samples):
    with wds.TarWriter(str(url)) as writer:
        for sample in samples:
            writer.write(sample)
    return str(url)


def test_manifest_columns_are_complete_and_locations_absolute(tiny_vp, tiny_vp_dir, shards,
                                                             tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = os.path.relpath(tiny_vp_dir, tmp_path)
    spec = make_spec(model, shards[1:2], Path("rel-out"), sdedit={"eta": 0.0})
    ShardWorker(spec, model=tiny_vp).process(shards[1])
    rows = {r["key"]: r for r in _rows(tmp_path / "rel-out")}
    ok, bad = rows["s1_000"], rows["s1_001"]
    assert ok["output_shard"] == str(tmp_path / "rel-out" / "shards" / "part-000001.tar")
    assert ok["input_shard"] == shards[1] and os.path.isabs(shards[1])
    assert ok["model"] == str(tiny_vp_dir) and not os.path.isabs(model)
    assert ok["model_identity"] == tiny_vp.identity and tiny_vp.identity.startswith("sha256:")
    assert (ok["dtype"], ok["eta"], ok["error_kind"], ok["status"]) == ("fp32", 0.0, None, "ok")
    assert [rows[k]["batch_size"] for k in ("s1_000", "s1_002", "s1_003")] == [3, 3, 3]
    assert (bad["status"], bad["error_kind"], bad["batch_size"]) == ("error", "decode", None)
    assert bad["model"] == ok["model"] and bad["dtype"] == "fp32"
    marker = json.loads((tmp_path / "rel-out" / "done" / "part-000001.json").read_text())
    assert marker["errors_by_kind"] == {"decode": 1}
    assert marker["output_shard"] == ok["output_shard"]


def test_duplicate_keys_are_error_rows_and_the_tar_holds_each_key_once(tiny_vp, tiny_vp_dir,
                                                                      tmp_path):
    rng = np.random.default_rng(3)
    guides = [rng.integers(0, 256, (16, 16, 3), dtype=np.uint8) for _ in range(3)]
    url = _tar(tmp_path / "dup.tar", [
        {"__key__": "a", "png": png(guides[0])}, {"__key__": "a", "png": png(guides[1])},
        {"__key__": "b", "png": png(guides[1])}, {"__key__": "a", "png": png(guides[2])}])
    out = tmp_path / "out"
    stats = ShardWorker(make_spec(tiny_vp_dir, [url], out), model=tiny_vp).process(url)
    assert (stats.samples, stats.outputs_ok, stats.outputs_error) == (4, 2, 2)
    rows = sorted(_rows(out), key=lambda r: r["error"] or "")
    assert [(r["key"], r["status"], r["error_kind"]) for r in rows] == [
        ("a", "ok", None), ("b", "ok", None), ("a", "error", "duplicate"),
        ("a", "error", "duplicate")]
    assert "duplicate key a: sample 2 of the shard repeats sample 1" in rows[2]["error"]
    assert "duplicate key a: sample 4 of the shard repeats sample 1" in rows[3]["error"]
    with tarfile.open(out / "shards" / "dup.tar") as tar:
        names = tar.getnames()
        guide = np.asarray(Image.open(io.BytesIO(tar.extractfile("a.guide.png").read())))
    assert [n.split(".")[0] for n in names] == ["a"] * 3 + ["b"] * 3  # once each, contiguous
    assert np.array_equal(guide, guides[0])  # the first occurrence was edited


def test_bad_inputs_become_named_rows_and_good_ones_correct_rows(tiny_vp, tiny_vp_dir,
                                                                 tmp_path):
    """The issue's bad inputs in one shard: none fails it, none becomes a wrong "ok"."""
    mask = np.zeros((16, 16), np.uint8)
    mask[:, 8:] = 255
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[..., 0] = 200  # hidden red, fully transparent
    url = _tar(tmp_path / "bad.tar", [
        {"__key__": "half16", "png": png16(np.full((16, 16), 32768, np.uint16)),
         "mask.png": png(mask)},
        {"__key__": "clear", "png": png(rgba), "mask.png": png(mask)},
        {"__key__": "greymask", "png": png(rgba[..., :3]), "mask.png": png(mask // 2 + 50)},
        {"__key__": "huge", "png": png_header_only(12000, 12000), "mask.png": png(mask)}])
    out = tmp_path / "out"
    spec = make_spec(tiny_vp_dir, [url], out, input={"mask": "mask.png"})
    ShardWorker(spec, model=tiny_vp).process(url)
    rows = {r["key"]: r for r in _rows(out)}
    assert {k: (r["status"], r["error_kind"]) for k, r in rows.items()} == {
        "half16": ("ok", None), "clear": ("ok", None), "greymask": ("error", "mask"),
        "huge": ("error", "size")}
    assert "mask greymask.mask.png: 256 of 256 pixels (100.0%)" in rows["greymask"]["error"]
    assert "values 50 x128, 177 x128" in rows["greymask"]["error"]
    assert "huge.png is 12000x12000 (144,000,000 pixels)" in rows["huge"]["error"]
    with tarfile.open(out / "shards" / "bad.tar") as tar:
        def image(name):
            return np.asarray(Image.open(io.BytesIO(tar.extractfile(name).read())))

        assert (image("half16.guide.png") == 128).all()  # not a white guide
        assert (image("clear.guide.png") == 255).all()  # not the hidden red
        assert (image("clear.png")[:, :8] == 255).all()  # kept half: the guide, exactly
    assert json.loads((out / "done" / "bad.json").read_text())["errors_by_kind"] == {
        "mask": 1, "size": 1}


def test_an_empty_shard_commits_an_empty_manifest(tiny_vp, tiny_vp_dir, tmp_path):
    url = _tar(tmp_path / "empty.tar", [])
    out = tmp_path / "out"
    stats = ShardWorker(make_spec(tiny_vp_dir, [url], out), model=tiny_vp).process(url)
    assert (stats.samples, stats.outputs_ok, stats.outputs_error) == (0, 0, 0)
    table = pq.read_table(out / "manifests" / "empty.parquet")
    assert table.num_rows == 0 and table.schema.equals(MANIFEST_SCHEMA)
    assert (out / "done" / "empty.json").exists()


def _oom_above(limit, calls):
    """`edit` that raises torch.OutOfMemoryError for batches larger than `limit`."""
    from pipeline.worker import shard as worker_module

    real = worker_module.edit

    def edit(model, images, **kwargs):
        calls.append(images.shape[0])
        if images.shape[0] > limit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(model, images, **kwargs)
    return edit


def test_out_of_memory_batches_are_split_and_give_the_same_outputs(tiny_vp, tiny_vp_dir,
                                                                   shards, tmp_path,
                                                                   monkeypatch):
    url = write_shards(tmp_path / "seven", n_shards=1, per_shard=7, bad=False, seed=9)[0]
    plain = tmp_path / "plain"
    ShardWorker(make_spec(tiny_vp_dir, [url], plain, compute={"batch_size": 7}),
                model=tiny_vp).process(url)
    calls: list[int] = []
    monkeypatch.setattr("pipeline.worker.shard.edit", _oom_above(2, calls))
    split = tmp_path / "split"
    stats = ShardWorker(make_spec(tiny_vp_dir, [url], split, compute={"batch_size": 7}),
                        model=tiny_vp).process(url)
    assert calls == [7, 4, 2, 2, 3, 2, 1]  # 7 -> 4 + 3 -> (2 + 2) + (2 + 1)
    assert (stats.outputs_ok, stats.outputs_error) == (7, 0)
    assert (split / "shards" / "part-000000.tar").read_bytes() == \
        (plain / "shards" / "part-000000.tar").read_bytes()
    assert [r["batch_size"] for r in _rows(split)] == [2, 2, 2, 2, 2, 2, 1]
    assert [r["batch_size"] for r in _rows(plain)] == [7] * 7


def test_a_sample_out_of_memory_alone_is_a_device_row(tiny_vp, tiny_vp_dir, tmp_path,
                                                      monkeypatch):
    url = write_shards(tmp_path / "in", n_shards=1, per_shard=3, bad=False)[0]
    calls: list[int] = []
    monkeypatch.setattr("pipeline.worker.shard.edit", _oom_above(0, calls))
    out = tmp_path / "out"
    stats = ShardWorker(make_spec(tiny_vp_dir, [url], out), model=tiny_vp).process(url)
    assert calls == [3, 2, 1, 1, 1]
    assert (stats.outputs_ok, stats.outputs_error) == (0, 3)
    rows = _rows(out)
    assert {(r["error_kind"], r["batch_size"]) for r in rows} == {("device", 1)}
    assert rows[0]["error"] == (
        "out of device memory even alone (batch of 1): CUDA out of memory. Tried to allocate "
        "2.00 GiB; allowed: an image that fits the device (smaller, or a device with more "
        "memory)")
    assert json.loads((out / "done" / "part-000000.json").read_text())["errors_by_kind"] == {
        "device": 3}


@pytest.mark.parametrize("raised, outcome", [
    (ValueError("a bug in a library: shapes do not match"), "fails"),
    (EditInputError("masks values are not all 0 or 1; allowed: {0, 1}"), "edit rows"),
], ids=["other-ValueError", "EditInputError"])
def test_only_the_engines_refusals_become_edit_rows(tiny_vp, tiny_vp_dir, shards, tmp_path,
                                                    monkeypatch, raised, outcome):
    """The issue's case: every ValueError of `edit` became an `edit` row, so a bug was
    committed as error rows of every sample, never retried."""
    def edit(model, images, **kwargs):
        raise raised

    monkeypatch.setattr(worker_module, "edit", edit)
    out = tmp_path / "out"
    worker = ShardWorker(make_spec(tiny_vp_dir, shards, out), model=tiny_vp)
    if outcome == "fails":
        with pytest.raises(ValueError, match="a bug in a library"):
            worker.process(shards[0])
        assert not (out / "done").exists() and not (out / "manifests").exists()
        return
    stats = worker.process(shards[0])
    assert stats.errors_by_kind == {"edit": 4}
    assert {r["error"] for r in _rows(out)} == {"masks values are not all 0 or 1; allowed: {0, 1}"}


def test_an_encoder_failure_other_than_the_formats_limit_fails_the_attempt(
        tiny_vp, tiny_vp_dir, shards, tmp_path, monkeypatch):
    """outputs.py turned every OSError / ValueError of encoding into an `encode` row."""
    def broken(*args, **kwargs):
        raise OSError("encoder crashed")

    monkeypatch.setattr(outputs, "output_sample", broken)
    out = tmp_path / "out"
    with pytest.raises(OSError, match="encoder crashed"):
        ShardWorker(make_spec(tiny_vp_dir, shards, out), model=tiny_vp).process(shards[0])
    assert not (out / "done").exists()


def test_a_sample_error_without_a_kind_is_a_bug_not_a_decode_row(tiny_vp, tiny_vp_dir, shards,
                                                                  tmp_path, monkeypatch):
    decode = reader.decode_sample

    def kindless(raw, *args, **kwargs):
        if raw.key == "s0_002":
            return reader.Sample(key="s0_002", error="something went wrong")
        return decode(raw, *args, **kwargs)

    monkeypatch.setattr(reader, "decode_sample", kindless)
    out = tmp_path / "out"
    with pytest.raises(ManifestRowError, match="error_kind None is not one of key, missing"):
        ShardWorker(make_spec(tiny_vp_dir, shards, out), model=tiny_vp).process(shards[0])
    assert not (out / "done").exists()


def test_manifest_rows_are_in_input_order(tiny_vp, tiny_vp_dir, tmp_path):
    """Error rows were written when read, ok rows when encoded: out of input order."""
    rng = np.random.default_rng(4)

    def good():
        return png(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))

    url = _tar(tmp_path / "mixed.tar", [
        {"__key__": "a", "png": good()}, {"__key__": "b", "png": b"not an image"},
        {"__key__": "c", "png": good()}, {"__key__": "d", "txt": b"no guide"},
        {"__key__": "e", "png": good()}, {"__key__": "b", "png": good()}])
    out = tmp_path / "out"
    spec = make_spec(tiny_vp_dir, [url], out, sdedit={"samples_per_input": 2})
    ShardWorker(spec, model=tiny_vp).process(url)
    rows = _rows(out)
    assert [(r["output_key"], r["status"]) for r in rows] == [
        ("a_00", "ok"), ("a_01", "ok"), ("b_00", "error"), ("b_01", "error"),
        ("c_00", "ok"), ("c_01", "ok"), ("d_00", "error"), ("d_01", "error"),
        ("e_00", "ok"), ("e_01", "ok"), ("b_00", "error"), ("b_01", "error")]
    assert [r["error_kind"] for r in rows if r["status"] == "error"] == [
        "decode", "decode", "missing", "missing", "duplicate", "duplicate"]
