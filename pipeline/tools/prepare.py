"""Turn folders, globs and URL lists of images into WebDataset input shards for a job.

Each image is centre-cropped to a square, resized (LANCZOS) and written as `{key}.png`; with
`strokes="simulate"` the guide is its simulated stroke painting and `{key}.target.png` the
original. Files that cannot be read are skipped and reported, never dropped silently. See
docs/inputs.md."""

from __future__ import annotations

import io
import logging
import posixpath
import re
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import webdataset as wds
from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm import tqdm

from pipeline.errors import PipelineError, StorageError
from pipeline.images import encode_image, to_rgb
from pipeline.storage import FileSystem, url_fs
from pipeline.tools.strokes import simulate_strokes

__all__ = ["PrepareReport", "prepare", "sanitize_key"]

log = logging.getLogger(__name__)

SHARD_PATTERN = "shard-{index:06d}.tar"
_GLOB_CHARS = re.compile(r"[*?\[]")
_UNSAFE_KEY_CHARS = re.compile(r"[^A-Za-z0-9_-]")
_TAR_MTIME = 0.0  # fixed member mtime: the same inputs give byte-identical shards

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class PrepareReport:
    """What `prepare` wrote; `skipped`: (file URL, error) of each file that could not be read."""

    n_images: int
    n_shards: int
    shards: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    @property
    def n_files(self) -> int:
        """Files found in the sources: written + skipped."""
        return self.n_images + len(self.skipped)


@dataclass(frozen=True)
class _Source:
    """One file to prepare: where to read it and its path relative to its source root."""

    fs: FileSystem
    path: str
    relpath: str

    @property
    def url(self) -> str:
        return self.fs.unstrip_protocol(self.path)


def sanitize_key(relpath: str) -> str:
    """A WebDataset-safe key from a relative path: extension dropped, characters other than
    [A-Za-z0-9_-] as '_' (a key ends at the first dot). The caller makes keys unique."""
    stem, _ = posixpath.splitext(relpath.strip("/"))
    key = _UNSAFE_KEY_CHARS.sub("_", stem or relpath)
    return key or "_"


def _unique_keys(relpaths: Sequence[str]) -> list[str]:
    """Sanitized keys for `relpaths`, deduplicated in order by suffixes _1, _2, ..."""
    used: set[str] = set()
    keys = []
    for relpath in relpaths:
        base = key = sanitize_key(relpath)
        n = 0
        while key in used:
            n += 1
            key = f"{base}_{n}"
        used.add(key)
        keys.append(key)
    return keys


def _find_files(fs: FileSystem, root: str) -> list[tuple[str, str]]:
    """(path, relpath) of every file under directory `root`, recursively."""
    root = root.rstrip("/")
    return [(p, posixpath.relpath(p, root)) for p in fs.find(root)]


def _expand_list_file(
    fs: FileSystem, path: str, storage_options: dict[str, Any]
) -> list[_Source]:
    """Entries of a .txt list file, one URL or path per line ('#' comments and blanks ignored),
    relative ones against the list's folder; keys from the entries' longest common folder."""
    try:
        text = fs.cat_file(path).decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise StorageError(f"cannot read list file {fs.unstrip_protocol(path)}: {exc}") from exc
    folder = fs.unstrip_protocol(posixpath.dirname(path))
    entries = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if "://" not in line and not line.startswith("/"):
            protocol, _, folder_path = folder.rpartition("://")
            line = f"{protocol}://{posixpath.normpath(posixpath.join(folder_path, line))}"
        entry_fs, entry_path = url_fs(line, storage_options)
        entries.append((entry_fs, entry_path, line.split("://", 1)[-1]))
    if not entries:
        return []
    common = posixpath.commonpath([posixpath.dirname(bare) for _, _, bare in entries])
    return [_Source(f, p, posixpath.relpath(bare, common) if common else bare)
            for f, p, bare in entries]


def _expand_source(source: str, storage_options: dict[str, Any]) -> list[_Source]:
    """Files of one source: a folder (recursive), a glob, a .txt list of URLs, or one file."""
    fs, path = url_fs(source, storage_options)
    if _GLOB_CHARS.search(path):
        root = path[:_GLOB_CHARS.search(path).start()].rpartition("/")[0]  # type: ignore[union-attr]
        found: list[tuple[str, str]] = []
        for match, info in fs.glob(path, detail=True).items():
            if info.get("type") == "directory":
                found += [(p, posixpath.relpath(p, root)) for p, _ in _find_files(fs, match)]
            else:
                found.append((match, posixpath.relpath(match, root) if root else match))
        if not found:
            raise PipelineError(f"source {source!r}: the pattern matches no files")
        return [_Source(fs, p, r) for p, r in found]
    if fs.isdir(path):
        files = _find_files(fs, path)
        if not files:
            raise PipelineError(f"source {source!r}: the folder holds no files")
        return [_Source(fs, p, r) for p, r in files]
    if not fs.isfile(path):
        raise PipelineError(f"source {source!r} does not exist (expected a folder, glob, image "
                            "file or .txt list of URLs)")
    if path.lower().endswith(".txt"):
        entries = _expand_list_file(fs, path, storage_options)
        if not entries:
            raise PipelineError(f"source {source!r}: the list file holds no URLs")
        return entries
    return [_Source(fs, path, posixpath.basename(path))]


def _load_square(source: _Source, size: int) -> Image.Image:
    """Read and decode one image; centre-crop to a square and resize to (size, size) RGB."""
    with source.fs.open(source.path, "rb") as f:
        data = f.read()
    with Image.open(io.BytesIO(data)) as image:
        rgb = to_rgb(image)
    return ImageOps.fit(rgb, (size, size), method=Image.Resampling.LANCZOS)


def _ordered_map(fn: Callable[[T], R], items: Sequence[T], workers: int) -> Iterator[R]:
    """`map(fn, items)` on a thread pool, in order, with at most 4 * workers items in flight."""
    if workers <= 1:
        yield from map(fn, items)
        return
    window = 4 * workers
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="prepare") as pool:
        pending = [pool.submit(fn, item) for item in items[:window]]
        next_index = len(pending)
        while pending:
            result = pending.pop(0).result()
            if next_index < len(items):
                pending.append(pool.submit(fn, items[next_index]))
                next_index += 1
            yield result


def _existing_shards(fs: FileSystem, root: str) -> list[str]:
    return sorted(fs.glob(f"{root}/shard-*.tar")) if fs.isdir(root) else []


def prepare(
    sources: Sequence[str],
    out: str,
    *,
    shard_size: int = 1000,
    size: int = 256,
    strokes: Literal["simulate", "none"] = "none",
    storage_options: dict[str, Any] | None = None,
    progress: bool = True,
    overwrite: bool = False,
    workers: int = 4,
) -> PrepareReport:
    """Write images from `sources` as WebDataset shards `{out}/shard-000000.tar`, ...

    Args:
        sources: image folders (recursive), globs, image files, or .txt files of one URL / path per
            line; local or fsspec URLs.
        strokes: "none": `{key}.png` is the image; "simulate": its stroke painting, and
            `{key}.target.png` the image.
        overwrite: replace shards already in `out` (else they are an error).

    Raises:
        PipelineError: bad arguments, a source that does not exist or matches nothing, or shards
            already in `out` without `overwrite`.
        StorageError: `out` cannot be written.
    """
    if shard_size < 1:
        raise PipelineError(f"shard_size must be >= 1, got {shard_size}")
    if size < 8:
        raise PipelineError(f"size must be >= 8 pixels, got {size}")
    if strokes not in ("simulate", "none"):
        raise PipelineError(f"strokes must be 'simulate' or 'none', got {strokes!r}")
    if not sources:
        raise PipelineError("no sources given")
    options = dict(storage_options or {})
    files = [file for source in sources for file in _expand_source(source, options)]
    files.sort(key=lambda s: (s.relpath, s.url))
    keys = _unique_keys([s.relpath for s in files])
    log.info("preparing %d file(s) from %d source(s) into %s", len(files), len(sources), out)
    out = out.rstrip("/")
    out_fs, out_root, old_shards = _output_folder(out, options, overwrite)
    results = _ordered_map(lambda source: _load_members(source, size, strokes), files, workers)
    shards: list[str] = []
    skipped: list[tuple[str, str]] = []
    n_images = 0
    writer: _ShardWriter | None = None
    try:
        for source, key, (members, error) in tqdm(
            zip(files, keys, results, strict=True), total=len(files), disable=not progress,
            unit="img", desc="prepare",
        ):
            if members is None:
                skipped.append((source.url, error or "unknown error"))
                continue
            if writer is None or n_images % shard_size == 0:
                if writer is not None:
                    writer.close()
                name = SHARD_PATTERN.format(index=len(shards))
                writer = _ShardWriter(out_fs, f"{out_root}/{name}")
                shards.append(f"{out}/{name}")
            writer.tar.write({"__key__": key, **members})
            n_images += 1
    except OSError as exc:
        raise StorageError(f"cannot write shards to {out}: {exc}") from exc
    finally:
        if writer is not None:
            writer.close()
    written = {f"{out_root}/{SHARD_PATTERN.format(index=i)}" for i in range(len(shards))}
    for path in old_shards:
        if path not in written:
            out_fs.rm_file(path)
    if skipped:
        log.warning("skipped %d unreadable file(s) of %d: %s", len(skipped), len(files),
                    "; ".join(f"{url} ({error})" for url, error in skipped))
    log.info("wrote %d image(s) in %d shard(s) to %s", n_images, len(shards), out)
    return PrepareReport(n_images=n_images, n_shards=len(shards), shards=shards, skipped=skipped)


def _output_folder(out: str, options: dict[str, Any],
                   overwrite: bool) -> tuple[FileSystem, str, list[str]]:
    """(filesystem, root, shards already there) of the output folder, created if missing;
    PipelineError when it holds shards and `overwrite` is off."""
    out_fs, out_root = url_fs(out, options)
    old_shards = _existing_shards(out_fs, out_root)
    if old_shards and not overwrite:
        raise PipelineError(f"{out} already holds {len(old_shards)} shard(s); pass overwrite "
                            "(--overwrite) to replace them")
    try:
        out_fs.makedirs(out_root, exist_ok=True)
    except OSError as exc:
        raise StorageError(f"cannot create output folder {out}: {exc}") from exc
    return out_fs, out_root, old_shards


def _load_members(source: _Source, size: int,
                  strokes: str) -> tuple[dict[str, bytes] | None, str | None]:
    """(members of one sample, None), or (None, why the file cannot be read)."""
    try:
        image = _load_square(source, size)
    except UnidentifiedImageError:
        return None, "not a recognised image format"
    except Exception as exc:  # any failure of one file is reported, not fatal
        return None, f"{type(exc).__name__}: {exc}"
    if strokes == "simulate":
        return {"png": encode_image(simulate_strokes(image)),
                "target.png": encode_image(image)}, None
    return {"png": encode_image(image)}, None


class _ShardWriter:
    """One output tar being written, with a fixed mtime: the same inputs give the same bytes."""

    def __init__(self, fs: FileSystem, path: str) -> None:
        self.stream = fs.open(path, "wb")
        self.tar = wds.TarWriter(self.stream, mtime=_TAR_MTIME)

    def close(self) -> None:
        self.tar.close()
        self.stream.close()
