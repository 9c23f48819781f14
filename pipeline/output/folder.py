"""The output folder's markers: which shards are done or failed, and what is left to do.

One listing of `done/` (or `failed/`) answers for every shard: no request per shard.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from pipeline.errors import StorageError
from pipeline.input.shards import unique_stems
from pipeline.output.layout import DONE, FAILED, folder_url, marker_stem
from pipeline.storage import describe_error, url_fs

logger = logging.getLogger(__name__)

__all__ = ["done_stems", "failed_stems", "plan_pending"]


def done_stems(output_path: str, storage_options: Mapping[str, Any] | None = None) -> set[str]:
    """Stems whose commit marker `{output}/done/{stem}.json` exists, from one listing
    (`pipeline.output.layout.marker_stem` decides which names are markers)."""
    return _marker_stems(output_path, DONE, storage_options)


def failed_stems(output_path: str, storage_options: Mapping[str, Any] | None = None
                 ) -> set[str]:
    """Stems with a failure record `{output}/failed/{stem}.json`, from one listing."""
    return _marker_stems(output_path, FAILED, storage_options)


def _marker_stems(output_path: str, folder: str, storage_options: Mapping[str, Any] | None
                  ) -> set[str]:
    try:
        fs, path = url_fs(folder_url(output_path, folder), storage_options)
        fs.invalidate_cache(path)  # markers written since an earlier listing must show
        names = fs.ls(path, detail=False)
        fs.invalidate_cache(path)  # a listing of 100,000 entries is not kept
    except FileNotFoundError:
        return set()
    except Exception as error:
        raise StorageError(f"cannot list {folder}/ markers in {output_path!r}: "
                           f"{describe_error(error)}") from error
    return {stem for stem in map(marker_stem, names) if stem is not None}


def plan_pending(shards: Sequence[str], output_path: str,
                 storage_options: Mapping[str, Any] | None = None,
                 ) -> tuple[list[str], list[str]]:
    """Split `shards` into (pending, done), in input order, by their commit markers.

    A shard is done only if `{output_path}/done/{stem}.json` exists; the `done/` folder is
    listed once (no request per shard). A missing output folder means nothing is done.
    """
    stems = unique_stems(shards)
    done = done_stems(output_path, storage_options)
    pending = [url for stem, url in stems.items() if stem not in done]
    finished = [url for stem, url in stems.items() if stem in done]
    extra = len(done - stems.keys())
    if extra:
        logger.info("%d commit marker(s) in %s belong to no input shard", extra, output_path)
    return pending, finished
