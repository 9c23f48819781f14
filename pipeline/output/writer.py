"""Write one input shard's results: output tar, Parquet manifest, then the commit marker.

Layout (docs/architecture.md):
    OUT/shards/{stem}.tar          {okey}.{fmt} output, {okey}.guide.png, {okey}.mask.png,
                                   {okey}.target.png (when the input had one), {okey}.json
    OUT/manifests/{stem}.parquet   one row per input sample x output index, errors included
    OUT/scores/{stem}.parquet      with scoring on: one row of scores per manifest row
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
import webdataset as wds

from pipeline.images import encode_image
from pipeline.output.layout import ShardUrls
from pipeline.output.manifest import check_row, manifest_bytes
from pipeline.output.scores import score_row, scores_bytes
from pipeline.storage import absolute_url, is_local, put_bytes_atomic, url_fs, with_retries
from sdedit import local_path, source_kind

logger = logging.getLogger(__name__)


def model_location(source: str) -> str:
    """The manifest's `model` column for a model source: a local directory made absolute, a URL
    without credentials, a hub id as given (decided as `sdedit.sources.resolve` decides)."""
    kind = source_kind(source)
    if kind == "hub":
        return source
    if kind == "url":
        return absolute_url(source)
    return os.path.abspath(local_path(source))


def output_sample(output_key: str, output: np.ndarray, metadata: Mapping[str, Any], *,
                  guide: np.ndarray | None = None, guide_png: bytes | None = None,
                  mask: np.ndarray | None = None, target: bytes | None = None,
                  carried: Mapping[str, bytes] | None = None, image_format: str = "png",
                  png_compress_level: int | None = None,
                  quality: int | None = None) -> dict[str, Any]:
    """The tar members of one output sample, encoded (this runs in a host thread).

    Args:
        output: uint8 (H, W, 3), stored as `{key}.{image_format}`.
        metadata: stored as `{key}.json`.
        guide: uint8 (H, W, 3), the guide as edited, stored as `{key}.guide.png`; or
            guide_png: the input's own PNG bytes of exactly that image, stored unchanged.
        mask: uint8 (H, W) in {0, 1}, stored as `{key}.mask.png` (white = regenerated).
        target: bytes stored unchanged as `{key}.target.png`.
        carried: the input sample's other members (extension -> bytes), stored unchanged under
            their own extension, or as `input.<ext>` where that is one this function writes
            (the input's `json` becomes `input.json`; see `carried_name`).
        png_compress_level: zlib level of every PNG member; quality: of a jpg / webp output.
    Raises:
        what the encoder raises for this sample (a size the format cannot hold, ...).
    """
    sample: dict[str, Any] = {
        "__key__": output_key,
        image_format: encode_image(output, image_format, png_compress_level, quality),
        "json": json.dumps(dict(metadata), sort_keys=True).encode()}
    if guide_png is not None:
        sample["guide.png"] = guide_png
    elif guide is not None:
        sample["guide.png"] = encode_image(guide, "png", png_compress_level)
    if mask is not None:
        sample["mask.png"] = encode_image(mask * 255, "png", png_compress_level)
    if target is not None:
        sample["target.png"] = target
    for ext, data in (carried or {}).items():
        sample[carried_name(ext, image_format, sample)] = data
    return sample


OWN_MEMBERS = ("json", "guide.png", "mask.png", "target.png")
"""Members an output sample has of its own (with the output image's extension)."""


def carried_name(ext: str, image_format: str, taken: Mapping[str, Any]) -> str:
    """The extension a carried input member gets: its own, or `input.<ext>` where the output
    writes that extension itself (and `input.input.<ext>` ... should that be taken too)."""
    name = ext
    while name in (image_format, *OWN_MEMBERS) or name in taken:
        name = f"input.{name}"
    return name


class ShardOutput:
    """Collects one shard's outputs and manifest rows (and their scores); `commit()` publishes
    them in order. Made by `OutputFolder.shard_writer`, which names `urls` and, with scoring
    on, the sidecar's (`scores`: its URL and metadata)."""

    def __init__(self, urls: ShardUrls, stem: str,
                 storage_options: Mapping[str, Any] | None,
                 scores: tuple[str, Mapping[str, Any]] | None = None) -> None:
        self.urls = urls
        self.stem = stem
        self.options = dict(storage_options or {})
        self.scores = scores
        self.rows: list[dict[str, Any]] = []
        self._positions: list[int] = []
        self._scores: list[Mapping[str, Any] | None] = []
        self.fs, self.tar_path = url_fs(self.urls.tar, self.options)
        if is_local(self.fs):
            directory = os.path.dirname(self.tar_path)
            os.makedirs(directory, exist_ok=True)
            self._remove_stale_temps(directory)
            self.tmp = os.path.join(directory, f".{stem}.tar.tmp-{uuid.uuid4().hex[:12]}")
        else:
            handle, self.tmp = tempfile.mkstemp(prefix=f"sdedit-{stem}-", suffix=".tar")
            os.close(handle)
        self._file = open(self.tmp, "wb")  # noqa: SIM115 - closed in commit()/abort()
        # encoder=False: members are bytes already, stored as they are (webdataset's default
        # encoder would gzip a carried `{key}.txt.gz` a second time)
        self._tar = wds.TarWriter(self._file, encoder=False, mtime=0.0)

    def _remove_stale_temps(self, directory: str) -> None:
        for name in os.listdir(directory):
            if name.startswith(f".{self.stem}.tar.tmp-"):
                os.unlink(os.path.join(directory, name))

    def add_sample(self, sample: Mapping[str, Any]) -> None:
        """Append one encoded output sample (`output_sample`) to the tar; members of a key are
        contiguous and samples stay in the order they are added."""
        self._tar.write(dict(sample))

    def add_row(self, row: Mapping[str, Any], position: int = 0,
                scores: Mapping[str, Any] | None = None) -> None:
        """Add one manifest row (made by `pipeline.output.manifest.manifest_row`) of the sample at
        `position` in the input shard, with its `scores` (scorer -> value; None: null scores);
        the manifest holds its rows in input order (by position, then `sample_index`),
        whatever the order they were added in, and the sidecar in the same order.

        Raises:
            ManifestRowError: a row with an unknown or missing column, or an error kind that
            is not one of `pipeline.output.manifest.ERROR_KINDS` (checked again here).
        """
        self.rows.append(check_row(row))
        self._positions.append(position)
        self._scores.append(scores)

    def _order(self) -> list[int]:
        return sorted(range(len(self.rows)),
                      key=lambda i: (self._positions[i], self.rows[i]["sample_index"] or 0))

    def ordered_rows(self) -> list[dict[str, Any]]:
        """The rows in input order (sample position, then output index)."""
        return [self.rows[i] for i in self._order()]

    def commit(self, marker: Mapping[str, Any]) -> None:
        """Publish tar, then manifest, then the marker (the shard counts as done only then)."""
        self._tar.close()
        self._file.close()
        try:
            if is_local(self.fs):
                os.replace(self.tmp, self.tar_path)
            else:
                with_retries(lambda: self.fs.put_file(self.tmp, self.tar_path),
                             what="write output shard", url=self.urls.tar)
        finally:
            if os.path.exists(self.tmp):
                os.unlink(self.tmp)
        put_bytes_atomic(self.urls.manifest, manifest_bytes(self.ordered_rows()),
                         self.options)
        if self.scores is not None:  # before the marker: a committed shard has its scores
            url, metadata = self.scores
            rows = [score_row(self.rows[i], self._scores[i]) for i in self._order()]
            put_bytes_atomic(url, scores_bytes(rows, metadata), self.options)
        put_bytes_atomic(self.urls.marker, json.dumps(dict(marker), indent=1).encode(),
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
