"""The Parquet files of an output folder: manifests and score sidecars, read and written.

`ResultTables` is a base of `OutputFolder`, which gives it `path`, `options`, `url` and
`shard_urls`: one owner of the output location, in two files."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from pipeline.errors import StorageError
from pipeline.output.layout import MANIFESTS, SCORE_SETTINGS, SCORES, ShardUrls
from pipeline.output.manifest import MANIFEST_SCHEMA
from pipeline.output.scores import SCORE_SCHEMA, read_metadata, scores_bytes
from pipeline.redaction import redact_url
from pipeline.storage import describe_error, put_bytes_atomic, url_fs, with_retries

logger = logging.getLogger(__name__)

__all__ = ["ResultTables", "json_object"]


class ResultTables:
    """Manifests and score sidecars of the output folder at `path`."""

    path: str
    options: dict[str, Any]

    def url(self, *parts: str) -> str:
        raise NotImplementedError

    def shard_urls(self, stem: str) -> ShardUrls:
        raise NotImplementedError

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
        data = self._read_bytes(self.url(SCORES, SCORE_SETTINGS))
        return None if data is None else json_object(data)

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

    def _read_bytes(self, url: str) -> bytes | None:
        """The file at `url`, or None when there is none; other errors name it."""
        try:
            fs, path = url_fs(url, self.options)
            return with_retries(lambda: fs.cat_file(path), what="read", url=url)
        except FileNotFoundError:
            return None
        except Exception as exc:
            raise StorageError(f"cannot read {redact_url(url)}: {describe_error(exc)}") from exc

    def _put(self, url: str, record: Mapping[str, Any]) -> None:
        """Write `record` as JSON at `url`, atomically; errors name the file."""
        try:
            put_bytes_atomic(url, json.dumps(dict(record), indent=1).encode(), self.options)
        except StorageError:
            raise
        except Exception as exc:
            raise StorageError(f"cannot write {redact_url(url)}: {describe_error(exc)}") from exc

    def _read_parquet(self, url: str, schema: pa.Schema
                      ) -> tuple[pa.Table, dict[str, Any]] | None:
        data = self._read_bytes(url)
        if data is None:
            return None
        table = pq.read_table(pa.BufferReader(data))
        metadata = read_metadata(table.schema)
        missing = [f for f in schema if f.name not in table.column_names]
        for f in missing:  # written before the column existed: null
            table = table.append_column(f, pa.nulls(len(table), f.type))
        return table.select(schema.names).cast(schema), metadata

    def read_manifests(self, columns: list[str], where: pc.Expression | None = None
                       ) -> tuple[pa.Table, dict[str, str]]:
        """(`columns` of every readable manifest, rows matching `where`, as one table; unreadable
        manifests: name -> why). Columns a manifest lacks read as null; no manifests, an empty
        table."""
        url = self.url(MANIFESTS)
        fs, path = url_fs(url, self.options)
        schema = pa.schema([MANIFEST_SCHEMA.field(name) for name in columns])
        try:
            if not fs.exists(path):
                return schema.empty_table(), {}
            dataset = pads.dataset(path, filesystem=fs, format="parquet", schema=MANIFEST_SCHEMA)
        except Exception as exc:
            raise StorageError(f"cannot read the manifests in {redact_url(url)}: "
                               f"{describe_error(exc)}") from exc
        try:
            return dataset.to_table(columns=columns, filter=where), {}
        except Exception:  # one at a time, to name those that cannot be read
            tables, unreadable = [], {}
            for fragment in dataset.get_fragments():
                try:
                    tables.append(fragment.to_table(columns=columns, filter=where,
                                                    schema=MANIFEST_SCHEMA))
                except Exception as exc:
                    unreadable[f"{MANIFESTS}/{fragment.path.rsplit('/', 1)[-1]}"] = \
                        describe_error(exc)
            return pa.concat_tables(tables) if tables else schema.empty_table(), unreadable



def json_object(blob: bytes) -> dict[str, Any] | None:
    """The JSON object `blob` holds, or None when it holds no JSON object."""
    try:
        data = json.loads(blob)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None
