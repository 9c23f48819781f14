"""Bad input at the worker (no Ray): one shard of adversarial members and per-row settings is
committed, each bad sample or member an error row, the good samples edited beside them."""

from __future__ import annotations

import gzip
import io
import json
import tarfile

import numpy as np
import pyarrow.parquet as pq

from pipeline.worker.shard import ShardWorker
from tests.support.shards import make_spec, png
from tests.support.tars import Entry, write_tar

GUIDE = png(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8))
CAPTION_GZ = gzip.compress(b"a caption, compressed by the user", mtime=0)


def _deep_json(depth: int) -> bytes:
    return b'{"t0": ' + b"[" * depth + b"]" * depth + b"}"


ENTRIES = [
    Entry("good.png", GUIDE),
    Entry(b"caf\xe9.png", GUIDE),                                  # not UTF-8: key row
    Entry("td.", b"x"), Entry("td.png", GUIDE),                    # empty extension
    Entry("us.png", GUIDE), Entry("us._x", b"x"),                  # "_" extension
    Entry(".hidden.png", GUIDE),                                   # key starting with "."
    Entry("lnk.png", kind="symlink", link="good.png"),             # a link
    Entry("m.png", GUIDE), Entry("m..extra.png", GUIDE),           # empty extension part
    Entry("README", b"no key"),                                    # no extension
    Entry("deep.png", GUIDE), Entry("deep.json", _deep_json(100_000)),  # RecursionError
    Entry("huge.png", GUIDE), Entry("huge.json", b'{"t0": 1' + b"0" * 400 + b"}"),  # Overflow
    Entry("digits.png", GUIDE), Entry("digits.json", b'{"t0": 1' + b"0" * 5000 + b"}"),
    Entry("arr.png", GUIDE), Entry("arr.json", b"[0.3]"),         # not an object
    Entry("typo.png", GUIDE), Entry("typo.json", b'{"T0": 0.03}'),  # a misspelt setting
    Entry("gz.png", GUIDE), Entry("gz.txt.gz", CAPTION_GZ),       # carried as it is
    Entry("meta.png", GUIDE), Entry("meta.json", json.dumps(
        {"t0": 0.03, "caption": "a room", "url": "http://x", "width": 16}).encode()),
]
EXPECTED = {
    "good": None, "caf\\xe9": "key", "td": "member", "us": "member", ".hidden": "key",
    "lnk": "member", "m": "member", "README": "member", "deep": "setting", "huge": "setting",
    "digits": "setting", "arr": "setting", "typo": "setting", "gz": None, "meta": None,
}


def test_an_adversarial_shard_is_committed_with_a_row_for_every_sample_and_member(
        tiny_vp, tiny_vp_dir, tmp_path):
    """Before: the latin-1 name failed the whole shard (UnicodeEncodeError in the seed), as
    did `td.` and `us._x` (webdataset's TarWriter), the deep and huge json (RecursionError,
    OverflowError, ValueError); `.hidden`, `lnk` and `README` had no row, `arr` and `typo`
    were ok rows with the job's t0, `m..extra.png` was carried inside m's output and
    `gz.txt.gz` was gzipped a second time. The tar is gzip-compressed and named .tar."""
    url = write_tar(tmp_path / "in" / "adversarial.tar", ENTRIES, "gzip")
    out = tmp_path / "out"
    spec = make_spec(tiny_vp_dir, [url], out, sdedit={"t0": 0.02})
    stats = ShardWorker(spec, model=tiny_vp).process(url)
    rows = pq.read_table(out / "manifests" / "adversarial.parquet").to_pylist()
    assert {r["key"]: r["error_kind"] for r in rows} == EXPECTED
    assert len(rows) == len(EXPECTED) and stats.samples == len(EXPECTED)
    errors = {r["key"]: r["error"] for r in rows}
    assert "T0 in typo.json is not a setting; did you mean t0?" in errors["typo"]
    assert "arr.json is a JSON list" in errors["arr"]
    assert {r["key"]: r["t0"] for r in rows if r["status"] == "ok"} == {
        "good": 0.02, "gz": 0.02, "meta": 0.03}
    with tarfile.open(out / "shards" / "adversarial.tar") as tar:
        names = sorted(tar.getnames())
        carried = tar.extractfile("gz.txt.gz").read()  # type: ignore[union-attr]
        meta = json.load(io.BytesIO(tar.extractfile("meta.input.json").read()))  # type: ignore
    assert carried == CAPTION_GZ
    assert meta["caption"] == "a room"  # other keys of {key}.json are carried metadata
    assert {n.split(".")[0] for n in names} == {"good", "gz", "meta"}
