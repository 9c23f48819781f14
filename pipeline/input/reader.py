"""Stream the samples of one input WebDataset tar through fsspec and decode them.

A sample's problems make it a `Sample` with `error` set; a tar that cannot be read raises
`ShardError`. `read_shard` decodes in a pool at most `depth` samples ahead: the bound on the
decoded images a shard holds. See docs/inputs.md."""

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
"""Seconds a stopped consumer waits for the reader thread to end."""
__all__ = ["Sample", "check_key", "decode_sample", "iter_raw", "iter_samples", "prefetch",
           "read_shard"]


@dataclass
class Sample:
    """One decoded input sample.

    Attributes:
        guide: uint8 (H, W, 3) RGB, or None when `error` is set.
        mask: uint8 (H, W) in {0, 1} (1 = regenerate), or None.
        members: the raw bytes of the "guide", "mask" and "target" members present, for the output.
        error_kind: one of `pipeline.output.manifest.ERROR_KINDS`, or None.
        guide_png: the guide's bytes when they are an 8-bit RGB PNG of exactly `guide`, stored as
            the output's guide.png unchanged.
        carried: every other member (extension -> bytes), copied into each output sample."""

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
    """One grouped sample (`RawSample`, or a dict {"__key__": key, ext: bytes}) as a `Sample`;
    never raises: a keyless, repeated, unsafe or unusable one is an error row, not decoded."""
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
    """The samples of the tar at `url`, undecoded, in order, repeats marked; members over
    `max_member_bytes` (default `member_limit(DEFAULT_MAX_PIXELS)`) are not read. ShardError when
    the tar cannot be opened or is malformed."""
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
    """Decoded samples of the tar at `url` in tar order, in this thread; raises as `iter_raw`."""
    for raw in iter_raw(url, storage_options, max_member_bytes or member_limit(max_pixels)):
        yield decode_sample(raw, image_ext, mask_ext, max_pixels)


def prefetch(items: Iterator[T], depth: int = 64) -> Iterator[T]:
    """`items` produced in a background thread, so the model never waits on I/O.

    A producer's exception is raised in the consumer after the items before it; a consumer that
    stops early stops the producer at its next put."""
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

    With `pool` they are decoded there, several at once, at most `depth` ahead of the consumer;
    `gauge` counts each as decoded (the consumer counts it down), `timings` gets "decode"."""
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
