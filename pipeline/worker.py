"""ShardWorker: read -> decode -> batch -> edit -> encode -> write -> commit, pipelined.

One ShardWorker holds one loaded model and edits whole input shards; a Ray actor
(pipeline/runner.py) wraps it, tests call it directly. Two shards may be processed at once
(from two threads): the second reads and decodes while the first computes, and computes while
the first encodes its last outputs and commits (`stages.DeviceTurns`). Within a shard, decoding
(host pool), the device, and encoding (host pool) overlap; outputs are written in the order of
the serial loop, so tars and pixels are what the serial loop wrote.

What is the worker's own in issue 11 (the rest is in reader.py, images.py and writer.py):
`_batches` turns samples that cannot be edited into error rows (with their `error_kind`);
`split_on_oom` splits a batch that runs out of device memory in halves, recursively, and a
single sample that still does becomes a "device" error row; every row carries the job-constant
`columns` (absolute model location, model identity, dtype, eta) and its `batch_size` (the
samples of the network call that made it).

Memory per shard is bounded, in decoded images: `depth` read ahead + `2 * batch` waiting in
size buckets + `batch` prepared ahead + `batch` on the device + `window` being encoded
(depth = window = 2 * batch), so at most 2 * 8 * batch for an actor's two shards (see
`ShardWorker.max_in_flight`).
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from pipeline import testhooks
from pipeline.oom import EditFailure, split_on_oom
from pipeline.reader import Sample, read_shard
from pipeline.shards import shard_stem
from pipeline.spec import JobSpec
from pipeline.stages import DeviceTurns, Gauge, OrderedSink, Timings
from pipeline.storage import absolute_url, url_fs, with_retries
from pipeline.writer import ShardOutput, model_location, now, output_sample, output_urls
from sdedit import DiffusionModel, edit, load_model
from sdedit.devices import dtype_name, resolve_device, resolve_dtype
from sdedit.edit import NoiseSource, count_steps, noise_for

logger = logging.getLogger(__name__)

def output_seed(job_seed: int, key: str, index: int) -> int:
    """The 63-bit seed of one output, from (job seed, input key, output index)."""
    digest = hashlib.sha256(f"{job_seed}\x00{key}\x00{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & (2**63 - 1)


@dataclass
class _Job:
    """One output to make: a sample of a shard, its output index, seed and key."""

    sample: Sample
    input_shard: str
    index: int
    seed: int
    output_key: str


@dataclass
class _Done:
    """One output as it leaves the device: the job, its pixels and what it cost."""

    job: _Job
    edited: torch.Tensor  # float32 (3, H, W) in [-1, 1], on the CPU
    seconds: float        # device seconds per output of its batch
    batch_size: int       # samples in the network call that made it

    def pixels(self) -> np.ndarray:
        """uint8 (H, W, 3): the edited image rounded to 8 bits."""
        rgb = ((self.edited + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
        return rgb.permute(1, 2, 0).numpy()


@dataclass
class _Prepared:
    """A batch ready for the device: guides float32 (B, 3, H, W) in [-1, 1], masks float32
    (B, 1, H, W) in {0, 1} or None, one seed per job, and the batch's noise source."""

    batch: list[_Job]
    images: torch.Tensor
    masks: torch.Tensor | None
    seeds: list[int]
    noise: NoiseSource


@dataclass
class _Encoded:
    """One output as it leaves the encoder: its tar sample, or why it has none."""

    done: _Done
    metadata: dict[str, Any]
    sample: dict[str, Any] | None
    error: str | None = None
    size: tuple[int, int] = (0, 0)  # (H, W)


@dataclass
class ShardStats:
    """What a committed shard holds; written into its done marker."""

    stem: str
    input_shard: str
    samples: int = 0
    outputs_ok: int = 0
    outputs_error: int = 0
    errors_by_kind: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    worker: str = ""
    skipped: bool = False
    timings: dict[str, float] = field(default_factory=dict)
    in_flight_max: int = 0


class ShardWorker:
    """Edits whole input shards with one loaded model.

    Args:
        spec: the validated job.
        model: a loaded model (or None to load `spec.model.source` on the resolved device).
        worker_id: recorded in manifests and markers (default host:pid).
        threads: torch intra-op threads (CPU actors get their CPU share).
        host_threads: threads decoding and encoding (default `compute.host_threads`, else
            max(2, threads)).
    """

    def __init__(self, spec: JobSpec, model: DiffusionModel | None = None,
                 worker_id: str | None = None, threads: int | None = None,
                 host_threads: int | None = None) -> None:
        if threads:
            torch.set_num_threads(max(1, int(threads)))
        self.spec = spec
        self.hooks = testhooks.from_env()
        fake_gpu = self.hooks is not None and self.hooks.fake_gpu and spec.compute.device == "cuda"
        device = resolve_device("cpu" if fake_gpu else spec.compute.device)
        self.model = model or load_model(
            spec.model.source, device=device,
            dtype=resolve_dtype(spec.compute.dtype, device),
            storage_options=dict(spec.model.storage_options) or None)
        if self.hooks is not None:
            self.hooks.install(self.model)
        self.worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}"
        self.fingerprint = spec.fingerprint()
        sd = spec.sdedit
        self.columns: dict[str, Any] = {
            "t0": sd.t0, "sampler": sd.sampler, "steps": self._steps(sd.t0),
            "repeats": sd.repeats, "eta": sd.eta, "model": model_location(spec.model.source),
            "model_identity": self.model.identity or None, "dtype": dtype_name(self.model.dtype),
            "worker": self.worker_id}
        """Manifest columns that are the same for every row of this worker."""
        self.host_threads = host_threads or spec.compute.host_threads or max(2, threads or 1)
        self.host = ThreadPoolExecutor(self.host_threads, thread_name_prefix="sdedit-host")
        self.turns = DeviceTurns()
        self.in_flight = Gauge()
        batch = spec.compute.batch_size
        self.depth = self.window = 2 * batch
        self.max_in_flight = 2 * (self.depth + 2 * batch + 2 * batch + self.window)
        """The bound on decoded images alive in this worker (two shards)."""
        self.model.warm_up(batch)  # the first shard pays no allocator / kernel-selection cost

    def process(self, url: str, progress: Callable[[int], None] | None = None) -> ShardStats:
        """Edit every sample of the shard at `url` and commit its outputs.

        A shard whose marker already exists is not redone (`skipped=True`). Safe to call from
        two threads at once (the actor's two shard slots). No sample fails the shard: each one
        that cannot be edited is an error row (see `_batches`, `split_on_oom`).
        Raises:
            ShardError: the tar is unreadable or truncated (the runner retries the shard);
            any error of writing: the shard is aborted, nothing of it is committed.
        """
        start = time.perf_counter()
        stem = shard_stem(url)
        if self._committed(stem):
            logger.info("shard %s already committed; skipping", stem)
            return ShardStats(stem=stem, input_shard=url, worker=self.worker_id, skipped=True)
        writer = ShardOutput(self.spec.output.path, stem, self.spec.output.storage_options)
        stats = ShardStats(stem=stem, input_shard=absolute_url(url), worker=self.worker_id)
        timings = Timings()
        gauge = Gauge(parent=self.in_flight)  # this shard's decoded images alive
        sink: OrderedSink[_Encoded] = OrderedSink(
            self.host, lambda item: self._write(item, writer, stats, timings, progress, gauge),
            self.window)
        token = object()
        self.turns.arrive(token)
        try:
            try:
                self._compute(url, stem, writer, stats, timings, sink, token, gauge)
            finally:
                self.turns.leave(token)
            with timings.measure("wait_encode"):
                sink.finish()
            stats.seconds = time.perf_counter() - start
            stats.timings = {k: round(v, 4) for k, v in sorted(timings.seconds.items())}
            stats.in_flight_max = self.in_flight.peak
            with timings.measure("commit"):
                writer.commit(self._marker(stats, writer))
        except BaseException:
            sink.cancel()
            writer.abort()
            gauge.add(-gauge.value)  # nothing of this shard stays alive
            raise
        return stats

    def _compute(self, url: str, stem: str, writer: ShardOutput, stats: ShardStats,
                 timings: Timings, sink: OrderedSink[Any], token: object,
                 gauge: Gauge) -> None:
        """Read, batch and edit the shard; each output goes to the sink to be encoded."""
        inp = self.spec.input
        samples = read_shard(url, inp.storage_options, inp.image, inp.mask, pool=self.host,
                             depth=self.depth, gauge=gauge, max_pixels=inp.max_pixels)
        encode = timings.timed("encode", self._encode)
        prepare = timings.timed("prepare", self._prepare)
        ahead: Future[_Prepared] | None = None  # the next batch, made ready in the host pool
        batches = self._batches(samples, writer, stats, timings, gauge)
        for batch in itertools.chain(batches, [None]):  # lazily: one batch ahead, no more
            following = None if batch is None else self.host.submit(prepare, batch)
            if ahead is not None:
                with timings.measure("wait_prepare"):
                    prepared = ahead.result()
                with self.turns.turn(token) as waited, timings.measure("device"):
                    timings.add("wait_device", waited)
                    done = self._edit(prepared, writer, stats, gauge)
                for item in done:
                    sink.submit(encode, item)
                if self.hooks is not None:
                    self.hooks.after_batch(stem, stats.outputs_ok + stats.outputs_error
                                           + len(sink.pending))
            ahead = following

    def _committed(self, stem: str) -> bool:
        url = output_urls(self.spec.output.path, stem)["marker"]
        fs, path = url_fs(url, self.spec.output.storage_options)
        return bool(with_retries(lambda: fs.exists(path), what="check done marker", url=url))

    def _batches(self, samples: Iterator[Sample], writer: ShardOutput, stats: ShardStats,
                 timings: Timings, gauge: Gauge) -> Iterator[list[_Job]]:
        """Group editable (sample, output index) jobs by image size into batches.

        At most 2 * batch jobs wait in size buckets: beyond that the largest bucket goes as a
        partial batch (many distinct sizes cannot hold a shard in memory)."""
        sd = self.spec.sdedit
        size = self.spec.compute.batch_size
        buckets: dict[tuple[int, ...], list[_Job]] = {}
        waiting = 0
        while True:
            with timings.measure("wait_input"):
                sample = next(samples, None)
            if sample is None:
                break
            stats.samples += 1
            if sample.error is None:
                sample.error = self._size_problem(sample)
                sample.error_kind = "size" if sample.error else None
            if sample.error is not None:
                for index in range(sd.samples_per_input):
                    self._error_row(writer, stats, sample, index,
                                    sample.error_kind or "decode", sample.error)
                gauge.add(-1)
                continue
            shape = sample.guide.shape  # type: ignore[union-attr]
            for index in range(sd.samples_per_input):
                job = _Job(sample, stats.input_shard, index,
                           output_seed(sd.seed, sample.key, index),
                           self._output_key(sample.key, index))
                bucket = buckets.setdefault(shape, [])
                bucket.append(job)
                waiting += 1
                if len(bucket) == size:
                    waiting -= size
                    yield buckets.pop(shape)
                elif waiting > 2 * size:
                    largest = max(buckets, key=lambda s: len(buckets[s]))
                    waiting -= len(buckets[largest])
                    yield buckets.pop(largest)
        yield from buckets.values()

    def _output_key(self, key: str, index: int) -> str:
        return key if self.spec.sdedit.samples_per_input == 1 else f"{key}_{index:02d}"

    def _size_problem(self, sample: Sample) -> str | None:
        assert sample.guide is not None
        h, w = sample.guide.shape[:2]
        f = self.model.downsample_factor
        if h % f or w % f:
            return (f"image size {w}x{h} cannot be taken by model {self.spec.model.source}; "
                    f"allowed: width and height multiples of {f}")
        return None

    def _prepare(self, batch: list[_Job]) -> _Prepared:
        """A batch's tensors, and its noise already being drawn (runs in the host pool while
        the device works on the batch before)."""
        guides = np.stack([job.sample.guide for job in batch])  # (B, H, W, 3) uint8
        images = torch.from_numpy(guides).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        masks = None
        if batch[0].sample.mask is not None:
            masks = torch.from_numpy(np.stack([job.sample.mask for job in batch]))[:, None].float()
        seeds = [job.seed for job in batch]
        return _Prepared(batch, images, masks, seeds,
                         noise_for(self.model, seeds, *images.shape[2:]))

    def _edit(self, prepared: _Prepared, writer: ShardOutput, stats: ShardStats,
              gauge: Gauge) -> list[_Done]:
        """Edit one batch on the device (split in halves when it runs out of memory); float
        outputs on the CPU, or error rows for the outputs the engine refuses (a problem of
        these inputs, not of the shard) or that run out of memory alone."""
        done: list[_Done] = []
        indices = list(range(len(prepared.batch)))
        started = time.perf_counter()
        for part, result in split_on_oom(indices, lambda rows: self._run(prepared, rows)):
            if isinstance(result, EditFailure):
                for row in part:
                    job = prepared.batch[row]
                    self._error_row(writer, stats, job.sample, job.index, result.kind,
                                    result.message, batch_size=len(part))
                    self._release(job, gauge)
            else:
                seconds = (time.perf_counter() - started) / len(part)
                done += [_Done(prepared.batch[row], edited, seconds, len(part))
                         for row, edited in zip(part, result, strict=True)]
            started = time.perf_counter()
        return done

    def _run(self, prepared: _Prepared, rows: Sequence[int]) -> torch.Tensor | EditFailure:
        """float32 (len(rows), 3, H, W) outputs on the CPU of these rows of a prepared batch
        (all of them: with its noise drawn ahead), or the engine's refusal of the inputs.

        Raises:
            torch.OutOfMemoryError: the device ran out of memory (see `split_on_oom`).
        """
        sd = self.spec.sdedit
        whole = len(rows) == len(prepared.batch)
        index = torch.tensor(list(rows))
        images = prepared.images if whole else prepared.images[index]
        masks = prepared.masks if whole or prepared.masks is None else prepared.masks[index]
        try:
            out = edit(self.model, images, t0=sd.t0, seeds=[prepared.seeds[r] for r in rows],
                       sampler=sd.sampler, steps=sd.steps, masks=masks, repeats=sd.repeats,
                       eta=sd.eta, noise=prepared.noise if whole else None)
        except ValueError as exc:
            return EditFailure("edit", str(exc))
        return out.cpu()  # converted to 8 bits per output, in the host pool (`_Done.pixels`)

    def _encode(self, done: _Done) -> _Encoded:
        """Metadata and the encoded tar sample of one output, or why it cannot be encoded (its
        size or content: that output's error row, not the shard's); runs in the host pool."""
        sample, out = done.job.sample, self.spec.output
        assert sample.guide is not None and sample.members is not None
        pixels = done.pixels()
        metadata = self._metadata(done.job, faithfulness_l2(pixels, sample.guide, sample.mask))
        keep = out.include_guide
        try:
            encoded = output_sample(
                done.job.output_key, pixels, metadata,
                guide=sample.guide if keep else None,
                guide_png=sample.guide_png if keep else None,
                mask=sample.mask if keep else None,
                target=sample.members.get("target") if keep else None,
                image_format=out.image_format, png_compress_level=out.png_compress_level)
        except (OSError, ValueError) as exc:
            return _Encoded(done, metadata, None,
                            f"cannot encode the output as {out.image_format}: {exc}; allowed: "
                            "an output size the format can hold")
        return _Encoded(done, metadata, encoded, size=pixels.shape[:2])

    def _metadata(self, job: _Job, l2: float) -> dict[str, Any]:
        """The output's `{key}.json` (also the first fields of its manifest row)."""
        return {"key": job.sample.key, "output_key": job.output_key, "sample_index": job.index,
                "seed": job.seed,
                **{k: self.columns[k] for k in ("t0", "sampler", "steps", "repeats", "eta",
                                                "model", "model_identity")},
                "input_shard": job.input_shard, "faithfulness_l2": round(l2, 6)}

    def _write(self, item: _Encoded, writer: ShardOutput, stats: ShardStats, timings: Timings,
               progress: Callable[[int], None] | None, gauge: Gauge) -> None:
        """Append one encoded output to the tar and its manifest row (in processing order)."""
        job = item.done.job
        if item.sample is None:
            self._error_row(writer, stats, job.sample, job.index, "encode", item.error or "",
                            batch_size=item.done.batch_size)
        else:
            if self.hooks is not None:
                self.hooks.before_write(writer.stem)
            with timings.measure("write"):
                writer.add_sample(item.sample)
            h, w = item.size
            writer.add_row({**self.columns, **item.metadata,
                            "output_shard": absolute_url(writer.urls["tar"]), "status": "ok",
                            "width": w, "height": h, "seconds": item.done.seconds,
                            "batch_size": item.done.batch_size, "created_at": now()})
            stats.outputs_ok += 1
        self._release(job, gauge)
        if progress is not None:
            progress(1)

    def _release(self, job: _Job, gauge: Gauge) -> None:
        """The last output of a sample is done: its decoded image is no longer in flight."""
        if job.index == self.spec.sdedit.samples_per_input - 1:
            gauge.add(-1)

    def _steps(self, t0: float) -> int | None:
        """Network evaluations per round of an output started at t0 (None: t0 is invalid)."""
        sd = self.spec.sdedit
        try:
            return count_steps(self.model, sd.sampler, t0, sd.steps)
        except ValueError:
            return None

    def _error_row(self, writer: ShardOutput, stats: ShardStats, sample: Sample, index: int,
                   kind: str, error: str, batch_size: int | None = None) -> None:
        """One error row (`kind`: one of `pipeline.writer.ERROR_KINDS`)."""
        okey = self._output_key(sample.key, index)
        h, w = sample.guide.shape[:2] if sample.guide is not None else (None, None)
        writer.add_row({**self.columns, "key": sample.key, "output_key": okey,
                        "sample_index": index, "input_shard": stats.input_shard,
                        "output_shard": None, "status": "error", "error": error,
                        "error_kind": kind,
                        "seed": output_seed(self.spec.sdedit.seed, sample.key, index),
                        "width": w, "height": h, "batch_size": batch_size,
                        "created_at": now()})
        stats.outputs_error += 1
        stats.errors_by_kind[kind] = stats.errors_by_kind.get(kind, 0) + 1
        logger.warning("sample %s: %s", okey, error)

    def _marker(self, stats: ShardStats, writer: ShardOutput) -> dict[str, Any]:
        return {"stem": stats.stem, "input_shard": stats.input_shard,
                "output_shard": absolute_url(writer.urls["tar"]),
                "manifest": absolute_url(writer.urls["manifest"]),
                "samples": stats.samples, "outputs_ok": stats.outputs_ok,
                "outputs_error": stats.outputs_error,
                "errors_by_kind": dict(sorted(stats.errors_by_kind.items())),
                "seconds": round(stats.seconds, 3),
                "timings": stats.timings, "in_flight_max": stats.in_flight_max,
                "worker": stats.worker, "fingerprint": self.fingerprint,
                "created_at": now().isoformat()}


def faithfulness_l2(output: np.ndarray, guide: np.ndarray, mask: np.ndarray | None) -> float:
    """RMS difference of output and guide, uint8 (H, W, 3) each, in 0..255 units; inside the
    mask (uint8 (H, W) in {0, 1}) when it regenerates anything."""
    diff = output.astype(np.int32) - guide.astype(np.int32)
    if mask is not None and mask.any():
        diff = diff[mask.astype(bool)]
    return float(np.sqrt(np.mean(diff * diff)))
