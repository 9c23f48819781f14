"""OUT/scores/settings.json: the score settings of an output's sidecars, checked on resume.

Every sidecar of an output is made with the same settings: `run` with a `score:` section and
`sdedit-batch score` record them before any work and refuse others unless `--overwrite`, which
discards the old sidecars (the outputs stay). See docs/scores.md."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from pipeline.errors import ResumeConflictError
from pipeline.output.folder import OutputFolder
from pipeline.output.scores import score_conflict

logger = logging.getLogger(__name__)

__all__ = ["prepare_scores", "scores_conflict"]


def scores_conflict(folder: OutputFolder, settings: Mapping[str, Any]) -> str | None:
    """Why scores made with `settings` cannot join the output's, or None."""
    return score_conflict(folder.path, folder.read_score_settings(), settings)


def prepare_scores(folder: OutputFolder, settings: Mapping[str, Any], overwrite: bool) -> None:
    """Refuse score settings other than the recorded ones (with `overwrite`, discard the old
    sidecars), then record `settings`; ResumeConflictError names each change."""
    conflict = scores_conflict(folder, settings)
    if conflict is not None:
        if not overwrite:
            raise ResumeConflictError(conflict)
        logger.warning("%s: --overwrite discards the old scores", conflict)
        folder.discard_scores()
    folder.write_score_settings(dict(settings))
