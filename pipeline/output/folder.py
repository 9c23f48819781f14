"""`OutputFolder`: one job's output location, the one owner of what it holds.

Every other module asks it about an output (done and failed shards, damaged commits, the job
record, markers, manifests, the lease) and writes through it. See docs/outputs.md."""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from pipeline.errors import StorageError
from pipeline.input.shards import unique_stems
from pipeline.job.spec import JobSpec
from pipeline.output.commits import (
    Listing,
    Plan,
    damage,
    modified,
    remove_stale_temps,
    sizes_by_stem,
    unsure,
)
from pipeline.output.layout import (
    DONE,
    FAILED,
    JOB_RECORD,
    LEASE,
    MANIFESTS,
    MARKER_SUFFIX,
    RESULT_FOLDERS,
    SHARDS,
    ShardUrls,
    marker_stem,
)
from pipeline.output.lease import LEASE_TIMEOUT_S, Lease, LeaseState
from pipeline.output.recordcheck import parse_record
from pipeline.output.tables import ResultTables, json_object
from pipeline.output.writer import ShardOutput
from pipeline.redaction import redact_url
from pipeline.storage import (
    check_writable,
    describe_error,
    is_local,
    join,
    put_bytes_atomic,
    url_fs,
    with_retries,
)

logger = logging.getLogger(__name__)

__all__ = ["OutputFolder", "Plan"]

_CHUNK = 256
"""Markers read per thread task."""
_WORKERS = 16
"""Threads reading markers (local disks and object stores both gain from several reads)."""


class OutputFolder(ResultTables):
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
            StorageError: it cannot be read.
            ResumeConflictError: it is not a job record (`pipeline.output.recordcheck`) or was
                written by a newer version."""
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
        return parse_record(data, f"output {redact_url(self.path)}: its {JOB_RECORD}")

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

    def plan(self, shards: Sequence[str]) -> Plan:
        """`shards` split into pending and done, in input order; done = a marker and a whole tar
        and manifest. One listing per folder; a marker is read only where the listings cannot
        vouch for it."""
        stems = unique_stems(shards)
        done = {stem: (name, time_) for stem, name, time_ in self._marker_listing(DONE)}
        listing = self.listing()  # after done/: a listed marker's files were there before it
        plan, problems, unsure_ = Plan(), {}, []
        for stem in stems:
            if stem in done:
                problem = damage(stem, None, listing)  # missing or empty: no marker needed
                if problem is not None:
                    problems[stem] = problem
                elif unsure(stem, done[stem][1], listing):
                    unsure_.append((stem, done[stem][0]))
        for stem, marker in self.markers(DONE, unsure_):
            plan.markers_read += 1
            problem = damage(stem, marker, listing)
            if problem is not None:
                problems[stem] = problem
        for stem, url in stems.items():
            if stem in done and stem not in problems:
                plan.done.append(url)
            else:
                plan.pending.append(url)
                if stem in problems:
                    plan.damaged[url] = problems[stem]
        extra = len(done.keys() - stems.keys())
        if extra:
            logger.info("%d commit marker(s) in %s belong to no input shard", extra,
                        redact_url(self.path))
        return plan

    def listing(self) -> Listing:
        """The sizes of the tars and the manifests, temporary files left out."""
        return Listing(tars=self._sizes(SHARDS, ".tar"), manifests=self._sizes(MANIFESTS,
                                                                                ".parquet"))

    def uncommit(self, stems: Sequence[str]) -> None:
        """Remove the commit markers of `stems` (damaged commits the run makes again; only under
        the lease); StorageError naming a marker that cannot be removed."""
        for stem in stems:
            url = self.shard_urls(stem).marker
            try:
                fs, path = url_fs(url, self.options)
                with_retries(functools.partial(fs.rm_file, path), what="remove commit marker",
                             url=url)
            except FileNotFoundError:
                pass
            except Exception as exc:
                raise StorageError(f"cannot remove the commit marker {redact_url(url)} of a "
                                   f"damaged shard: {describe_error(exc)}") from exc

    def markers(self, folder: str, files: list[tuple[str, str]] | None = None
                ) -> Iterator[tuple[str, dict[str, Any] | None]]:
        """(stem, content) of every marker of `folder` (DONE or FAILED), or of `files` ((stem,
        path)), read by a thread pool; content None when not a JSON object. StorageError when
        unreadable."""
        if files is None:
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
                out.append((stem, json_object(blob)))
            return out

        chunks = [files[i:i + _CHUNK] for i in range(0, len(files), _CHUNK)]
        with ThreadPoolExecutor(_WORKERS) as pool:
            for start in range(0, len(chunks), _WORKERS):  # at most _WORKERS chunks in memory
                for result in pool.map(read, chunks[start:start + _WORKERS]):
                    yield from result

    def record_failure(self, stem: str, record: Mapping[str, Any]) -> None:
        """Write `failed/{stem}.json`; StorageError naming it when that fails."""
        url = self.url(FAILED, stem + MARKER_SUFFIX)
        put_bytes_atomic(url, json.dumps(dict(record), indent=1).encode(), self.options,
                         what="the failure record")

    def clear_failure(self, stem: str) -> bool:
        """Remove the failure record of a shard that has now committed; best effort (`status`
        ignores a record whose shard is done). True when it is gone."""
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
        """A writer of shard `stem`'s tar, manifest, score sidecar (when `scores`, its metadata,
        is given) and marker, published in that order by its `commit`."""
        sidecar = None if scores is None else (self.scores_url(stem), scores)
        return ShardOutput(self.shard_urls(stem), stem, self.options, sidecar)

    # who writes here
    def lease(self, job: str = "", **options: Any) -> Lease:
        """The lease of this output for a run of `job`; a `with` block holds it."""
        return Lease(self.url(LEASE), self.path, self.options, job=job, **options)

    def lease_state(self, **options: Any) -> LeaseState | None:
        """The lease as it is now (None: no run holds it); StorageError when it cannot be read."""
        return self.lease(**options).state()

    def remove_stale_temps(self, max_age_s: float = LEASE_TIMEOUT_S) -> int:
        """Remove the temporary files writers that are gone left in a local output (object stores
        hold none); call it holding the lease. Returns how many went."""
        fs, root = url_fs(self.path, self.options)
        if not is_local(fs):
            return 0
        removed = remove_stale_temps(fs._strip_protocol(root), RESULT_FOLDERS, max_age_s)
        if removed:
            logger.info("removed %d temporary file(s) of earlier runs from %s", removed,
                        redact_url(self.path))
        return removed

    def _sizes(self, folder: str, suffix: str) -> dict[str, int]:
        """stem -> size of each `{stem}{suffix}` in `folder` (one fresh listing)."""
        url = self.url(folder)
        try:
            fs, path = url_fs(url, self.options)
            fs.invalidate_cache(path)
            entries = fs.ls(path, detail=True)
            fs.invalidate_cache(path)
        except FileNotFoundError:
            return {}
        except Exception as exc:
            raise StorageError(f"cannot list {folder}/ in {redact_url(self.path)}: "
                               f"{describe_error(exc)}") from exc
        return sizes_by_stem(entries, suffix)

    def _marker_files(self, folder: str) -> list[tuple[str, str]]:
        """(stem, path) of each marker in `folder`, from one fresh listing ([] if none)."""
        return [(stem, name) for stem, name, _ in self._marker_listing(folder)]

    def _marker_listing(self, folder: str) -> list[tuple[str, str, float | None]]:
        """(stem, path, modification time) of each marker in `folder`, one fresh listing."""
        url = self.url(folder)
        try:
            fs, path = url_fs(url, self.options)
            fs.invalidate_cache(path)  # markers written since an earlier listing must show
            entries = fs.ls(path, detail=True)
            fs.invalidate_cache(path)  # a listing of 100,000 entries is not kept
        except FileNotFoundError:
            return []
        except Exception as exc:
            raise StorageError(f"cannot list {folder}/ markers in {redact_url(self.path)}: "
                               f"{describe_error(exc)}") from exc
        return [(stem, entry["name"], modified(entry)) for entry in entries
                if (stem := marker_stem(entry["name"])) is not None]

