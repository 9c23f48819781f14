"""Small input WebDataset shards for pipeline tests, written with webdataset.TarWriter."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import webdataset as wds
import yaml

from pipeline.images import encode_image
from pipeline.job.load import parse_spec
from pipeline.job.spec import JobSpec


def png(array: np.ndarray) -> bytes:
    """PNG bytes of a uint8 (H, W, 3) or (H, W) array."""
    return encode_image(array, "png")


def write_shards(root: Path, n_shards: int = 3, per_shard: int = 4, size: int = 16,
                 bad: bool = True, masks: bool = False, seed: int = 0) -> list[str]:
    """Shards root/part-00000{i}.tar of random RGB guides (keys s{shard}_{i:03d}).

    With `bad`: shard 1 holds an undecodable image (key s1_001) and shard 2 a sample without
    its guide member (key s2_002, only a .txt). With `masks`: every sample has a mask.png
    (left half white = regenerate).
    """
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    urls = []
    for s in range(n_shards):
        url = root / f"part-{s:06d}.tar"
        with wds.TarWriter(str(url)) as writer:
            for i in range(per_shard):
                key = f"s{s}_{i:03d}"
                sample = {"__key__": key}
                if bad and s == 1 and i == 1:
                    sample["png"] = b"this is not a png"
                elif bad and s == 2 and i == 2:
                    sample["txt"] = b"no guide here"
                else:
                    sample["png"] = png(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
                    if masks:
                        mask = np.zeros((size, size), np.uint8)
                        mask[:, : size // 2] = 255
                        sample["mask.png"] = png(mask)
                writer.write(sample)
        urls.append(str(url))
    return urls


def job_data(model_dir: Path, shards: str | list[str], out: Path, name: str = "test-job",
             **sections: dict) -> dict:
    """A job mapping for the tiny model: t0 0.04 (40 steps), CPU, one actor, batch 3; each
    of `sections` updates the section of its name."""
    data = {
        "name": name,
        "model": {"source": str(model_dir)},
        "input": {"shards": shards},
        "output": {"path": str(out)},
        "sdedit": {"t0": 0.04, "sampler": "ddpm", "seed": 7},
        "compute": {"device": "cpu", "batch_size": 3, "actors": 1, "shard_retries": 1,
                    "cpus_per_actor": 1},
    }
    for name, values in sections.items():
        data[name] = {**data.get(name, {}), **values}
    return data


def make_spec(model_dir: Path, shards: str | list[str], out: Path, **sections: dict) -> JobSpec:
    """The validated `job_data`."""
    return parse_spec(job_data(model_dir, shards, out, **sections), source="test")


def write_job(path: Path, model_dir: Path, shards: str | list[str], out: Path,
              name: str = "test-job", **sections: dict) -> Path:
    """`job_data` written as a YAML job file at `path`."""
    path.write_text(yaml.safe_dump(job_data(model_dir, shards, out, name, **sections)))
    return path


def write_row_shards(root: Path, guides: Mapping[str, np.ndarray],
                     settings: Mapping[str, dict], txt_key: str) -> list[str]:
    """Two shards root/in-{0,1}.tar of keys k0-k2 and k3-k5: each a {key}.png guide and a
    {key}.json of its per-row settings; `txt_key` also has a {key}.txt prompt ("red room")."""
    urls = []
    for shard, keys in enumerate((["k0", "k1", "k2"], ["k3", "k4", "k5"])):
        url = str(root / f"in-{shard}.tar")
        with wds.TarWriter(url) as tar:
            for key in keys:
                sample = {"__key__": key, "png": png(guides[key]),
                          "json": json.dumps(settings[key]).encode()}
                if key == txt_key:
                    sample["txt"] = b"red room"
                tar.write(sample)
        urls.append(url)
    return urls
