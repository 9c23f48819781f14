"""Stream the samples of one input WebDataset tar through fsspec and decode them.

The tar is read as a stream over an fsspec file: never downloaded whole. `pipeline.input.members`
holds the member contract (every member belongs to one sample row or is a row itself, whatever
its name, type, encoding or size; compression recognised by content; a tar cut short, corrupt
or with data after its end fails the shard). Members are grouped into samples by webdataset's
key rule (`{key}.{ext}`: the key ends at the first dot of the file name); unlike webdataset's
`group_by_keys` a repeated key never fails a shard (`mark_duplicates` marks every repeat).
Problems of one sample (a key seen before in the shard, an undecodable image, a missing guide,
a bad mask, a key that would escape the output folder, an unusable member) become a `Sample`
with `error` and `error_kind` set; a tar that cannot be read raises `ShardError`.

`read_shard` reads in a background thread and decodes in a thread pool (in order), ahead of
the consumer by at most `depth` samples: the bound on decoded images a shard holds.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Iterator, Mapping
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from pipeline.errors import ShardError
from pipeline.images import (
    DEFAULT_MAX_PIXELS,
    IMAGE_EXTS,
    ImageError,
    decode_guide_member,
    decode_mask,
)
from pipeline.input.members import (
    RawSample,
    check_key,
    group_members,
    mark_duplicates,
    member_limit,
    printable,
    tar_members,
)
from pipeline.redaction import redact_url
from pipeline.stages import Gauge, Timings
from pipeline.storage import describe_error, url_fs, with_retries

logger = logging.getLogger(__name__)

_END = object()
T = TypeVar("T")
READER_JOIN_S = 2.0
"""Seconds a stopped consumer waits for the reader thread to end (it checks every 0.2 s)."""
__all__ = ["Sample", "check_key", "decode_sample", "iter_raw", "iter_samples", "prefetch",
           "read_shard"]


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
        error_kind: the kind of `error`, one of `pipeline.output.writer.ERROR_KINDS`, or None.
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


def decode_sample(raw: RawSample | Mapping[str, Any], image_ext: str | None,
                  mask_ext: str | None, max_pixels: int = DEFAULT_MAX_PIXELS) -> Sample:
    """Decode one grouped sample (`RawSample`, or a dict {"__key__": key, ext: bytes}) into a
    `Sample`; never raises.

    The guide is decoded by `pipeline.images.decode_guide`, the mask by `decode_mask` (both
    check `max_pixels` from the header before decoding). A keyless member, a sample marked by
    `mark_duplicates`, a key that cannot name an output or a sample with an unusable member
    is not decoded: it is an error row (kinds `member`, `duplicate`, `key`, `member` / `size`).
    """
    if not isinstance(raw, RawSample):
        raw = RawSample.of(raw)
    key = printable(raw.key)
    if raw.keyless:
        kind, message = raw.problems[0]
        return Sample(key=key, error=message, error_kind=kind)
    if raw.duplicate:
        return Sample(key=key, error=raw.duplicate, error_kind="duplicate")
    problem = check_key(raw.key)
    if problem:
        return Sample(key=key, error=problem, error_kind="key")
    if raw.problems:
        return Sample(key=key, error_kind=raw.problems[0][0],
                      error="; ".join(message for _, message in raw.problems))
    found = raw.members
    exts = [image_ext] if image_ext else [e for e in IMAGE_EXTS if e in found]
    if not exts or exts[0] not in found:
        wanted = image_ext or " or ".join(IMAGE_EXTS)
        return Sample(key=key, error_kind="missing", error=(
            f"missing guide member {key}.{wanted} (present: {sorted(found)})"
            f"{_dotted_images(raw, mask_ext)}"))
    members: dict[str, bytes] = {"guide": found[exts[0]]}
    try:
        guide, guide_png = decode_guide_member(found[exts[0]], f"{key}.{exts[0]}", max_pixels)
    except ImageError as exc:
        return Sample(key=key, error=str(exc), error_kind=exc.kind)
    mask = None
    if mask_ext:
        if mask_ext not in found:
            return Sample(key=key, error=f"missing mask member {key}.{mask_ext}",
                          error_kind="missing")
        try:
            mask = decode_mask(found[mask_ext], f"{key}.{mask_ext}", max_pixels)
        except ImageError as exc:
            return Sample(key=key, error=str(exc), error_kind=exc.kind)
        if mask.shape != guide.shape[:2]:
            return Sample(key=key, error_kind="mask", error=(
                f"mask {key}.{mask_ext} is {mask.shape[1]}x{mask.shape[0]} but the guide is "
                f"{guide.shape[1]}x{guide.shape[0]}; allowed: the same size"))
        members["mask"] = found[mask_ext]
    if "target.png" in found:
        members["target"] = found["target.png"]
    used = {exts[0], mask_ext, "target.png"}
    carried = {ext: data for ext, data in found.items() if ext not in used}
    return Sample(key=key, guide=guide, mask=mask, members=members, guide_png=guide_png,
                  carried=carried)


def _dotted_images(raw: RawSample, mask_ext: str | None) -> str:
    """A hint for a sample without a guide whose members look like images of other samples
    (`img.v2.png`: key `img`, extension `v2.png`)."""
    dotted = [printable(raw.names[ext]) for ext in sorted(raw.members)
              if "." in ext and ext.rsplit(".", 1)[-1] in IMAGE_EXTS
              and ext not in (mask_ext, "mask.png", "target.png")]
    if not dotted:
        return ""
    verb = "belongs" if len(dotted) == 1 else "belong"
    return (f"; {', '.join(dotted)} {verb} to sample {printable(raw.key)} as extensions, "
            "since a key ends at the first dot of the file name: name separate samples "
            "without dots in their keys (img_v2.png)")


def iter_raw(url: str, storage_options: Mapping[str, Any] | None,
             max_member_bytes: int | None = None) -> Iterator[RawSample]:
    """Yield the samples of the tar at `url` undecoded, in order (`group_members`), repeated
    keys marked (`mark_duplicates`); members over `max_member_bytes` (default
    `member_limit(DEFAULT_MAX_PIXELS)`) are not read.

    Raises:
        ShardError: the tar cannot be opened, is truncated or malformed.
    """
    limit = max_member_bytes or member_limit(DEFAULT_MAX_PIXELS)
    try:
        fs, path = url_fs(url, storage_options)
        # Opening is retried on transient errors (an object store restarting); a failure
        # later, mid-stream, is a ShardError and the runner retries the whole shard.
        opened = with_retries(lambda: fs.open(path, "rb"), what="open input shard", url=url)
        with opened as stream:
            yield from mark_duplicates(group_members(tar_members(stream, url, limit), limit))
    except ShardError:
        raise
    except Exception as exc:
        raise ShardError(f"input shard {redact_url(url)}: cannot read: "
                         f"{describe_error(exc)}") from exc


def iter_samples(url: str, storage_options: Mapping[str, Any] | None, image_ext: str | None,
                 mask_ext: str | None, max_pixels: int = DEFAULT_MAX_PIXELS,
                 max_member_bytes: int | None = None) -> Iterator[Sample]:
    """Yield decoded samples of the tar at `url` in tar order (in this thread).

    Raises:
        ShardError: the tar cannot be opened, is truncated or malformed.
    """
    for raw in iter_raw(url, storage_options, max_member_bytes or member_limit(max_pixels)):
        yield decode_sample(raw, image_ext, mask_ext, max_pixels)


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
    def decode(raw: RawSample) -> Sample:
        if timings is None:
            sample = decode_sample(raw, image_ext, mask_ext, max_pixels)
        else:
            with timings.measure("decode"):
                sample = decode_sample(raw, image_ext, mask_ext, max_pixels)
        if gauge is not None:
            gauge.add(1)
        return sample

    raws = iter_raw(url, storage_options, member_limit(max_pixels))
    if pool is None:
        yield from prefetch(map(decode, raws), depth)
        return
    futures = prefetch((pool.submit(decode, raw) for raw in raws), depth)
    try:
        for future in futures:
            yield future.result()
    finally:
        futures.close()
