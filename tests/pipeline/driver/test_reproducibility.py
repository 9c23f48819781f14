"""The README's reproducibility statement on a real model (the bundled models/rooms-64, one
quickstart shard, ddpm respaced to 20 steps, fp32 on the CPU): the same batch size, device,
dtype and threads give byte-identical outputs; another batch size or thread count gives
outputs within +-1 level (measured over the whole quickstart: benchmarks/repro_batch_threads.py).
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.job.load import load_spec, parse_spec
from pipeline.worker.shard import ShardWorker

ROOT = Path(__file__).resolve().parents[3]

pytestmark = pytest.mark.slow


def _outputs(tar_path: Path) -> dict[str, np.ndarray]:
    with tarfile.open(tar_path) as tar:
        return {m.name[:-4]: np.asarray(Image.open(io.BytesIO(tar.extractfile(m).read())))
                for m in tar.getmembers() if m.name.endswith(".png") and m.name.count(".") == 1}


@pytest.fixture(scope="module")
def rooms():
    from sdedit import load_model

    return load_model(ROOT / "models" / "rooms-64")


def _run(model, tmp_path: Path, batch: int, threads: int, name: str) -> Path:
    data = load_spec(str(ROOT / "jobs" / "quickstart.yaml")).to_dict()
    data["model"]["source"] = str(ROOT / "models" / "rooms-64")
    data["input"]["shards"] = [str(ROOT / "jobs" / "data" / "quickstart" / "rooms-000000.tar")]
    data["output"]["path"] = str(tmp_path / name)
    data["sdedit"]["steps"] = 20
    data["compute"]["batch_size"] = batch
    spec = parse_spec(json.loads(json.dumps(data)))
    before = torch.get_num_threads()
    try:
        ShardWorker(spec, model=model, threads=threads).process(spec.input.shards[0])
    finally:
        torch.set_num_threads(before)
    return tmp_path / name / "shards" / "rooms-000000.tar"


def test_same_settings_are_byte_identical_others_within_one_level(rooms, tmp_path):
    reference = _run(rooms, tmp_path, batch=3, threads=2, name="b3t2")
    again = _run(rooms, tmp_path, batch=3, threads=2, name="b3t2-again")
    assert again.read_bytes() == reference.read_bytes()
    expected = _outputs(reference)
    assert len(expected) == 8
    for batch, threads in ((1, 1), (1, 2), (8, 1)):
        found = _outputs(_run(rooms, tmp_path, batch, threads, f"b{batch}t{threads}"))
        assert found.keys() == expected.keys()
        for key, pixels in found.items():
            diff = np.abs(pixels.astype(np.int16) - expected[key].astype(np.int16))
            assert diff.max() <= 1, (batch, threads, key, int(diff.max()))
