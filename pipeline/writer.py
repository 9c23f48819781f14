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


def output_urls(output: str, stem: str) -> dict[str, str]:
    """The three final locations of a shard's results."""
    return {"tar": join(output, "shards", f"{stem}.tar"),
            "manifest": join(output, "manifests", f"{stem}.parquet"),
            "marker": join(output, "done", f"{stem}.json")}


class ShardOutput:
    """Collects one shard's outputs and manifest rows; `commit()` publishes them in order."""

    def __init__(self, output: str, stem: str, storage_options: Mapping[str, Any] | None,
                 image_format: str = "png", include_guide: bool = True) -> None:
        self.urls = output_urls(output, stem)
        self.stem = stem
        self.options = dict(storage_options or {})
        self.image_format = image_format
        self.include_guide = include_guide
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

    def add_output(self, output_key: str, output: np.ndarray, guide: np.ndarray,
                   members: Mapping[str, bytes], mask: np.ndarray | None,
                   metadata: Mapping[str, Any]) -> None:
        """Append one output sample to the tar. Arrays: uint8 (H, W, 3); mask (H, W) in {0,1}."""
        sample: dict[str, Any] = {"__key__": output_key,
                                  self.image_format: encode_image(output, self.image_format),
                                  "json": json.dumps(dict(metadata), sort_keys=True).encode()}
        if self.include_guide:
            sample["guide.png"] = encode_image(guide, "png")
            if mask is not None:
                sample["mask.png"] = encode_image(mask * 255, "png")
            if "target" in members:
                sample["target.png"] = members["target"]
        self._tar.write(sample)

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
