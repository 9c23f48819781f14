"""A t0 sweep's inputs: every sample of some input shards once per t0, with per-row t0.

Sample `{key}` becomes `{key}_t{1000 t0}` with all its members and `"t0"` added to its json, so
one run edits the same guides at each t0 and `sdedit-batch eval` reports the trade-off per t0."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any

import webdataset as wds

from pipeline.errors import PipelineError
from pipeline.input.reader import iter_raw
from pipeline.input.shards import expand_shards, shard_stem
from pipeline.storage import join, url_fs

logger = logging.getLogger(__name__)

__all__ = ["sweep_inputs"]


def sweep_inputs(shards: Sequence[str], t0s: Sequence[float], out: str,
                 storage_options: dict[str, Any] | None = None) -> list[str]:
    """Write one sweep shard per input shard under `out` (same stem) and return their URLs;
    PipelineError for a t0 outside (0, 1] or a json that is not an object."""
    if not t0s or any(not 0 < t0 <= 1 for t0 in t0s):
        raise PipelineError(f"--t0 {list(t0s)}: allowed: one or more values in (0, 1]")
    fs, base = url_fs(out, storage_options)
    fs.makedirs(base, exist_ok=True)
    written = []
    for url in expand_shards(list(shards), storage_options):
        target = join(out, f"{shard_stem(url)}.tar")
        with fs.open(url_fs(target, storage_options)[1], "wb") as stream, \
                wds.TarWriter(stream, encoder=False, mtime=0.0) as tar:
            for raw in iter_raw(url, storage_options):
                try:
                    settings = json.loads(raw.members.get("json", b"{}"))
                except ValueError as exc:
                    raise PipelineError(f"{url}: {raw.key}.json is not JSON: {exc}") from exc
                if not isinstance(settings, dict):
                    raise PipelineError(f"{url}: {raw.key}.json is not a JSON object")
                for t0 in t0s:
                    tar.write({**raw.members, "__key__": f"{raw.key}_t{round(t0 * 1000):03d}",
                               "json": json.dumps({**settings, "t0": t0}).encode()})
        written.append(target)
        logger.info("sweep shard %s: %d t0 values", target, len(t0s))
    return written
