"""Stream the samples of one input WebDataset tar through fsspec and decode them.

The tar is read as a stream (`tarfile` mode "r|*" over an fsspec file): never downloaded whole.
Members are grouped into samples by webdataset's key rule (`{key}.{ext}`: the key ends at the
first dot of the file name), here by `group_members`, which unlike webdataset's `group_by_keys`
never fails a shard for a repeated key (`mark_duplicates` marks every repeat). Problems of one
sample (a key seen before in the shard, an undecodable image, a missing guide, a bad mask, a
key that would escape the output folder) become a `Sample` with `error` and `error_kind` set;
a truncated or unreadable tar raises `ShardError`.

`read_shard` reads in a background thread and decodes in a thread pool (in order), ahead of
the consumer by at most `depth` samples: the bound on decoded images a shard holds.
"""

from __future__ import annotations

import logging
import queue
import tarfile
import threading
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
from webdataset.tariterators import base_plus_ext

from pipeline.errors import ShardError
from pipeline.images import (
    DEFAULT_MAX_PIXELS,
    IMAGE_EXTS,
    ImageError,
    decode_guide_member,
    decode_mask,
)
from pipeline.redaction import redact_url
from pipeline.stages import Gauge, Timings
from pipeline.storage import describe_error, url_fs, with_retries

logger = logging.getLogger(__name__)

_END = object()
DUPLICATE = "__duplicate__"
"""Set by `mark_duplicates` on a sample whose key was seen before in the shard: its message."""
T = TypeVar("T")
READER_JOIN_S = 2.0
"""Seconds a stopped consumer waits for the reader thread to end (it checks every 0.2 s)."""


@dataclass
class Sample:
    """One decoded input sample.

    Attributes:
        key: the WebDataset key.
        guide: uint8 (H, W, 3) RGB, or None when `error` is set.
        mask: uint8 (H, W) in {0, 1} (1 = regenerate, from white), or None.
        members: the raw bytes of the guide ("guide"), mask ("mask") and target ("target")
            members present, passed through to the output tar.
        error: why this sample cannot be edited, or None.
        error_kind: the kind of `error`, one of `pipeline.writer.ERROR_KINDS`, or None.
        guide_png: the guide member's bytes when they are an 8-bit RGB PNG of exactly
            `guide` (`images.is_rgb8_png`): stored as the output's guide.png unchanged.
        carried: every other member (extension -> bytes): class labels, captions, `{key}.json`
            with per-row settings; copied unchanged into each output sample.
    """

    key: str
    guide: np.ndarray | None = None
    mask: np.ndarray | None = None
    members: Mapping[str, bytes] | None = None
    error: str | None = None
    guide_png: bytes | None = None
    error_kind: str | None = None
    carried: Mapping[str, bytes] = field(default_factory=dict)


def check_key(key: str) -> str | None:
    """None if `key` is safe as an output name, else the reason it is not."""
    if not key or "/" in key or "\\" in key or ".." in key or key.startswith("."):
        return (f"key {key!r} is not allowed: keys may not contain '/', '\\\\' or '..', "
                "nor start with '.'")
    return None


def decode_sample(raw: Mapping[str, Any], image_ext: str | None, mask_ext: str | None,
                  max_pixels: int = DEFAULT_MAX_PIXELS) -> Sample:
    """Decode one grouped sample (extension -> bytes) into a `Sample`; never raises.

    The guide is decoded by `pipeline.images.decode_guide`, the mask by `decode_mask` (both
    check `max_pixels` from the header before decoding). A sample marked by `mark_duplicates`
    is not decoded: it is a "duplicate" error.
    """
    key = str(raw["__key__"])
    if raw.get(DUPLICATE):
        return Sample(key=key, error=raw[DUPLICATE], error_kind="duplicate")
    problem = check_key(key)
    if problem:
        return Sample(key=key, error=problem, error_kind="key")
    exts = [image_ext] if image_ext else [e for e in IMAGE_EXTS if e in raw]
    if not exts or exts[0] not in raw:
        wanted = image_ext or " or ".join(IMAGE_EXTS)
        present = sorted(k for k in raw if not k.startswith("__"))
        return Sample(key=key, error=f"missing guide member {key}.{wanted} (present: {present})",
                      error_kind="missing")
    members: dict[str, bytes] = {"guide": raw[exts[0]]}
    try:
        guide, guide_png = decode_guide_member(raw[exts[0]], f"{key}.{exts[0]}", max_pixels)
    except ImageError as exc:
        return Sample(key=key, error=str(exc), error_kind=exc.kind)
    mask = None
    if mask_ext:
        if mask_ext not in raw:
            return Sample(key=key, error=f"missing mask member {key}.{mask_ext}",
                          error_kind="missing")
        try:
            mask = decode_mask(raw[mask_ext], f"{key}.{mask_ext}", max_pixels)
        except ImageError as exc:
            return Sample(key=key, error=str(exc), error_kind=exc.kind)
        if mask.shape != guide.shape[:2]:
            return Sample(key=key, error_kind="mask", error=(
                f"mask {key}.{mask_ext} is {mask.shape[1]}x{mask.shape[0]} but the guide is "
                f"{guide.shape[1]}x{guide.shape[0]}; allowed: the same size"))
        members["mask"] = raw[mask_ext]
    if "target.png" in raw:
        members["target"] = raw["target.png"]
    used = {exts[0], mask_ext, "target.png"}
    carried = {ext: data for ext, data in raw.items()
               if not ext.startswith("__") and ext not in used}
    return Sample(key=key, guide=guide, mask=mask, members=members, guide_png=guide_png,
                  carried=carried)


def group_members(files: Iterable[Mapping[str, Any]]) -> Iterator[dict[str, Any]]:
    """Group tar members ({"fname", "data"}) into samples {"__key__", ext: bytes, ...}.

    Consecutive members with the same key form a sample (webdataset's rule: `base_plus_ext`,
    extensions lower-cased; names without an extension are skipped). A member whose extension
    the current sample already has starts a new sample with the same key, so a repeated key
    (in a row or apart) never raises: it shows as a second sample with that key, for the
    caller to refuse (`mark_duplicates`).
    """
    current: dict[str, Any] | None = None
    for item in files:
        prefix, suffix = base_plus_ext(item["fname"])
        if prefix is None:
            continue
        suffix = suffix.lower()
        if current is None or prefix != current["__key__"] or suffix in current:
            if current is not None:
                yield current
            current = {"__key__": prefix, "__url__": item.get("__url__")}
        current[suffix] = item["data"]
    if current is not None:
        yield current


def mark_duplicates(samples: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Grouped samples in order; a key seen before in the shard gets `DUPLICATE` set to the
    message of its error row (only the first occurrence is used: edited, or an error row of its
    own), so it is never decoded."""
    seen: dict[str, int] = {}
    for position, raw in enumerate(samples, start=1):
        key = str(raw["__key__"])
        if key in seen:
            raw[DUPLICATE] = (f"duplicate key {key}: sample {position} of the shard repeats "
                              f"sample {seen[key]} (only the first is used); allowed: each key "
                              "once per shard")
        else:
            seen[key] = position
        yield raw


def iter_raw(url: str, storage_options: Mapping[str, Any] | None) -> Iterator[dict[str, Any]]:
    """Yield the samples of the tar at `url` undecoded (extension -> bytes, `__key__`), in order
    (`group_members`), repeated keys marked (`mark_duplicates`).

    Raises:
        ShardError: the tar cannot be opened, is truncated or malformed.
    """
    try:
        fs, path = url_fs(url, storage_options)
        # Opening is retried on transient errors (an object store restarting); a failure
        # later, mid-stream, is a ShardError and the runner retries the whole shard.
        opened = with_retries(lambda: fs.open(path, "rb"), what="open input shard", url=url)
        with opened as stream:
            yield from mark_duplicates(group_members(_members(stream, url, fs.size(path))))
    except ShardError:
        raise
    except Exception as exc:
        raise ShardError(f"input shard {redact_url(url)}: cannot read: "
                         f"{describe_error(exc)}") from exc


def iter_samples(url: str, storage_options: Mapping[str, Any] | None, image_ext: str | None,
                 mask_ext: str | None, max_pixels: int = DEFAULT_MAX_PIXELS
                 ) -> Iterator[Sample]:
    """Yield decoded samples of the tar at `url` in tar order (in this thread).

    Raises:
        ShardError: the tar cannot be opened, is truncated or malformed.
    """
    for raw in iter_raw(url, storage_options):
        yield decode_sample(raw, image_ext, mask_ext, max_pixels)


def _members(stream: Any, url: str, size: int | None) -> Iterator[dict[str, Any]]:
    """Regular members of a tar stream as webdataset file samples (fname, data, __url__).

    `tarfile` ends a stream silently when it is cut at a header; a plain tar must end with
    its end-of-archive block, so a shorter file is reported as truncated.
    """
    with tarfile.open(fileobj=stream, mode="r|*") as tar:
        for info in tar:
            if info.isreg():
                data = tar.extractfile(info).read()  # type: ignore[union-attr]
                yield {"fname": info.name, "data": data, "__url__": url}
    if size is not None and url.endswith(".tar") and size < tar.offset + tarfile.BLOCKSIZE:
        raise ShardError(f"input shard {redact_url(url)}: cannot read: truncated tar "
                         f"({size} bytes, no end-of-archive block after byte {tar.offset})")


def prefetch(items: Iterator[T], depth: int = 64) -> Iterator[T]:
    """Run `items` in a background thread (read + decode) so the model never waits on I/O.

    Exceptions of the producer are re-raised in the consumer, after the items before them.
    When the consumer stops early (closes the generator), the producer stops at its next put
    and its thread ends: no put ever blocks on a consumer that is gone.
    """
    buffer: queue.Queue[Any] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: Any) -> bool:
        """Queue `item` unless the consumer has stopped; False when it has."""
        while not stop.is_set():
            try:
                buffer.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(item):
                    return
            put(_END)
        except BaseException as exc:  # handed to the consumer
            put(exc)
        finally:  # a consumer that stopped early: close the source (its file) here
            close = getattr(items, "close", None)
            if close is not None:
                close()

    thread = threading.Thread(target=produce, name="shard-reader", daemon=True)
    thread.start()
    try:
        while True:
            item = buffer.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join(timeout=READER_JOIN_S)  # it ends at its next put (a read that hangs: not)


def read_shard(url: str, storage_options: Mapping[str, Any] | None, image_ext: str | None,
               mask_ext: str | None, *, pool: Executor | None = None, depth: int = 64,
               gauge: Gauge | None = None, max_pixels: int = DEFAULT_MAX_PIXELS,
               timings: Timings | None = None) -> Iterator[Sample]:
    """Decoded samples of the tar at `url`, in tar order, read by a background thread.

    With `pool`, samples are decoded there, several at once; without, by the reading thread.
    At most `depth` samples are read ahead of the consumer (decoded or being decoded).
    `gauge` counts each sample as it is decoded (the consumer counts it down when done);
    `timings` gets the decoding time as "decode".
    """
    def decode(raw: dict[str, Any]) -> Sample:
        if timings is None:
            sample = decode_sample(raw, image_ext, mask_ext, max_pixels)
        else:
            with timings.measure("decode"):
                sample = decode_sample(raw, image_ext, mask_ext, max_pixels)
        if gauge is not None:
            gauge.add(1)
        return sample

    if pool is None:
        yield from prefetch(map(decode, iter_raw(url, storage_options)), depth)
        return
    futures = prefetch((pool.submit(decode, raw) for raw in iter_raw(url, storage_options)),
                       depth)
    try:
        for future in futures:
            yield future.result()
    finally:
        futures.close()
