"""The member contract of an input tar: every member belongs to one sample row or is a row
itself.

Members group into samples by WebDataset's rule (`{key}.{extension}`, the key ending at the first
dot); whatever a member's name, type, encoding or size, it ends in one manifest row, and a tar
that cannot be read to its end fails the shard. See docs/inputs.md, "the member contract"."""

from __future__ import annotations

import bz2
import gzip
import lzma
import re
import tarfile
import unicodedata
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from pipeline.errors import ShardError
from pipeline.redaction import redact_url

__all__ = ["Member", "RawSample", "check_key", "group_members", "mark_duplicates",
           "member_limit", "printable", "split_name", "tar_members"]

MEMBER_BYTES_PER_PIXEL = 16
"""Bytes per pixel of input.max_pixels a member may have (16-bit RGBA stored raw is 8)."""
MIN_MEMBER_BYTES = 64 * 2**20
"""The smallest member limit, whatever input.max_pixels (captions, labels, features)."""
SAMPLE_MEMBERS_LIMIT = 4
"""A sample's members together may hold this many times the member limit."""
_NAME = re.compile(r"^((?:.*/|)\.*[^.]+)\.([^/]*)$", re.DOTALL)
"""`{key}.{extension}`: webdataset's `base_plus_ext`, except that leading dots stay in the key
(`.hidden.png` is key `.hidden`, refused as a key, never dropped)."""
_COMPRESSIONS: tuple[tuple[bytes, str], ...] = (
    (b"\x1f\x8b", "gzip"), (b"BZh", "bzip2"), (b"\xfd7zXZ\x00", "xz"),
    (b"\x5d\x00\x00", "lzma"), (b"\x28\xb5\x2f\xfd", "zstd"), (b"PK\x03\x04", "zip"),
    (b"7z\xbc\xaf\x27\x1c", "7z"), (b"Rar!", "rar"))
"""First bytes of compressed or archive formats: the first four are read, the others named."""
_OPENERS = {"gzip": lambda f: gzip.GzipFile(fileobj=f, mode="rb"), "bzip2": bz2.BZ2File,
            "xz": lzma.LZMAFile, "lzma": lzma.LZMAFile}
_REFUSED_CATEGORIES = ("Cc", "Zl", "Zp")
"""Unicode categories a key or extension may not hold (control characters, line breaks)."""
_TYPES = {tarfile.SYMTYPE: "symbolic link", tarfile.LNKTYPE: "hard link",
          tarfile.CHRTYPE: "character device", tarfile.BLKTYPE: "block device",
          tarfile.FIFOTYPE: "FIFO"}


def member_limit(max_pixels: int) -> int:
    """The largest member read into memory, in bytes: 16 per pixel of `max_pixels`, >= 64 MiB."""
    return max(MIN_MEMBER_BYTES, MEMBER_BYTES_PER_PIXEL * max_pixels)


def printable(text: str) -> str:
    """`text` as one line of valid UTF-8: surrogate-escaped bytes as `\\xNN`, control characters
    and line breaks escaped; `text` itself when it has neither."""
    out = []
    for char in text:
        if 0xDC80 <= ord(char) <= 0xDCFF:  # a byte that was not UTF-8 (surrogateescape)
            out.append(f"\\x{ord(char) - 0xDC00:02x}")
        elif 0xD800 <= ord(char) <= 0xDFFF or unicodedata.category(char) in _REFUSED_CATEGORIES:
            out.append(char.encode("unicode_escape").decode("ascii"))
        else:
            out.append(char)
    return "".join(out)


def _text_problem(text: str) -> str | None:
    """Why `text` (a key or an extension) cannot be written as UTF-8 on one line, or None."""
    if printable(text) == text:
        return None
    if any(0xD800 <= ord(char) <= 0xDFFF for char in text):
        return "is not valid UTF-8 (its other bytes are shown as \\xNN)"
    return "holds control characters or line breaks"


def check_key(key: str) -> str | None:
    """None if `key` is safe as an output name, else the reason it is not."""
    shown = printable(key)
    if not key or "/" in key or "\\" in key or ".." in key or key.startswith("."):
        return (f"key '{shown}' is not allowed: keys may not contain '/', '\\\\' or '..', "
                "nor start with '.'")
    problem = _text_problem(key)
    if problem:
        return f"key '{shown}' {problem}; allowed: printable UTF-8 keys"
    return None


def split_name(name: str) -> tuple[str | None, str | None]:
    """(key, extension lower-cased) of a member name, or (None, None) when it has no key."""
    match = _NAME.match(name)
    if not match:
        return None, None
    return match.group(1), match.group(2).lower()


def _extension_problem(ext: str) -> str | None:
    """Why a member with extension `ext` could not be written back under it, or None."""
    if not ext or "" in ext.split("."):
        return (f"its extension '{printable(ext)}' has an empty part (a dot at its start or "
                "end, or two dots in a row)")
    if ext.startswith("_"):
        return (f"its extension '{printable(ext)}' starts with '_', which WebDataset reserves "
                "for metadata (it would not be written)")
    problem = _text_problem(ext)
    return f"its extension '{printable(ext)}' {problem}" if problem else None


@dataclass
class Member:
    """One tar member: its name (undecodable bytes surrogate-escaped), its bytes (None when not
    read), and (kind, message) of why it cannot be used, or None."""

    name: str
    data: bytes | None
    problem: tuple[str, str] | None = None
    url: str | None = None


@dataclass
class RawSample:
    """One sample's members, not decoded.

    Attributes:
        members: extension (lower-cased) -> bytes of every usable member.
        names: extension -> the member's name in the tar, for every member.
        problems: (kind, message) of each unusable member; the first makes the sample an error row.
        keyless: a member whose name gives no key, a row of its own (`key` is its name).
        duplicate: the message of its `duplicate` row, set by `mark_duplicates`."""

    key: str
    members: dict[str, bytes] = field(default_factory=dict)
    names: dict[str, str] = field(default_factory=dict)
    problems: list[tuple[str, str]] = field(default_factory=list)
    url: str | None = None
    keyless: bool = False
    duplicate: str | None = None
    size: int = 0

    @classmethod
    def of(cls, sample: Mapping[str, Any]) -> RawSample:
        """From a webdataset-style dict {"__key__": key, extension: bytes, ...}."""
        key = str(sample["__key__"])
        members = {ext: data for ext, data in sample.items() if not ext.startswith("__")}
        return cls(key, members, {ext: f"{key}.{ext}" for ext in members},
                   url=sample.get("__url__"))

    def add(self, ext: str, member: Member, limit: int) -> None:
        """Add one member of this sample (its problem, or its bytes within `limit` in all)."""
        self.names[ext] = member.name
        shown = printable(member.name)
        problem = member.problem
        if problem is None and (reason := _extension_problem(ext)):
            problem = ("member", f"member '{shown}': {reason}; allowed: extensions such as "
                                 "png, mask.png, json")
        if problem is None and self.size + len(member.data or b"") > limit:
            problem = ("size", f"member '{shown}' brings sample '{printable(self.key)}' over "
                               f"{limit:,} bytes of members; allowed: at most {limit:,} "
                               f"({SAMPLE_MEMBERS_LIMIT} x the member limit)")
        if problem is not None:
            self.problems.append(problem)
            return
        assert member.data is not None
        self.members[ext] = member.data
        self.size += len(member.data)


def group_members(members: Iterable[Member], max_member_bytes: int | None = None
                  ) -> Iterator[RawSample]:
    """Group members into samples, in tar order, never raising on a repeated key.

    A member whose extension the open sample already has starts a new sample with the same key
    (for `mark_duplicates`); a keyless member is a sample of its own and does not split the open
    one."""
    limit = SAMPLE_MEMBERS_LIMIT * (max_member_bytes or member_limit(0))
    current: RawSample | None = None
    strays: list[RawSample] = []
    for member in members:
        key, ext = split_name(member.name)
        if key is None or ext is None:
            shown = printable(member.name)
            stray = RawSample(shown, url=member.url, keyless=True,
                              problems=[member.problem or ("member", (
                                  f"member '{shown}' belongs to no sample: its name is not "
                                  "{key}.{extension} (the key ends at the first dot of the "
                                  "file name and may not be empty); allowed: names such as "
                                  "0001.png, 0001.json"))])
            if current is None:
                yield stray
            else:
                strays.append(stray)
            continue
        if current is None or key != current.key or ext in current.names:
            if current is not None:
                yield current
            yield from strays
            strays = []
            current = RawSample(key, url=member.url)
        current.add(ext, member, limit)
    if current is not None:
        yield current
    yield from strays


def mark_duplicates(samples: Iterable[RawSample]) -> Iterator[RawSample]:
    """Samples in order, a key seen before in the shard marked `duplicate` so it is never decoded
    (the first occurrence is used); keyless samples have no key."""
    seen: dict[str, int] = {}
    for position, raw in enumerate(samples, start=1):
        if raw.keyless:
            yield raw
            continue
        if raw.key in seen:
            raw.duplicate = (f"duplicate key {printable(raw.key)}: sample {position} of the "
                             f"shard repeats sample {seen[raw.key]} (only the first is used); "
                             "allowed: each key once per shard")
        else:
            seen[raw.key] = position
        yield raw


class _Prefixed:
    """A read-only stream that gives `head` first, then the rest of `stream`."""

    def __init__(self, head: bytes, stream: BinaryIO) -> None:
        self.head, self.stream = head, stream

    def read(self, size: int = -1) -> bytes:
        if not self.head:
            return self.stream.read(size)
        if size is None or size < 0:
            data, self.head = self.head + self.stream.read(), b""
            return data
        data, self.head = self.head[:size], self.head[size:]
        if len(data) < size:
            data += self.stream.read(size - len(data))
        return data


class _TarError(Exception):
    """The tar cannot be read to its end-of-archive block (raised inside tarfile)."""


class _StrictInfo(tarfile.TarInfo):
    """tarfile ends a stream silently at a missing, cut or corrupt header; this raises."""

    @classmethod
    def fromtarfile(cls, tar: tarfile.TarFile) -> tarfile.TarInfo:
        offset = tar.offset
        try:
            return super().fromtarfile(tar)
        except tarfile.EOFHeaderError:
            raise  # the end-of-archive block: the tar is whole
        except tarfile.EmptyHeaderError as exc:
            if offset == 0:
                raise _TarError("not a tar: the archive is empty") from exc
            raise _TarError(f"truncated tar: it ends at byte {offset:,} of its tar data, "
                              "where a member header or the end-of-archive block must "
                              "follow") from exc
        except tarfile.TruncatedHeaderError as exc:
            raise _TarError(f"truncated tar: it ends inside the member header at byte "
                              f"{offset:,} of its tar data") from exc
        except tarfile.InvalidHeaderError as exc:
            if offset == 0:
                raise _TarError(f"not a tar: its first block is no tar header ({exc})") \
                    from exc
            raise _TarError(f"corrupt tar: the member header at byte {offset:,} of its tar "
                              f"data is invalid ({exc}); the members from there on cannot be "
                              "read") from exc


def _tar_stream(stream: BinaryIO) -> tuple[Any, str]:
    """(the tar data, "tar" or the compression), recognised by the first bytes."""
    head = stream.read(tarfile.BLOCKSIZE)
    source = _Prefixed(head, stream)
    if len(head) == tarfile.BLOCKSIZE:
        try:
            tarfile.TarInfo.frombuf(head, "utf-8", "surrogateescape")
            return source, "tar"
        except tarfile.EOFHeaderError:
            return source, "tar"  # an empty archive
        except tarfile.HeaderError:
            pass
    for magic, name in _COMPRESSIONS:
        if head.startswith(magic):
            if name not in _OPENERS:
                raise _TarError(f"a {name} file; allowed: a tar, plain or compressed with "
                                  "gzip, bzip2 or xz")
            return _OPENERS[name](source), name
    if not head:
        raise _TarError("the file is empty (0 bytes); allowed: a tar")
    raise _TarError(f"not a tar: its first bytes {head[:8]!r} are no tar header and no "
                      "gzip, bzip2 or xz stream")


def tar_members(stream: BinaryIO, url: str, max_member_bytes: int) -> Iterator[Member]:
    """Every member of the tar in `stream` but directories, in order, streamed; members over
    `max_member_bytes`, links and other non-regular files are not read and carry their problem.

    Raises:
        ShardError: not a tar (or not gzip, bzip2, xz), cut short, a corrupt header, or data after
            the end-of-archive block."""
    def refuse(problem: str) -> ShardError:
        return ShardError(f"input shard {redact_url(url)}: cannot read: {problem}")

    try:
        source, compression = _tar_stream(stream)
        with tarfile.open(fileobj=source, mode="r|", encoding="utf-8",
                          errors="surrogateescape", tarinfo=_StrictInfo) as tar:
            for info in tar:
                if info.isdir():
                    continue
                shown = printable(info.name)
                if not info.isreg():
                    kind = _TYPES.get(info.type, f"member of type {info.type!r}")
                    link = f" to '{printable(info.linkname)}'" if info.linkname else ""
                    yield Member(info.name, None, ("member", (
                        f"member '{shown}' is a {kind}{link}; allowed: regular files (links "
                        "are not followed)")), url)
                elif info.size > max_member_bytes:
                    yield Member(info.name, None, ("size", (
                        f"member '{shown}' is {info.size:,} bytes; allowed: at most "
                        f"{max_member_bytes:,} (16 bytes per pixel of input.max_pixels, at "
                        "least 64 MiB); it was not read")), url)
                else:
                    data = tar.extractfile(info).read()  # type: ignore[union-attr]
                    yield Member(info.name, data, None, url)
            _check_after_end(tar, compression)
    except _TarError as exc:
        raise refuse(str(exc)) from exc


def _check_after_end(tar: tarfile.TarFile, compression: str) -> None:
    """Read the stream past the end-of-archive block: zero padding only, and for a compressed
    shard the end of its compressed stream."""
    while chunk := tar.fileobj.read(2**20):  # type: ignore[union-attr]
        if chunk.count(0) != len(chunk):
            raise _TarError(f"data after the end-of-archive block at byte {tar.offset:,} of "
                              "its tar data (another tar appended?); the members there cannot "
                              f"be read ({compression})")
