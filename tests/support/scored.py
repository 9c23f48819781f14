"""A small output with score sidecars, made by the worker without Ray: two shards whose keys
repeat across them (k0 in both), two outputs per input, per-row t0 of a sweep."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds

from pipeline.job.spec import JobSpec
from pipeline.output.jobrecord import prepare_output
from pipeline.worker.shard import ShardWorker
from tests.support.shards import make_spec, png

T0S = (0.03, 0.05)
"""The sweep's t0, alternating by key."""


def sweep_shards(root: Path, size: int = 16) -> list[str]:
    """in-0.tar keys k0-k2, in-1.tar keys k0, k3, k4 (k0 repeats across shards); each key's
    {key}.json sets its t0 (T0S alternating)."""
    rng = np.random.default_rng(3)
    urls = []
    root.mkdir(parents=True, exist_ok=True)
    for shard, keys in enumerate((["k0", "k1", "k2"], ["k0", "k3", "k4"])):
        url = str(root / f"in-{shard}.tar")
        with wds.TarWriter(url) as tar:
            for i, key in enumerate(keys):
                guide = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                tar.write({"__key__": key, "png": png(guide),
                           "json": json.dumps({"t0": T0S[i % 2]}).encode()})
        urls.append(url)
    return urls


def score_section(clip_dir: Path, aesthetic: Path, **more: Any) -> dict[str, Any]:
    return {"metrics": ["ssim", "clip_score", "aesthetic", "embedding"],
            "clip_model": str(clip_dir), "aesthetic_model": str(aesthetic),
            "prompt": "a photo of a room", **more}


def make_output(tmp: Path, model: Any, model_dir: Path, clip_dir: Path | None = None,
                aesthetic: Path | None = None) -> JobSpec:
    """The output of the sweep shards at tmp/out (job.json written as run writes it), scored
    when `clip_dir` and `aesthetic` are given; returns its spec."""
    shards = sweep_shards(tmp / "in")
    sections: dict[str, Any] = {"sdedit": {"samples_per_input": 2}}
    if clip_dir is not None and aesthetic is not None:
        sections["score"] = score_section(clip_dir, aesthetic)
    spec = make_spec(model_dir, shards, tmp / "out", **sections)
    prepare_output(spec, overwrite=False)
    if spec.score.enabled:
        from pipeline.output.folder import OutputFolder
        from pipeline.output.scorerecord import prepare_scores

        prepare_scores(OutputFolder.of(spec), spec.score.settings(), overwrite=False)
    with ShardWorker(spec, model=model) as worker:
        for url in shards:
            worker.process(url)
    return spec
