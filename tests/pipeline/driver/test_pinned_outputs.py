"""Pinned outputs: the decoded pixels of a fixed tiny job, stored as uint8 arrays in
tests/data/pins/job/ (tests/support/pins.py says how to rewrite them).

Written before the layout change (issue 12) and the pipelined actor (issue 9), which reproduce
these pixels. Decoded pixels are compared (not tar bytes), so that a change of PNG compression
level or of how guides are carried does not count as a change of output. They were digests of
the pixels until issue 23; the arrays are the same pixels. A legitimate change of outputs must
rewrite the pins and say why in its commit.
"""

from __future__ import annotations

import io
import tarfile

import numpy as np
from PIL import Image

from pipeline.worker.shard import ShardWorker
from tests.support.pins import assert_levels, load_pin, max_abs_diff
from tests.support.shards import make_spec, write_shards

# 8-bit outputs are the engine's floats rounded to 255 levels. Other CPU kernels move those
# floats by up to ~1e-5 (tests/sdedit/test_pinned_engine.py), which changes a level only for a
# float that close to a rounding boundary: a value may move 1 level, and few values move (none
# did under the kernels tried there). A real change moves many values by many levels: t0 0.3 ->
# 0.31 in the masked job moves 18% of its values (half its pixels are kept), by up to 24 levels.
MAX_LEVEL = 1
MAX_FRACTION = 0.01

UNMASKED = {"sdedit": {"samples_per_input": 2}}
MASKED = {"sdedit": {"sampler": "ddim", "t0": 0.3, "steps": 5, "repeats": 2},
          "input": {"mask": "mask.png"}}


def _decoded_outputs(tar_path) -> dict[str, np.ndarray]:
    """output key -> its decoded RGB output pixels, uint8 (16, 16, 3)."""
    outputs = {}
    with tarfile.open(tar_path) as tar:
        for member in tar.getmembers():
            name = member.name
            if name.endswith(".png") and name.count(".") == 1:
                data = tar.extractfile(member).read()
                outputs[name[: -len(".png")]] = np.asarray(Image.open(io.BytesIO(data)))
    return outputs


def _run(tiny_vp, tiny_vp_dir, tmp_path, masks: bool, **sections) -> dict[str, np.ndarray]:
    """"{shard stem}:{output key}" -> decoded output pixels of the job on two input shards."""
    shards = write_shards(tmp_path / "in", n_shards=2, per_shard=4, masks=masks, seed=3)
    out = tmp_path / "out"
    spec = make_spec(tiny_vp_dir, shards, out, **sections)
    worker = ShardWorker(spec, model=tiny_vp)
    for url in shards:
        worker.process(url)
    return {f"{tar.stem}:{key}": pixels
            for tar in sorted((out / "shards").glob("*.tar"))
            for key, pixels in _decoded_outputs(tar).items()}


def test_unmasked_job_outputs_are_pinned(tiny_vp, tiny_vp_dir, tmp_path):
    found = _run(tiny_vp, tiny_vp_dir, tmp_path, masks=False, **UNMASKED)
    assert len(found) == 14  # 2 samples of 7 guides (part-000001 holds an undecodable one)
    assert_levels("job", "unmasked", found, MAX_LEVEL, MAX_FRACTION)


def test_masked_job_outputs_are_pinned(tiny_vp, tiny_vp_dir, tmp_path):
    found = _run(tiny_vp, tiny_vp_dir, tmp_path, masks=True, **MASKED)
    assert len(found) == 7
    assert_levels("job", "masked", found, MAX_LEVEL, MAX_FRACTION)


def test_pins_fail_on_a_real_change(tiny_vp, tiny_vp_dir, tmp_path):
    """t0 0.3 -> 0.31 in the masked job: values move by more than MAX_LEVEL, and more than
    MAX_FRACTION of them move (24 levels, 18% here)."""
    sections = {**MASKED, "sdedit": {**MASKED["sdedit"], "t0": 0.31}}
    found = _run(tiny_vp, tiny_vp_dir, tmp_path, masks=True, **sections)
    pinned = load_pin("job", "masked")
    assert max_abs_diff(pinned, found) > MAX_LEVEL
    differing = sum(int(np.count_nonzero(found[k] != pinned[k])) for k in pinned)
    assert differing > MAX_FRACTION * sum(v.size for v in pinned.values())
