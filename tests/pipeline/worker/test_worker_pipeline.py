"""The pipelined ShardWorker (issue 9): two shards at once, bounded memory, guides carried as
they came, per-output encode errors, write errors that abort the shard, the PNG level and the
host threads."""

from __future__ import annotations

import contextlib
import io
import itertools
import tarfile
import threading
import time

import numpy as np
import pyarrow.dataset as pads
import pytest
import torch
import webdataset as wds
from PIL import Image

from pipeline.images import encode_image
from pipeline.input import reader
from pipeline.output import writer
from pipeline.worker import hooks as testhooks
from pipeline.worker.shard import ShardWorker
from sdedit import accel
from tests.support.shards import make_spec, png, write_shards


def _tar_members(path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def test_two_shards_at_once_write_what_one_at_a_time_writes(tiny_vp, tiny_vp_dir, tmp_path):
    shards = write_shards(tmp_path / "in", n_shards=3, per_shard=7, bad=False, seed=5)
    serial, concurrent = tmp_path / "serial", tmp_path / "concurrent"
    worker = ShardWorker(make_spec(tiny_vp_dir, shards, serial), model=tiny_vp)
    for url in shards:
        worker.process(url)
    worker = ShardWorker(make_spec(tiny_vp_dir, shards, concurrent), model=tiny_vp)
    turns: list[tuple[object, int, str]] = []  # (shard token, event order, "in" / "out")
    take_turn, order = worker.turns.turn, itertools.count()

    @contextlib.contextmanager
    def recorded_turn(token: object):
        with take_turn(token) as waited:
            turns.append((token, next(order), "in"))
            yield waited
            turns.append((token, next(order), "out"))

    worker.turns.turn = recorded_turn  # type: ignore[method-assign]
    threads = [threading.Thread(target=lambda u=url: worker.process(u)) for url in shards]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for url in shards:
        name = url.rsplit("/", 1)[1]
        assert (concurrent / "shards" / name).read_bytes() == \
            (serial / "shards" / name).read_bytes()
    # the shards took turns on the device: every turn ends before the next one starts, and
    # each shard's turns come in one run (a shard computes only after the one before it)
    events = [(token, kind) for token, _, kind in sorted(turns, key=lambda t: t[1])]
    assert all(events[i][1] == "in" and events[i + 1] == (events[i][0], "out")
               for i in range(0, len(events), 2))
    owners = [token for token, kind in events if kind == "in"]
    runs = [token for i, token in enumerate(owners) if i == 0 or owners[i - 1] is not token]
    assert len(runs) == len(set(map(id, runs))) == len(shards)


def test_images_in_flight_stay_within_the_bound(tiny_vp, tiny_vp_dir, tmp_path):
    shards = write_shards(tmp_path / "in", n_shards=2, per_shard=30, size=16, bad=False)
    spec = make_spec(tiny_vp_dir, shards, tmp_path / "out", compute={"batch_size": 2})
    worker = ShardWorker(spec, model=tiny_vp)
    results = []
    threads = [threading.Thread(target=lambda u=url: results.append(worker.process(u)))
               for url in shards]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert worker.max_in_flight == 2 * (4 + 4 + 4 + 4)  # batch 2: depth, buckets, 2 batches, window
    peak = max(r.in_flight_max for r in results)
    assert 2 <= peak <= worker.max_in_flight, peak  # 60 samples were read; fewer held
    assert worker.in_flight.value == 0  # every decoded image was released


def _guides_tar(path, guides: dict[str, bytes]) -> str:
    with wds.TarWriter(str(path)) as tar:
        for key, data in guides.items():
            ext = "jpg" if data[:2] == b"\xff\xd8" else "png"
            tar.write({"__key__": key, ext: data})
    return str(path)


def _encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def test_rgb8_png_guides_are_carried_unchanged_others_stored_as_edited(tiny_vp, tiny_vp_dir,
                                                                       tmp_path):
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), np.uint8))
    inputs = {"plain": _encode(rgb, "PNG", compress_level=9),  # not the writer's level
              "jpeg": _encode(rgb, "JPEG", quality=90),
              "palette": _encode(rgb.convert("P"), "PNG")}
    url = _guides_tar(tmp_path / "in.tar", inputs)
    spec = make_spec(tiny_vp_dir, [url], tmp_path / "out")
    ShardWorker(spec, model=tiny_vp).process(url)
    members = _tar_members(tmp_path / "out" / "shards" / "in.tar")
    assert members["plain.guide.png"] == inputs["plain"]  # carried byte for byte
    for key in ("jpeg", "palette"):
        assert members[f"{key}.guide.png"] != inputs[key]
        stored = np.asarray(Image.open(io.BytesIO(members[f"{key}.guide.png"])))
        edited = np.asarray(Image.open(io.BytesIO(inputs[key])).convert("RGB"))
        assert stored.shape == (16, 16, 3) and np.array_equal(stored, edited)


def test_an_output_the_format_cannot_hold_is_that_outputs_error_row(tiny_vp, tiny_vp_dir,
                                                                    tmp_path):
    """WebP holds at most 16383 px a side: one 16400 x 4 guide fails to encode, alone."""
    rng = np.random.default_rng(1)
    url = str(tmp_path / "in.tar")
    with wds.TarWriter(url) as tar:
        tar.write({"__key__": "wide", "png": png(rng.integers(0, 256, (4, 16400, 3), np.uint8))})
        tar.write({"__key__": "fine", "png": png(rng.integers(0, 256, (16, 16, 3), np.uint8))})
    out = tmp_path / "out"
    spec = make_spec(tiny_vp_dir, [url], out, output={"image_format": "webp"},
                     sdedit={"t0": 0.002})
    stats = ShardWorker(spec, model=tiny_vp).process(url)
    assert (stats.outputs_ok, stats.outputs_error) == (1, 1)
    rows = {r["key"]: r for r in pads.dataset(str(out / "manifests")).to_table().to_pylist()}
    assert rows["fine"]["status"] == "ok"
    assert rows["wide"]["status"] == "error"
    assert "cannot encode the output as webp" in rows["wide"]["error"]
    assert (rows["wide"]["error_kind"], rows["wide"]["batch_size"]) == ("encode", 1)
    assert sorted(_tar_members(out / "shards" / "in.tar")) == [
        "fine.guide.png", "fine.json", "fine.webp"]


def test_a_write_error_aborts_the_shard_with_nothing_committed(tiny_vp, tiny_vp_dir, tmp_path):
    shards = write_shards(tmp_path / "in", n_shards=1, per_shard=5, bad=False)
    out = tmp_path / "out"
    flag = tmp_path / "failed-once"
    worker = ShardWorker(make_spec(tiny_vp_dir, shards, out), model=tiny_vp,
                         hooks=testhooks.Hooks(fail_write=f"part-000000:{flag}"))
    with pytest.raises(OSError, match="writing shard part-000000 failed"):
        worker.process(shards[0])
    assert flag.exists()
    assert not (out / "done").exists() and not (out / "manifests").exists()
    assert list((out / "shards").iterdir()) == []
    assert worker.in_flight.value == 0
    assert worker.process(shards[0]).outputs_ok == 5  # the next attempt commits it


def test_the_png_level_reaches_the_outputs_and_never_changes_their_pixels(
        tiny_vp, tiny_vp_dir, tmp_path, monkeypatch):
    shards = write_shards(tmp_path / "in", n_shards=1, per_shard=6, bad=False, seed=3)
    levels = []

    def encode(image, fmt="png", png_compress_level=None, quality=None):
        levels.append(png_compress_level)
        return encode_image(image, fmt, png_compress_level, quality)

    monkeypatch.setattr(writer, "encode_image", encode)
    members = {}
    for level in (0, 9):
        out = tmp_path / f"out{level}"
        spec = make_spec(tiny_vp_dir, shards, out, output={"png_compress_level": level})
        ShardWorker(spec, model=tiny_vp).process(shards[0])
        members[level] = {name: data for name, data in _tar_members(
            out / "shards" / "part-000000.tar").items() if name.endswith(".png")}
    assert members[0].keys() == members[9].keys() and members[0]
    for name, data in members[0].items():
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(data))),
                              np.asarray(Image.open(io.BytesIO(members[9][name]))))
    assert levels == [0] * 6 + [9] * 6  # every output encoded at the job's level
    # (the sizes cannot tell: the tiny model's 16 px outputs are noise, which no zlib level
    # compresses; tests/pipeline/test_images.py shows the sizes on a realistic image)


def test_the_lossy_quality_reaches_the_outputs(tiny_vp, tiny_vp_dir, tmp_path):
    """output.jpeg_quality / webp_quality are what each output is encoded with: a JPEG's
    quantization tables are those Pillow writes at that quality."""
    shards = write_shards(tmp_path / "in", n_shards=1, per_shard=2, bad=False, seed=3)
    grey = np.full((16, 16, 3), 128, np.uint8)
    outputs = {}
    for fmt, quality in (("jpg", 95), ("jpg", 30), ("webp", 95), ("webp", 30)):
        out = tmp_path / f"{fmt}{quality}"
        field = "jpeg_quality" if fmt == "jpg" else "webp_quality"
        spec = make_spec(tiny_vp_dir, shards, out,
                         output={"image_format": fmt, field: quality})
        ShardWorker(spec, model=tiny_vp).process(shards[0])
        outputs[fmt, quality] = [data for name, data in sorted(_tar_members(
            out / "shards" / "part-000000.tar").items()) if name.endswith(f".{fmt}")]
        assert len(outputs[fmt, quality]) == 2
    for quality in (95, 30):
        with Image.open(io.BytesIO(encode_image(grey, "jpg", quality=quality))) as reference:
            tables = reference.quantization
        for data in outputs["jpg", quality]:
            with Image.open(io.BytesIO(data)) as image:
                assert image.quantization == tables
    assert all(a != b for a, b in zip(outputs["webp", 95], outputs["webp", 30], strict=True))


def test_host_threads_from_the_job_or_the_actors_cpus(tiny_vp, tiny_vp_dir, tmp_path):
    shards = write_shards(tmp_path / "in", n_shards=1, per_shard=2, bad=False)

    def pool_size(threads=None, **compute):
        worker = ShardWorker(make_spec(tiny_vp_dir, shards, tmp_path, compute=compute),
                             model=tiny_vp, threads=threads)
        worker.host.shutdown()
        return worker.host_threads, worker.host._max_workers

    try:
        assert pool_size(host_threads=3) == (3, 3) == pool_size(threads=1, host_threads=3)
        assert pool_size(threads=1) == (2, 2)  # at least 2: one decodes while one encodes
        assert pool_size(threads=4) == (4, 4)  # else the actor's CPUs
    finally:
        torch.set_num_threads(1)  # as tests/support/model_fixtures.py sets it


def _idle(worker: ShardWorker) -> None:
    """Wait until every host thread of `worker` is free (all earlier jobs have ended)."""
    barrier = threading.Barrier(worker.host_threads)
    for future in [worker.host.submit(barrier.wait, 10) for _ in range(worker.host_threads)]:
        future.result(timeout=30)


def test_an_aborted_shard_leaves_no_thread_and_a_zero_gauge_while_the_other_works(
        tiny_vp, tiny_vp_dir, tmp_path, monkeypatch):
    """Shard B computes; shard A aborts (decoding one of its samples raises: a bug) while
    decodes of its later samples are still running in the host pool. Those finish after the
    abort: they must not count on the worker's gauge, and A's reader thread has ended."""
    big, small = write_shards(tmp_path / "in", n_shards=2, per_shard=30, bad=False)
    spec = make_spec(tiny_vp_dir, [big, small], tmp_path / "out", compute={"batch_size": 2})
    worker = ShardWorker(spec, model=tiny_vp)
    decode = reader.decode_sample
    aborted_at: list[float] = []

    def slow_for_shard_1(raw, *args, **kwargs):
        key = raw.key
        if key == "s1_001":
            raise RuntimeError("a bug in decoding")
        if key.startswith("s1_"):
            time.sleep(0.3)
        return decode(raw, *args, **kwargs)

    monkeypatch.setattr(reader, "decode_sample", slow_for_shard_1)
    results: dict[str, object] = {}

    def run(url):
        try:
            results[url] = worker.process(url)
        except Exception as exc:
            aborted_at.append(time.monotonic())
            results[url] = exc

    first = threading.Thread(target=run, args=(big,))
    first.start()
    time.sleep(0.1)  # B takes the device first
    run(small)
    first.join(timeout=120)
    finished_b = time.monotonic()
    assert isinstance(results[small], RuntimeError), results[small]
    assert aborted_at[0] < finished_b  # A aborted while B was still at work
    assert not [t for t in threading.enumerate() if t.name == "shard-reader"]
    _idle(worker)  # A's decodes that were in flight have finished by now
    assert worker.in_flight.value == 0
    assert results[big].outputs_ok == 30
    assert not (tmp_path / "out" / "done" / "part-000001.json").exists()
    worker.close()


def test_at_most_two_shards_at_once_and_close_ends_the_workers_threads(
        tiny_vp, tiny_vp_dir, tmp_path):
    shards = write_shards(tmp_path / "in", n_shards=3, per_shard=2, bad=False)
    inside, most = [0], [0]
    lock = threading.Lock()

    class Counting(testhooks.Hooks):
        def before_read(self, stem):
            with lock:
                inside[0] += 1
                most[0] = max(most[0], inside[0])
            time.sleep(0.3)
            with lock:
                inside[0] -= 1

    before = {t.ident for t in threading.enumerate()}
    worker = ShardWorker(make_spec(tiny_vp_dir, shards, tmp_path / "out"), model=tiny_vp,
                         hooks=Counting())
    threads = [threading.Thread(target=worker.process, args=(url,)) for url in shards]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert most[0] == 2  # the third call waited for a slot
    assert len(list((tmp_path / "out" / "done").iterdir())) == 3
    assert [t for t in threading.enumerate() if t.ident not in before
            and t.name.startswith("sdedit-host")]
    worker.close()
    worker.close()  # idempotent
    assert not [t for t in threading.enumerate() if t.ident not in before
                and t.name.startswith(("sdedit-host", "sdedit-noise", "shard-reader"))]
    with pytest.raises(RuntimeError, match="after close"):
        worker.process(shards[0])


def test_one_noise_pool_serves_every_batch_and_outputs_stay_the_same(
        tiny_vp_dir, tmp_path, monkeypatch):
    """The issue's case: PrefetchNoise started a thread pool for every batch."""
    from sdedit import load_model

    shards = write_shards(tmp_path / "in", n_shards=1, per_shard=7, bad=False, seed=2)
    tars = {}
    for threads in (0, 2):
        model = load_model(tiny_vp_dir).accelerate(noise_threads=threads)
        out = tmp_path / f"out{threads}"
        with ShardWorker(make_spec(tiny_vp_dir, shards, out, compute={"batch_size": 2}),
                         model=model) as worker:
            started = []
            original = accel.ThreadPoolExecutor

            class Counted(original):
                def __init__(self, *args, started=started, **kwargs):
                    started.append(1)
                    super().__init__(*args, **kwargs)

            monkeypatch.setattr(accel, "ThreadPoolExecutor", Counted)
            worker.process(shards[0])
            monkeypatch.setattr(accel, "ThreadPoolExecutor", original)
            assert started == [], f"{len(started)} pools started for 4 batches"
            assert (worker.noise_pool is None) == (threads == 0)
        tars[threads] = (out / "shards" / "part-000000.tar").read_bytes()
    assert tars[0] == tars[2]  # noise drawn ahead in the shared pool: the same values
