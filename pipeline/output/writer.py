"""Write one input shard's results: output tar, Parquet manifest, score sidecar, then the marker.

Each file is published whole, so a shard is either committed or made again. See
docs/architecture.md, "the commit protocol"."""

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
    """The manifest's `model` column: a local directory made absolute, a URL without credentials,
    a hub id as given (decided as `sdedit.sources.resolve` decides)."""
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
    """The encoded tar members of one output sample (host thread); raises what the encoder
    raises.

    Args:
        output: uint8 (H, W, 3), stored as `{key}.{image_format}`; `metadata` as `{key}.json`.
        guide: uint8 (H, W, 3), the guide as edited; or guide_png: the input's own PNG bytes of
            exactly that image, stored unchanged.
        mask: uint8 (H, W) in {0, 1} (white = regenerated).
        carried: the input's other members (extension -> bytes), stored unchanged (`carried_name`).
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
    """The extension a carried input member gets: its own, or `input.<ext>` (repeated) where the
    output writes that one itself."""
    name = ext
    while name in (image_format, *OWN_MEMBERS) or name in taken:
        name = f"input.{name}"
    return name


class _Digest:
    """A write-only file counting the bytes written through it and their CRC-32, so that the
    marker's digest needs no second read."""

    def __init__(self, handle: BinaryIO) -> None:
        self.handle, self.size, self.crc32 = handle, 0, 0

    def write(self, data: bytes) -> int:
        self.handle.write(data)
        self.size += len(data)
        self.crc32 = zlib.crc32(data, self.crc32)
        return len(data)


def files_record(tar_size: int, tar_crc32: int, manifest: bytes) -> dict[str, Any]:
    """The marker's `files`: sizes in bytes, the tar's CRC-32 and the manifest's sha256."""
    return {"tar": {"bytes": tar_size, "crc32": f"{tar_crc32:08x}"},
            "manifest": {"bytes": len(manifest), "sha256": hashlib.sha256(manifest).hexdigest()}}


class ShardOutput:
    """Collects one shard's outputs, manifest rows and scores; `commit()` publishes them in
    order.

    The tar goes to a `temp_name` file of this process (beside the tar locally, in the system's
    temporary folder for object stores). Every failed write is a `StorageError` naming the file."""

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
        """Append one encoded output sample (`output_sample`); samples stay in the order added."""
        try:
            self._tar.write(dict(sample))
        except OSError as exc:
            raise self._error(exc) from exc

    def add_row(self, row: Mapping[str, Any], position: int = 0,
                scores: Mapping[str, Any] | None = None) -> None:
        """Add one manifest row of the sample at `position` in the input shard, with its `scores`
        (None: null); rows are written in input order, whatever order they come in.
        ManifestRowError for an unknown or missing column, or an error kind not in `ERROR_KINDS`."""
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
        """Publish tar, manifest, sidecar, then the marker (with `files`), which makes the shard
        done; returns the marker as written. StorageError naming a file that could not be
        written."""
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
