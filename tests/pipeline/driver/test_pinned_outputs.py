"""Pinned outputs: the decoded pixels of a fixed tiny job, as sha256 hashes.

Written before the layout change (issue 12) and the pipelined actor (issue 9): both must
reproduce these pixels exactly. Decoded pixels are hashed (not tar bytes), so that a change of
PNG compression level or of how guides are carried does not count as a change of output.
A legitimate change of outputs must update the table here and say why in its commit.
"""

from __future__ import annotations

import hashlib
import io
import tarfile

import numpy as np
import pytest
from PIL import Image

from pipeline.worker.shard import ShardWorker
from tests.support.shards import make_spec, write_shards

# (shard stem, output key) -> sha256 of the decoded uint8 (16, 16, 3) output pixels
PINNED_UNMASKED = {
    ('part-000000', 's0_000_00'):
        'd1a62482bc160f7898cbabc1c389914e8c204622fa1eede9680cf8cac77084d3',
    ('part-000000', 's0_000_01'):
        'c52a4fb240f6f90f9174e3b17a853bd6e62316fef92f356e0a0e6f2c5560f97f',
    ('part-000000', 's0_001_00'):
        '271116a8786700ff8798a11369074c9690d0bdbeaf013363a76ef87ddf178288',
    ('part-000000', 's0_001_01'):
        'a54a5e0ffad277a5c197f98552104b48679fc7b257e06213676c27aa3f8102c6',
    ('part-000000', 's0_002_00'):
        'b4dca2f1cfada3f148ef85cef32e03ed798bdb56d665ebd75a504e7dff7f1a62',
    ('part-000000', 's0_002_01'):
        '2967a89678e3f766881bf60a717e71c16e7fd07f3c541cb42387e0b4ab8436d7',
    ('part-000000', 's0_003_00'):
        '3468aa27cf8ad9e72b0bd2f04684b6a72abe62852329f78503303402beaed167',
    ('part-000000', 's0_003_01'):
        '38a3059e663263eb0ee0b128197b0d497cc879f8149bcb94a6208a586c064c77',
    ('part-000001', 's1_000_00'):
        'abc1f595d6a745730aa6918ecba2379731b2229cd21ab39f5617f24502985053',
    ('part-000001', 's1_000_01'):
        'a5172943bf9c16fe5fb5637e0e816b6b9b9cd79c47c826cea9b978551e0c07d3',
    ('part-000001', 's1_002_00'):
        '42b7c1f83efe56418d31085162ad7005d8b3130c296b2f6ee931c03c6b3b56f0',
    ('part-000001', 's1_002_01'):
        '37f969747e54e5fdc954c7ec1d3bd65b1336371da85623e20e206b245df2ffa4',
    ('part-000001', 's1_003_00'):
        'fb854dff64c907bc4a78d28f0141077b518535b6c7b61318d510ee0bd47c17cc',
    ('part-000001', 's1_003_01'):
        '0dfe8fec77d2df64c93e679d75f2c85df9e746a6a733ada26a5eee93288d2c94',
}
PINNED_MASKED = {
    ('part-000000', 's0_000'):
        'fb144d70e9628a1fe123794c10f6997c5ec9b0ef657a1aab24ffca7dc1d11489',
    ('part-000000', 's0_001'):
        '0fef37044a2dea1d9ffd4bedff36ed273a0adcdf8149da51152864c063f56350',
    ('part-000000', 's0_002'):
        '23ddfe8082f3488182bbf693f75f74d7f8b801dd5d503c21d87b19c49bbf7c84',
    ('part-000000', 's0_003'):
        'f86fbc7e32bd13890f82bf24601538a18b74a7a5d8e778bb36377467b1fa3e38',
    ('part-000001', 's1_000'):
        '70336d7b88566fd003e506dd83adc0efab25e208e3e1d022aa0c4570c53901fa',
    ('part-000001', 's1_002'):
        'aa2ee15565f4dc1eefa35f9e6003081820f33d3ec6a3c74f17099721d66fdc92',
    ('part-000001', 's1_003'):
        '7c27895e5490af166c666699b0f815f65150124cd1019740b7151646086405d9',
}


def _decoded_outputs(tar_path) -> dict[str, str]:
    """output key -> sha256 of its decoded RGB output pixels."""
    hashes = {}
    with tarfile.open(tar_path) as tar:
        for member in tar.getmembers():
            name = member.name
            if name.endswith(".png") and name.count(".") == 1:
                key = name[: -len(".png")]
                pixels = np.asarray(Image.open(io.BytesIO(tar.extractfile(member).read())))
                hashes[key] = hashlib.sha256(np.ascontiguousarray(pixels).tobytes()).hexdigest()
    return hashes


def _run(tiny_vp, tiny_vp_dir, tmp_path, masks: bool, **sections) -> dict[tuple[str, str], str]:
    shards = write_shards(tmp_path / "in", n_shards=2, per_shard=4, masks=masks, seed=3)
    out = tmp_path / "out"
    spec = make_spec(tiny_vp_dir, shards, out, **sections)
    worker = ShardWorker(spec, model=tiny_vp)
    found = {}
    for url in shards:
        worker.process(url)
    for tar in sorted((out / "shards").glob("*.tar")):
        for key, digest in _decoded_outputs(tar).items():
            found[(tar.stem, key)] = digest
    return found


def test_unmasked_job_outputs_are_pinned(tiny_vp, tiny_vp_dir, tmp_path):
    found = _run(tiny_vp, tiny_vp_dir, tmp_path, masks=False, sdedit={"samples_per_input": 2})
    assert found == PINNED_UNMASKED


@pytest.mark.parametrize("sampler", ["ddim"])
def test_masked_job_outputs_are_pinned(tiny_vp, tiny_vp_dir, tmp_path, sampler):
    found = _run(tiny_vp, tiny_vp_dir, tmp_path, masks=True,
                 sdedit={"sampler": sampler, "t0": 0.3, "steps": 5, "repeats": 2},
                 input={"mask": "mask.png"})
    assert found == PINNED_MASKED
