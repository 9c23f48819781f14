"""`OutputFolder`: one job's output location, the one owner of what it holds.

```
OUT/job.json                  what the job is (`read_record` / `write_record`)
OUT/shards/{stem}.tar         a shard's outputs   } written by `shard_writer(stem)`,
OUT/manifests/{stem}.parquet  its manifest        } published before
OUT/done/{stem}.json          its commit marker   } the marker, last
OUT/failed/{stem}.json        a shard that failed after its retries (`record_failure`)
OUT/scores/{stem}.parquet     its scores, before the marker (or later: `write_scores`)
OUT/scores/settings.json      the settings of those scores (`read_score_settings`)
```
Every other module asks it: which shards are done or failed (one listing each, no request per
shard), what is left to do, the job record, the markers' contents and the manifests.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from pipeline.errors import ResumeConflictError, StorageError
from pipeline.input.shards import unique_stems
from pipeline.job.spec import JobSpec
from pipeline.output.layout import (
    DONE,
    FAILED,
    JOB_RECORD,
    MANIFESTS,
    MARKER_SUFFIX,
    RESULT_FOLDERS,
    SCORE_SETTINGS,
    SCORES,
    SHARDS,
    ShardUrls,
    marker_stem,
)
from pipeline.output.manifest import MANIFEST_SCHEMA
from pipeline.output.scores import SCORE_SCHEMA, read_metadata, scores_bytes
from pipeline.output.writer import ShardOutput
from pipeline.redaction import redact_url
from pipeline.storage import (
    check_writable,
    describe_error,
    join,
    put_bytes_atomic,
    url_fs,
    with_retries,
)

logger = logging.getLogger(__name__)

__all__ = ["OutputFolder"]

_CHUNK = 256
"""Markers read per thread task."""
_WORKERS = 16
"""Threads reading markers (local disks and object stores both gain from several reads)."""


class OutputFolder:
    """The output location `path` (local or fsspec URL) read with `storage_options`."""

    def __init__(self, path: str, storage_options: Mapping[str, Any] | None = None) -> None:
        self.path = path
        self.options = dict(storage_options or {})

    @classmethod
    def of(cls, spec: JobSpec) -> OutputFolder:
        """The output folder of a job."""
        return cls(spec.output.path, spec.output.storage_options)

    def __repr__(self) -> str:
        return f"OutputFolder({redact_url(self.path)!r})"

    # names
    def url(self, *parts: str) -> str:
        """`OUT/part/...`, keeping the output's protocol."""
        return join(self.path, *parts)

    def shard_urls(self, stem: str) -> ShardUrls:
        """Where shard `stem`'s tar, manifest and commit marker go."""
        return ShardUrls(tar=self.url(SHARDS, f"{stem}.tar"),
                         manifest=self.url(MANIFESTS, f"{stem}.parquet"),
                         marker=self.url(DONE, stem + MARKER_SUFFIX))

    def check_writable(self) -> None:
        """Refuse an output location that cannot be written (a probe object, deleted again)."""
        check_writable(self.path, self.options)

    # job.json
    def read_record(self) -> dict[str, Any] | None:
        """OUT/job.json, or None when there is none.

        Raises:
            StorageError: it cannot be read (naming where and why).
            ResumeConflictError: it is not a JSON object (what the output holds is unknown).
        """
        url = self.url(JOB_RECORD)
        try:
            fs, path = url_fs(url, self.options)
            data = with_retries(lambda: fs.cat_file(path), what="read", url=url)
        except FileNotFoundError:
            return None
        except StorageError:
            raise
        except Exception as exc:
            raise StorageError(f"cannot read {redact_url(url)}: {describe_error(exc)}") from exc
        try:
            record = json.loads(data)
        except ValueError as exc:
            record = exc
        if not isinstance(record, dict):
            what = record if isinstance(record, Exception) else type(record).__name__
            raise ResumeConflictError(
                f"output {redact_url(self.path)}: its {JOB_RECORD} cannot be read as a job "
                f"record ({what}); use a new output.path, or --overwrite to discard its results")
        return record

    def write_record(self, record: Mapping[str, Any]) -> None:
        """Write OUT/job.json; StorageError naming it and the cause when that fails."""
        self._put(self.url(JOB_RECORD), record)

    def discard_results(self) -> None:
        """Remove every result folder (`run --overwrite`); job.json is rewritten after."""
        for sub in RESULT_FOLDERS:
            url = self.url(sub)
            try:
                fs, path = url_fs(url, self.options)
                if fs.exists(path):
                    logger.warning("--overwrite: removing %s", redact_url(url))
                    if os.path.isdir(path):
                        shutil.rmtree(path)
                    else:
                        fs.rm(path, recursive=True)
            except Exception as exc:
                raise StorageError(f"--overwrite: cannot remove {redact_url(url)}: "
                                   f"{describe_error(exc)}") from exc

    # markers
    def done_stems(self) -> set[str]:
        """Stems whose commit marker exists, from one listing of `done/`."""
        return {stem for stem, _ in self._marker_files(DONE)}

    def failed_stems(self) -> set[str]:
        """Stems with a failure record, from one listing of `failed/`."""
        return {stem for stem, _ in self._marker_files(FAILED)}

    def is_done(self, stem: str) -> bool:
        """Whether shard `stem`'s commit marker exists (one request)."""
        url = self.shard_urls(stem).marker
        fs, path = url_fs(url, self.options)
        return bool(with_retries(lambda: fs.exists(path), what="check done marker", url=url))

    def plan(self, shards: Sequence[str]) -> tuple[list[str], list[str]]:
        """Split `shards` into (pending, done), in input order, by their commit markers (one
        listing of `done/`; a missing output folder means nothing is done)."""
        stems = unique_stems(shards)
        done = self.done_stems()
        pending = [url for stem, url in stems.items() if stem not in done]
        finished = [url for stem, url in stems.items() if stem in done]
        extra = len(done - stems.keys())
        if extra:
            logger.info("%d commit marker(s) in %s belong to no input shard", extra,
                        redact_url(self.path))
        return pending, finished

    def markers(self, folder: str) -> Iterator[tuple[str, dict[str, Any] | None]]:
        """(stem, content) of every marker of `folder` (DONE or FAILED), read `_CHUNK` at a
        time by `_WORKERS` threads; content None when it is not a JSON object.

        Raises:
            StorageError: the folder cannot be listed or a marker cannot be read.
        """
        files = self._marker_files(folder)
        url = self.url(folder)
        fs, _ = url_fs(url, self.options)

        def read(chunk: list[tuple[str, str]]) -> list[tuple[str, dict[str, Any] | None]]:
            try:
                found = with_retries(
                    lambda: fs.cat([name for _, name in chunk], on_error="return"),
                    what="read markers", url=url)
            except Exception as exc:
                raise StorageError(f"cannot read markers in {redact_url(url)}: "
                                   f"{describe_error(exc)}") from exc
            out = []
            for stem, name in chunk:
                blob = found.get(name)
                if isinstance(blob, FileNotFoundError):
                    continue  # removed since the listing
                if isinstance(blob, BaseException) or blob is None:
                    raise StorageError(f"cannot read {redact_url(name)}: "
                                       f"{describe_error(blob or OSError('no data'))}")
                out.append((stem, _json_object(blob)))
            return out

        chunks = [files[i:i + _CHUNK] for i in range(0, len(files), _CHUNK)]
        with ThreadPoolExecutor(_WORKERS) as pool:
            for start in range(0, len(chunks), _WORKERS):  # at most _WORKERS chunks in memory
                for result in pool.map(read, chunks[start:start + _WORKERS]):
                    yield from result

    def record_failure(self, stem: str, record: Mapping[str, Any]) -> None:
        """Write `failed/{stem}.json`; StorageError "cannot write the failure record URL: ..."
        when that fails."""
        url = self.url(FAILED, stem + MARKER_SUFFIX)
        try:
            put_bytes_atomic(url, json.dumps(dict(record), indent=1).encode(), self.options)
        except Exception as exc:
            raise StorageError(f"cannot write the failure record {redact_url(url)}: "
                               f"{describe_error(exc)}") from exc

    def clear_failure(self, stem: str) -> bool:
        """Remove `failed/{stem}.json` of a shard that has now committed; best effort (`status`
        ignores a failure record whose shard is done). True when it is gone."""
        url = self.url(FAILED, stem + MARKER_SUFFIX)
        try:
            fs, path = url_fs(url, self.options)
            with_retries(lambda: fs.rm_file(path), what="remove failed record", url=url)
        except FileNotFoundError:
            pass
        except Exception as exc:
            logger.warning("could not remove %s: %s", redact_url(url), describe_error(exc))
            return False
        return True

    # results
    def shard_writer(self, stem: str, scores: Mapping[str, Any] | None = None) -> ShardOutput:
        """A writer of shard `stem`'s tar, manifest, score sidecar (when `scores`, its
        metadata, is given) and marker, published in that order by its `commit`."""
        sidecar = None if scores is None else (self.scores_url(stem), scores)
        return ShardOutput(self.shard_urls(stem), stem, self.options, sidecar)

    # scores
    def scores_url(self, stem: str) -> str:
        """Where shard `stem`'s score sidecar goes."""
        return self.url(SCORES, f"{stem}.parquet")

    def has_scores(self, stem: str) -> bool:
        """Whether shard `stem` has a score sidecar (one request)."""
        url = self.scores_url(stem)
        fs, path = url_fs(url, self.options)
        return bool(with_retries(lambda: fs.exists(path), what="check scores", url=url))

    def scored_stems(self) -> set[str]:
        """Stems with a score sidecar, from one listing of `scores/`."""
        url = self.url(SCORES)
        try:
            fs, path = url_fs(url, self.options)
            fs.invalidate_cache(path)
            names = fs.ls(path, detail=False)
        except FileNotFoundError:
            return set()
        except Exception as exc:
            raise StorageError(f"cannot list {redact_url(url)}: {describe_error(exc)}") from exc
        bases = (name.rstrip("/").rsplit("/", 1)[-1] for name in names)
        return {base[:-8] for base in bases if base.endswith(".parquet") and
                not base.startswith(".")}

    def write_scores(self, stem: str, rows: Sequence[Mapping[str, Any]],
                     metadata: Mapping[str, Any]) -> None:
        """Publish shard `stem`'s sidecar (rows made by `pipeline.output.scores.score_row`)."""
        url = self.scores_url(stem)
        try:
            put_bytes_atomic(url, scores_bytes(rows, metadata), self.options)
        except StorageError:
            raise
        except Exception as exc:
            raise StorageError(f"cannot write {redact_url(url)}: {describe_error(exc)}") from exc

    def read_scores(self, stem: str) -> tuple[pa.Table, dict[str, Any]] | None:
        """Shard `stem`'s sidecar and what made it, or None when it has none."""
        return self._read_parquet(self.scores_url(stem), SCORE_SCHEMA)

    def read_manifest(self, stem: str) -> pa.Table | None:
        """Shard `stem`'s manifest (read with MANIFEST_SCHEMA), or None when it has none."""
        found = self._read_parquet(self.shard_urls(stem).manifest, MANIFEST_SCHEMA)
        return None if found is None else found[0]

    def read_score_settings(self) -> dict[str, Any] | None:
        """The settings recorded in `scores/settings.json`, or None when there are none."""
        url = self.url(SCORES, SCORE_SETTINGS)
        try:
            fs, path = url_fs(url, self.options)
            data = with_retries(lambda: fs.cat_file(path), what="read", url=url)
        except FileNotFoundError:
            return None
        except Exception as exc:
            raise StorageError(f"cannot read {redact_url(url)}: {describe_error(exc)}") from exc
        return _json_object(data)

    def write_score_settings(self, settings: Mapping[str, Any]) -> None:
        """Record the settings of the output's scores (`scores/settings.json`)."""
        self._put(self.url(SCORES, SCORE_SETTINGS), settings)

    def discard_scores(self) -> None:
        """Remove every sidecar and the settings (`score --overwrite`)."""
        url = self.url(SCORES)
        try:
            fs, path = url_fs(url, self.options)
            if fs.exists(path):
                logger.warning("--overwrite: removing %s", redact_url(url))
                fs.rm(path, recursive=True)
        except Exception as exc:
            raise StorageError(f"--overwrite: cannot remove {redact_url(url)}: "
                               f"{describe_error(exc)}") from exc

    def _read_parquet(self, url: str, schema: pa.Schema
                      ) -> tuple[pa.Table, dict[str, Any]] | None:
        try:
            fs, path = url_fs(url, self.options)
            data = with_retries(lambda: fs.cat_file(path), what="read", url=url)
        except FileNotFoundError:
            return None
        except Exception as exc:
            raise StorageError(f"cannot read {redact_url(url)}: {describe_error(exc)}") from exc
        table = pq.read_table(pa.BufferReader(data))
        metadata = read_metadata(table.schema)
        missing = [f for f in schema if f.name not in table.column_names]
        for f in missing:  # written before the column existed: null
            table = table.append_column(f, pa.nulls(len(table), f.type))
        return table.select(schema.names).cast(schema), metadata

    def read_manifests(self, columns: list[str], where: pc.Expression | None = None
                       ) -> pa.Table:
        """`columns` of every manifest (rows matching `where`), as one table; read with
        MANIFEST_SCHEMA, so manifests written before a column existed read with it null. No
        manifests: an empty table."""
        url = self.url(MANIFESTS)
        fs, path = url_fs(url, self.options)
        schema = pa.schema([MANIFEST_SCHEMA.field(name) for name in columns])
        try:
            if not fs.exists(path):
                return schema.empty_table()
            dataset = pads.dataset(path, filesystem=fs, format="parquet", schema=MANIFEST_SCHEMA)
            return dataset.to_table(columns=columns, filter=where)
        except Exception as exc:
            raise StorageError(f"cannot read the manifests in {redact_url(url)}: "
                               f"{describe_error(exc)}") from exc

    def _marker_files(self, folder: str) -> list[tuple[str, str]]:
        """(stem, path) of each marker in `folder`, from one fresh listing ([] if none)."""
        url = self.url(folder)
        try:
            fs, path = url_fs(url, self.options)
            fs.invalidate_cache(path)  # markers written since an earlier listing must show
            names = fs.ls(path, detail=False)
            fs.invalidate_cache(path)  # a listing of 100,000 entries is not kept
        except FileNotFoundError:
            return []
        except Exception as exc:
            raise StorageError(f"cannot list {folder}/ markers in {redact_url(self.path)}: "
                               f"{describe_error(exc)}") from exc
        return [(stem, name) for name in names if (stem := marker_stem(name)) is not None]

    def _put(self, url: str, record: Mapping[str, Any]) -> None:
        try:
            put_bytes_atomic(url, json.dumps(dict(record), indent=1).encode(), self.options)
        except StorageError:
            raise
        except Exception as exc:
            raise StorageError(f"cannot write {redact_url(url)}: {describe_error(exc)}") from exc


def _json_object(blob: bytes) -> dict[str, Any] | None:
    try:
        data = json.loads(blob)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None
