"""`--where`: an SQL predicate over an output's rows (manifest and score columns), run by DuckDB.

It is checked once against the columns before any row is read, so a wrong column is a clear error
listing them. Only ok rows pass. The embedding column cannot be named (DuckDB takes no Arrow
float16); `--dedup` uses it."""

from __future__ import annotations

import duckdb
import numpy as np
import pyarrow as pa

from pipeline.curate.table import ROW_SCHEMA
from pipeline.errors import PipelineError

__all__ = ["COLUMNS", "Predicate"]

COLUMNS = tuple(name for name in ROW_SCHEMA.names if name != "embedding")
"""The columns a predicate may name."""


class Predicate:
    """A checked `--where` predicate (None: every ok row passes); PipelineError names the
    predicate, DuckDB's complaint and the columns allowed."""

    def __init__(self, where: str | None) -> None:
        self.where = where.strip() if where and where.strip() else None
        self.select(ROW_SCHEMA.empty_table())

    def select(self, rows: pa.Table) -> np.ndarray:
        """The indices (int64, ascending) of the ok `rows` that satisfy the predicate."""
        table = rows.select(list(COLUMNS)).append_column(
            "__row", pa.array(np.arange(len(rows), dtype=np.int64)))
        condition = "status = 'ok'" + (f" AND ({self.where})" if self.where else "")
        con = duckdb.connect()
        try:
            con.register("t", table)
            found = con.execute(f"SELECT __row FROM t WHERE {condition} ORDER BY __row"
                                ).fetchnumpy()["__row"]
        except duckdb.Error as exc:
            first = str(exc).strip().splitlines()[0]
            raise PipelineError(f"--where {self.where!r}: {first}; allowed: an SQL condition "
                                f"over the columns {', '.join(COLUMNS)}") from exc
        finally:
            con.close()
        return np.asarray(found, dtype=np.int64)
