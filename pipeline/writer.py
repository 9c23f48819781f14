"""Write one input shard's results: output tar, Parquet manifest, then the commit marker.

Layout (DESIGN.md):
    OUT/shards/{stem}.tar          {okey}.{fmt} output, {okey}.guide.png, {okey}.mask.png,
                                   {okey}.target.png (when the input had one), {okey}.json
    OUT/manifests/{stem}.parquet   one row per input sample x output index, errors included
    OUT/done/{stem}.json           the commit marker, written last

The tar is built in a local temporary file and published whole: local outputs by rename, object
stores by one upload (completed on close). Tar bytes are deterministic: members in processing
order, fixed mtime, metadata without timings.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import tempfile
import uuid
from collections.abc import Mapping
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import webdataset as wds

from pipeline.images import encode_image
from pipeline.storage import is_local, join, put_bytes_atomic, url_fs, with_retries

logger = logging.getLogger(__name__)

MANIFEST_SCHEMA = pa.schema([
    ("key", pa.string()), ("output_key", pa.string()), ("sample_index", pa.int32()),
    ("input_shard", pa.string()), ("output_shard", pa.string()), ("status", pa.string()),
    ("error", pa.string()), ("seed", pa.int64()), ("t0", pa.float64()),
    ("sampler", pa.string()), ("steps", pa.int32()), ("repeats", pa.int32()),
    ("model", pa.string()), ("width", pa.int32()), ("height", pa.int32()),
    ("faithfulness_l2", pa.float64()), ("seconds", pa.float64()), ("worker", pa.string()),
    ("created_at", pa.timestamp("us", tz="UTC")),
])


def output_sample(output_key: str, output: np.ndarray, metadata: Mapping[str, Any], *,
                  guide: np.ndarray | None = None, guide_png: bytes | None = None,
                  mask: np.ndarray | None = None, target: bytes | None = None,
                  image_format: str = "png",
                  png_compress_level: int | None = None) -> dict[str, Any]:
    """The tar members of one output sample, encoded (this runs in a host thread).

    Args:
        output: uint8 (H, W, 3), stored as `{key}.{image_format}`.
        metadata: stored as `{key}.json`.
        guide: uint8 (H, W, 3), the guide as edited, stored as `{key}.guide.png`; or
            guide_png: the input's own PNG bytes of exactly that image, stored unchanged.
        mask: uint8 (H, W) in {0, 1}, stored as `{key}.mask.png` (white = regenerated).
        target: bytes stored unchanged as `{key}.target.png`.
    Raises:
        what the encoder raises for this sample (a size the format cannot hold, ...).
    """
    sample: dict[str, Any] = {
        "__key__": output_key,
        image_format: encode_image(output, image_format, png_compress_level),
        "json": json.dumps(dict(metadata), sort_keys=True).encode()}
    if guide_png is not None:
        sample["guide.png"] = guide_png
    elif guide is not None:
        sample["guide.png"] = encode_image(guide, "png", png_compress_level)
    if mask is not None:
        sample["mask.png"] = encode_image(mask * 255, "png", png_compress_level)
    if target is not None:
        sample["target.png"] = target
    return sample


def output_urls(output: str, stem: str) -> dict[str, str]:
    """The three final locations of a shard's results."""
    return {"tar": join(output, "shards", f"{stem}.tar"),
            "manifest": join(output, "manifests", f"{stem}.parquet"),
            "marker": join(output, "done", f"{stem}.json")}


class ShardOutput:
    """Collects one shard's outputs and manifest rows; `commit()` publishes them in order."""

    def __init__(self, output: str, stem: str,
                 storage_options: Mapping[str, Any] | None) -> None:
        self.urls = output_urls(output, stem)
        self.stem = stem
        self.options = dict(storage_options or {})
        self.rows: list[dict[str, Any]] = []
        self.fs, self.tar_path = url_fs(self.urls["tar"], self.options)
        if is_local(self.fs):
            directory = os.path.dirname(self.tar_path)
            os.makedirs(directory, exist_ok=True)
            self._remove_stale_temps(directory)
            self.tmp = os.path.join(directory, f".{stem}.tar.tmp-{uuid.uuid4().hex[:12]}")
        else:
            handle, self.tmp = tempfile.mkstemp(prefix=f"sdedit-{stem}-", suffix=".tar")
            os.close(handle)
        self._file = open(self.tmp, "wb")  # noqa: SIM115 - closed in commit()/abort()
        self._tar = wds.TarWriter(self._file, mtime=0.0)

    def _remove_stale_temps(self, directory: str) -> None:
        for name in os.listdir(directory):
            if name.startswith(f".{self.stem}.tar.tmp-"):
                os.unlink(os.path.join(directory, name))

    def add_sample(self, sample: Mapping[str, Any]) -> None:
        """Append one encoded output sample (`output_sample`) to the tar; members of a key are
        contiguous and samples stay in the order they are added."""
        self._tar.write(dict(sample))

    def add_row(self, row: Mapping[str, Any]) -> None:
        """Append one manifest row (keys of MANIFEST_SCHEMA; missing ones become null)."""
        self.rows.append({name: row.get(name) for name in MANIFEST_SCHEMA.names})

    def commit(self, marker: Mapping[str, Any]) -> None:
        """Publish tar, then manifest, then the marker (the shard counts as done only then)."""
        self._tar.close()
        self._file.close()
        try:
            if is_local(self.fs):
                os.replace(self.tmp, self.tar_path)
            else:
                with_retries(lambda: self.fs.put_file(self.tmp, self.tar_path),
                             what="write output shard", url=self.urls["tar"])
        finally:
            if os.path.exists(self.tmp):
                os.unlink(self.tmp)
        table = pa.Table.from_pylist(self.rows, schema=MANIFEST_SCHEMA)
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        put_bytes_atomic(self.urls["manifest"], sink.getvalue().to_pybytes(), self.options)
        put_bytes_atomic(self.urls["marker"], json.dumps(dict(marker), indent=1).encode(),
                         self.options)
        logger.info("committed shard %s (%d manifest rows)", self.stem, len(self.rows))

    def abort(self) -> None:
        """Drop the partial tar; nothing was published."""
        try:
            self._tar.close()
            self._file.close()
        finally:
            if os.path.exists(self.tmp):
                os.unlink(self.tmp)


def now() -> dt.datetime:
    """The current UTC time (manifest `created_at`)."""
    return dt.datetime.now(dt.timezone.utc)
