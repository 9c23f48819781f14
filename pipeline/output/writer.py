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
import hashlib
import json
import logging
import os
import tempfile
import zlib
from collections.abc import Mapping
from typing import Any, BinaryIO

import numpy as np
import webdataset as wds

from pipeline.errors import StorageError
from pipeline.images import encode_image
from pipeline.output.layout import ShardUrls
from pipeline.output.manifest import check_row, manifest_bytes
from pipeline.output.scores import score_row, scores_bytes
from pipeline.redaction import redact_url
from pipeline.storage import (
    absolute_url,
    describe_error,
    is_local,
    put_bytes_atomic,
    temp_name,
    url_fs,
    with_retries,
)
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


class _Digest:
    """A write-only file that counts the bytes written through it and their CRC-32 (the tar's
    digest in the commit marker, made while the tar is written: no second read)."""

    def __init__(self, handle: BinaryIO) -> None:
        self.handle, self.size, self.crc32 = handle, 0, 0

    def write(self, data: bytes) -> int:
        self.handle.write(data)
        self.size += len(data)
        self.crc32 = zlib.crc32(data, self.crc32)
        return len(data)


def files_record(tar_size: int, tar_crc32: int, manifest: bytes) -> dict[str, Any]:
    """What a commit marker records of the files it commits (`files`): each one's size in
    bytes, the tar's CRC-32 (made while writing) and the manifest's sha256."""
    return {"tar": {"bytes": tar_size, "crc32": f"{tar_crc32:08x}"},
            "manifest": {"bytes": len(manifest), "sha256": hashlib.sha256(manifest).hexdigest()}}


class ShardOutput:
    """Collects one shard's outputs and manifest rows (and their scores); `commit()` publishes
    them in order. Made by `OutputFolder.shard_writer`, which names `urls` and, with scoring
    on, the sidecar's (`scores`: its URL and metadata). The tar is written to a temporary
    file named after this process (`pipeline.storage.temp_name`): local outputs beside the
    tar, object stores in the system's temporary folder; a writer never removes another's.
    Every failure to write is a `StorageError` naming the file (and the temporary file)."""

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
        name = temp_name(f"{stem}.tar")
        local = is_local(self.fs)
        self.tmp = os.path.join(os.path.dirname(self.tar_path) if local
                                else tempfile.gettempdir(), name)
        try:
            if local:
                os.makedirs(os.path.dirname(self.tar_path), exist_ok=True)
            self._file = open(self.tmp, "wb")  # noqa: SIM115 - closed in commit()/abort()
        except OSError as exc:
            raise self._error(exc) from exc
        self._digest = _Digest(self._file)
        # encoder=False: members are bytes already, stored as they are (webdataset's default
        # encoder would gzip a carried `{key}.txt.gz` a second time)
        self._tar = wds.TarWriter(self._digest, encoder=False, mtime=0.0)

    def _error(self, exc: BaseException) -> StorageError:
        """The error of a failed tar write: the tar, its temporary file and the cause."""
        return StorageError(f"cannot write {redact_url(self.urls.tar)}: {describe_error(exc)} "
                            f"(writing its temporary file {self.tmp})")

    def add_sample(self, sample: Mapping[str, Any]) -> None:
        """Append one encoded output sample (`output_sample`) to the tar; members of a key are
        contiguous and samples stay in the order they are added."""
        try:
            self._tar.write(dict(sample))
        except OSError as exc:
            raise self._error(exc) from exc

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

    def commit(self, marker: Mapping[str, Any]) -> dict[str, Any]:
        """Publish tar, then manifest, then the marker (the shard counts as done only then);
        the marker gets `files` (`files_record`). Returns the marker as written.

        Raises:
            StorageError: a file could not be written, naming it and the cause.
        """
        try:
            self._tar.close()
            self._file.flush()
            if is_local(self.fs):  # a crash after the rename leaves the whole tar
                os.fsync(self._file.fileno())
            self._file.close()
            if is_local(self.fs):
                os.replace(self.tmp, self.tar_path)
        except OSError as exc:
            self._drop_temp()
            raise self._error(exc) from exc
        try:
            if not is_local(self.fs):
                with_retries(lambda: self.fs.put_file(self.tmp, self.tar_path),
                             what="write output shard", url=self.urls.tar)
        except StorageError:
            raise
        except Exception as exc:
            raise StorageError(f"cannot write {redact_url(self.urls.tar)}: "
                               f"{describe_error(exc)}") from exc
        finally:
            self._drop_temp()
        manifest = manifest_bytes(self.ordered_rows())
        put_bytes_atomic(self.urls.manifest, manifest, self.options, what="the manifest")
        if self.scores is not None:  # before the marker: a committed shard has its scores
            url, metadata = self.scores
            rows = [score_row(self.rows[i], self._scores[i]) for i in self._order()]
            put_bytes_atomic(url, scores_bytes(rows, metadata), self.options,
                             what="the scores sidecar")
        marker = {**marker, "files": files_record(self._digest.size, self._digest.crc32,
                                                  manifest)}
        put_bytes_atomic(self.urls.marker, json.dumps(marker, indent=1).encode(),
                         self.options, what="the commit marker")
        logger.info("committed shard %s (%d manifest rows)", self.stem, len(self.rows))
        return marker

    def abort(self) -> None:
        """Drop the partial tar; nothing was published."""
        try:
            self._tar.close()
            self._file.close()
        except OSError:
            pass  # a full disk: the temporary file goes anyway
        finally:
            self._drop_temp()

    def _drop_temp(self) -> None:
        if os.path.exists(self.tmp):
            os.unlink(self.tmp)


def now() -> dt.datetime:
    """The current UTC time (manifest `created_at`)."""
    return dt.datetime.now(dt.timezone.utc)
