"""Keys that occur in more than one input shard of a job, counted in bounded memory.

Not an error, but joins on the key alone are ambiguous for them. One 64-bit hash per distinct key
and shard is counted, in hash partitions on disk beyond `PARTITION_ROWS`; exact but for hash
collisions. See docs/outputs.md, "status"."""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import StorageError
from pipeline.output.folder import OutputFolder
from pipeline.output.layout import MANIFESTS
from pipeline.redaction import redact_url
from pipeline.storage import describe_error, url_fs, with_retries

__all__ = ["AUTO_ROWS", "PARTITION_ROWS", "count_repeated_keys"]

AUTO_ROWS = 1_000_000
"""Manifest rows up to which `run` and `status` count repeated keys without being asked."""
PARTITION_ROWS = 4_000_000
"""Key hashes counted in memory at once (8 bytes each)."""
_CHUNK = 64
"""Manifests read per thread task."""


def _key_hashes(data: bytes) -> np.ndarray:
    """int64 hashes of the distinct keys of one manifest's Parquet bytes (Python's string hash:
    stable within this process, which is all one count needs)."""
    keys = pq.read_table(pa.BufferReader(data), columns=["key"]).column("key").to_pylist()
    hashes = np.fromiter((hash(k) for k in keys if k is not None), np.int64, len(keys))
    return np.unique(hashes)


def _manifests(folder: OutputFolder, stems: list[str], workers: int,
               on_unreadable: Callable[[str, str], None] | None) -> Iterator[np.ndarray]:
    """Key hashes per manifest of `stems`; an unreadable manifest goes to `on_unreadable(stem,
    why)`, or (None) raises StorageError."""
    output, options = folder.path, folder.options
    fs, _ = url_fs(output, options)
    paths = [url_fs(folder.shard_urls(stem).manifest, options)[1] for stem in stems]
    stem_of = dict(zip(paths, stems, strict=True))

    def read(chunk: list[str]) -> list[np.ndarray]:
        found = with_retries(lambda: fs.cat(chunk, on_error="return"), what="read manifests",
                             url=output)
        out = []
        for path in chunk:
            blob = found.get(path)
            if isinstance(blob, FileNotFoundError) or blob is None:
                continue  # a marker without its manifest: nothing to count
            if isinstance(blob, BaseException):
                raise StorageError(f"cannot read manifest {redact_url(path)}: "
                                   f"{describe_error(blob)}")
            try:
                out.append(_key_hashes(blob))
            except Exception as exc:  # cut short, or no Parquet at all
                if on_unreadable is None:
                    raise StorageError(f"manifest {redact_url(path)} cannot be read: "
                                       f"{describe_error(exc)}") from exc
                on_unreadable(stem_of[path], f"{MANIFESTS}/{stem_of[path]}.parquet cannot be "
                                             f"read: {describe_error(exc)}")
        return out

    chunks = [paths[i:i + _CHUNK] for i in range(0, len(paths), _CHUNK)]
    with ThreadPoolExecutor(workers) as pool:
        for start in range(0, len(chunks), workers):  # at most `workers` chunks in memory
            for result in pool.map(read, chunks[start:start + workers]):
                yield from result


def _repeated(hashes: np.ndarray) -> int:
    """Distinct values that occur more than once."""
    if hashes.size < 2:
        return 0
    hashes.sort()
    same = hashes[1:] == hashes[:-1]
    return int(same[0]) + int(np.count_nonzero(same[1:] & ~same[:-1]))


def count_repeated_keys(folder: OutputFolder, stems: Iterable[str], rows: int | None = None,
                        limit: int | None = None, workers: int = 8,
                        on_unreadable: Callable[[str, str], None] | None = None) -> int | None:
    """How many keys occur in the manifests of more than one of the done shards `stems`.

    `rows` (from the markers, if known) sets the partitions; past `limit` rows read it gives up
    (None). An unreadable manifest goes to `on_unreadable(stem, why)` and is left out, or without
    it raises StorageError."""
    stems = list(stems)
    partitions = max(1, math.ceil((rows or 0) / PARTITION_ROWS))
    if partitions == 1:
        parts: list[np.ndarray] = []
        seen = 0
        for hashes in _manifests(folder, stems, workers, on_unreadable):
            parts.append(hashes)
            seen += hashes.size
            if limit is not None and seen > limit:
                return None
        return _repeated(np.concatenate(parts)) if parts else 0
    with tempfile.TemporaryDirectory(prefix="sdedit-keys-") as tmp:
        files = [open(os.path.join(tmp, f"{p}.bin"), "wb")  # noqa: SIM115 - closed below
                 for p in range(partitions)]
        try:
            for hashes in _manifests(folder, stems, workers, on_unreadable):
                slot = (hashes.view(np.uint64) % np.uint64(partitions)).astype(np.int64)
                order = np.argsort(slot, kind="stable")
                bounds = np.searchsorted(slot[order], np.arange(partitions + 1))
                for p in range(partitions):
                    if bounds[p + 1] > bounds[p]:
                        files[p].write(hashes[order[bounds[p]:bounds[p + 1]]].tobytes())
        finally:
            for handle in files:
                handle.close()
        return sum(_repeated(np.fromfile(os.path.join(tmp, f"{p}.bin"), np.int64))
                   for p in range(partitions))
