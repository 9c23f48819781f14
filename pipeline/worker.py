"""ShardWorker: read -> batch -> edit -> write one input shard. Usable without Ray.

A Ray actor (pipeline/runner.py) wraps one ShardWorker; tests call it directly.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from pipeline import testhooks
from pipeline.reader import Sample, read_shard
from pipeline.shards import shard_stem
from pipeline.spec import JobSpec
from pipeline.storage import url_fs, with_retries
from pipeline.writer import ShardOutput, now, output_urls
from sdedit import DiffusionModel, edit, load_model
from sdedit.devices import resolve_device, resolve_dtype
from sdedit.edit import count_steps

logger = logging.getLogger(__name__)

def output_seed(job_seed: int, key: str, index: int) -> int:
    """The 63-bit seed of one output, from (job seed, input key, output index)."""
    digest = hashlib.sha256(f"{job_seed}\x00{key}\x00{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & (2**63 - 1)


@dataclass
class _Job:
    sample: Sample
    index: int
    seed: int
    output_key: str


@dataclass
class ShardStats:
    """What a committed shard holds; written into its done marker."""

    stem: str
    input_shard: str
    samples: int = 0
    outputs_ok: int = 0
    outputs_error: int = 0
    seconds: float = 0.0
    worker: str = ""
    skipped: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


class ShardWorker:
    """Edits whole input shards with one loaded model.

    Args:
        spec: the validated job.
        model: a loaded model (or None to load `spec.model.source` on the resolved device).
        worker_id: recorded in manifests and markers (default host:pid).
        threads: torch intra-op threads (CPU actors get their CPU share).
    """

    def __init__(self, spec: JobSpec, model: DiffusionModel | None = None,
                 worker_id: str | None = None, threads: int | None = None) -> None:
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
        self._warm_up()

    def _warm_up(self) -> None:
        """One network call at the job's batch size, so the first shard pays no allocator or
        kernel-selection cost (outputs are unaffected)."""
        self.model.warm_up(self.spec.compute.batch_size)

    def process(self, url: str, progress: Callable[[int], None] | None = None) -> ShardStats:
        """Edit every sample of the shard at `url` and commit its outputs.

        A shard whose marker already exists is not redone (`skipped=True`).
        Raises:
            ShardError: the tar is unreadable or truncated (the runner retries the shard).
        """
        start = time.perf_counter()
        stem = shard_stem(url)
        out = self.spec.output
        if self._committed(stem):
            logger.info("shard %s already committed; skipping", stem)
            return ShardStats(stem=stem, input_shard=url, worker=self.worker_id, skipped=True)
        writer = ShardOutput(out.path, stem, out.storage_options, out.image_format,
                             out.include_guide)
        stats = ShardStats(stem=stem, input_shard=url, worker=self.worker_id)
        try:
            inp = self.spec.input
            samples = read_shard(url, inp.storage_options, inp.image, inp.mask)
            for batch in self._batches(samples, writer, stats):
                self._run_batch(batch, writer, stats)
                if progress is not None:
                    progress(len(batch))
                if self.hooks is not None:
                    self.hooks.after_batch(stem, stats.outputs_ok + stats.outputs_error)
            stats.seconds = time.perf_counter() - start
            writer.commit(self._marker(stats, writer))
        except BaseException:
            writer.abort()
            raise
        return stats

    def _steps(self, t0: float) -> int | None:
        """Network evaluations per round of an output started at t0 (None: t0 is invalid)."""
        sd = self.spec.sdedit
        try:
            return count_steps(self.model, sd.sampler, t0, sd.steps)
        except ValueError:
            return None

    def _committed(self, stem: str) -> bool:
        fs, path = url_fs(output_urls(self.spec.output.path, stem)["marker"],
                          self.spec.output.storage_options)
        return bool(with_retries(lambda: fs.exists(path), what="check done marker",
                                 url=output_urls(self.spec.output.path, stem)["marker"]))

    def _batches(self, samples: Iterator[Sample], writer: ShardOutput,
                 stats: ShardStats) -> Iterator[list[_Job]]:
        """Group editable (sample, output index) jobs by image size into batches."""
        sd = self.spec.sdedit
        size = self.spec.compute.batch_size
        buckets: dict[tuple[int, ...], list[_Job]] = {}
        for sample in samples:
            stats.samples += 1
            if sample.error is None:
                sample.error = self._size_problem(sample)
            for index in range(sd.samples_per_input):
                okey = sample.key if sd.samples_per_input == 1 else f"{sample.key}_{index:02d}"
                if sample.error is not None:
                    self._error_row(writer, stats, sample, index, okey, sample.error)
                    continue
                job = _Job(sample, index, output_seed(sd.seed, sample.key, index), okey)
                bucket = buckets.setdefault(sample.guide.shape, [])  # type: ignore[union-attr]
                bucket.append(job)
                if len(bucket) == size:
                    yield buckets.pop(sample.guide.shape)  # type: ignore[union-attr]
        yield from buckets.values()

    def _size_problem(self, sample: Sample) -> str | None:
        assert sample.guide is not None
        h, w = sample.guide.shape[:2]
        f = self.model.downsample_factor
        if h % f or w % f:
            return (f"image size {w}x{h} cannot be taken by model {self.spec.model.source}; "
                    f"allowed: width and height multiples of {f}")
        return None

    def _run_batch(self, batch: list[_Job], writer: ShardOutput, stats: ShardStats) -> None:
        sd = self.spec.sdedit
        started = time.perf_counter()
        guides = np.stack([job.sample.guide for job in batch])  # (B, H, W, 3) uint8
        images = torch.from_numpy(guides).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        masks = None
        if batch[0].sample.mask is not None:
            masks = torch.from_numpy(np.stack([job.sample.mask for job in batch]))[:, None].float()
        try:
            out = edit(self.model, images, t0=sd.t0, seeds=[job.seed for job in batch],
                       sampler=sd.sampler, steps=sd.steps, masks=masks, repeats=sd.repeats,
                       eta=sd.eta)
        except ValueError as exc:  # a problem of these inputs, not of the shard
            for job in batch:
                self._error_row(writer, stats, job.sample, job.index, job.output_key, str(exc))
            return
        outputs = ((out + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
        outputs = outputs.permute(0, 2, 3, 1).cpu().numpy()
        seconds = (time.perf_counter() - started) / len(batch)
        for job, output in zip(batch, outputs, strict=True):
            sample = job.sample
            assert sample.guide is not None and sample.members is not None
            diff = output.astype(np.float64) - sample.guide.astype(np.float64)
            if sample.mask is not None and sample.mask.any():
                diff = diff[sample.mask.astype(bool)]
            l2 = float(np.sqrt(np.mean(diff**2)))
            meta = {"key": sample.key, "output_key": job.output_key,
                    "sample_index": job.index, "seed": job.seed, "t0": sd.t0,
                    "sampler": sd.sampler, "steps": self._steps(sd.t0),
                    "repeats": sd.repeats,
                    "model": self.spec.model.source, "input_shard": stats.input_shard,
                    "faithfulness_l2": round(l2, 6)}
            writer.add_output(job.output_key, output, sample.guide, sample.members,
                              sample.mask, meta)
            h, w = output.shape[:2]
            writer.add_row({**meta, "output_shard": writer.urls["tar"], "status": "ok",
                            "width": w, "height": h, "seconds": seconds,
                            "worker": self.worker_id, "created_at": now()})
            stats.outputs_ok += 1

    def _error_row(self, writer: ShardOutput, stats: ShardStats, sample: Sample, index: int,
                   okey: str, error: str) -> None:
        sd = self.spec.sdedit
        h, w = sample.guide.shape[:2] if sample.guide is not None else (None, None)
        writer.add_row({"key": sample.key, "output_key": okey, "sample_index": index,
                        "input_shard": stats.input_shard, "output_shard": None,
                        "status": "error", "error": error,
                        "seed": output_seed(sd.seed, sample.key, index), "t0": sd.t0,
                        "sampler": sd.sampler, "steps": self._steps(sd.t0),
                    "repeats": sd.repeats,
                        "model": self.spec.model.source, "width": w, "height": h,
                        "worker": self.worker_id, "created_at": now()})
        stats.outputs_error += 1
        logger.warning("sample %s: %s", okey, error)

    def _marker(self, stats: ShardStats, writer: ShardOutput) -> dict[str, Any]:
        return {"stem": stats.stem, "input_shard": stats.input_shard,
                "output_shard": writer.urls["tar"], "manifest": writer.urls["manifest"],
                "samples": stats.samples, "outputs_ok": stats.outputs_ok,
                "outputs_error": stats.outputs_error, "seconds": round(stats.seconds, 3),
                "worker": stats.worker, "fingerprint": self.fingerprint,
                "created_at": now().isoformat()}
