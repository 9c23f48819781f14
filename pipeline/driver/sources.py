"""What a model source is before any weights are read: a local directory, a URL, a hub id.

`model_layout` answers for `validate` and `run`; each problem is one line naming `model.source`,
what was found and what is allowed. See docs/models.md."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

from pipeline.storage import describe_error, join, url_fs, with_retries
from sdedit import (
    ModelLayout,
    ModelSourceError,
    cached_snapshot,
    hub_download_hint,
    hub_repo_files,
    inspect_model_dir,
    local_path,
    quoted,
    source_kind,
)

__all__ = ["describe_layout", "is_remote", "model_layout", "model_problems"]


def is_remote(url: str) -> bool:
    """Whether `url` names an object store or another remote location (not a local path)."""
    head, sep, _ = url.partition("://")
    return bool(sep) and head.split("::")[-1] not in ("file", "local")


def model_problems(source: str, storage_options: Mapping[str, Any] | None, *,
                   offline: bool = False) -> tuple[list[str], list[str]]:
    """(problems, notes) about a model source, without loading any weights."""
    _, problems, notes = model_layout(source, storage_options, offline=offline)
    return problems, notes


def model_layout(source: str, storage_options: Mapping[str, Any] | None, *,
                 offline: bool = False) -> tuple[ModelLayout | None, list[str], list[str]]:
    """(layout or None, problems, notes) of a model source, without loading any weights: a local
    directory's configs and weights files, a URL's config object, a hub id's cached snapshot or
    (unless `offline`) its repository on the hub. The layout is read where the files are local."""
    kind = source_kind(source)
    if kind == "missing":
        return None, [f"model.source: {quoted(source)} not found (no directory "
                      f"{os.path.abspath(local_path(source))}); allowed: a local diffusers "
                      "model directory, a hub id such as google/ddpm-ema-bedroom-256, or an "
                      "fsspec URL (s3://, gs://, ...)"], []
    if kind == "local":
        if not local_path(source).is_dir():
            return None, [f"model.source: {quoted(source)} is a file; allowed: a model directory "
                          "(convert an original DDPM/SDEdit checkpoint first: "
                          "pipeline.tools.convert)"], []
        try:
            layout = inspect_model_dir(local_path(source), source)
        except ModelSourceError as exc:
            return None, [f"model.source: {exc}"], []
        return layout, [], [describe_layout(source, layout)]
    if kind == "url":
        if offline:
            return None, [], [f"model.source {source}: not checked (--offline)"]
        return None, _url_model_problems(source, storage_options), []
    return _hub_model_problems(source, offline)


def _url_model_problems(source: str, storage_options: Mapping[str, Any] | None) -> list[str]:
    """The config object of a model at a URL exists and is a JSON object."""
    name = "config.json"
    try:
        for name in ("config.json", "unet/config.json"):
            found = _read_if_exists(join(source, name), storage_options)
            if found is not None:
                if not isinstance(json.loads(found), dict):
                    return [f"model.source: {source}/{name} is not a JSON object"]
                return []
    except json.JSONDecodeError as exc:
        return [f"model.source: {source}/{name} is not valid JSON: {exc}"]
    except Exception as exc:
        return [f"model.source: cannot read {source}: {describe_error(exc)}"]
    return [f"model.source: no config.json or unet/config.json at {source}; expected a "
            "diffusers model directory (config.json, diffusion_pytorch_model.safetensors, "
            "scheduler_config.json) or a pipeline (model_index.json, unet/, scheduler/)"]


def _read_if_exists(url: str, storage_options: Mapping[str, Any] | None) -> bytes | None:
    """The bytes of the object at `url`, or None when it does not exist."""
    fs, path = url_fs(url, storage_options)
    if not with_retries(lambda: fs.exists(path), what="check", url=url):
        return None
    return with_retries(lambda: fs.cat_file(path), what="read", url=url)


def _hub_model_problems(repo_id: str, offline: bool
                        ) -> tuple[ModelLayout | None, list[str], list[str]]:
    """A hub id: checked in the hub cache first, then (unless offline) on the hub."""
    snapshot = cached_snapshot(repo_id)
    cache_problem = None
    if snapshot is not None:
        try:
            layout = inspect_model_dir(snapshot, repo_id)
            return layout, [], [f"model.source {repo_id}: in the hub cache (revision "
                                f"{snapshot.name})", describe_layout(repo_id, layout)]
        except ModelSourceError as exc:
            cache_problem = str(exc)
    if offline:
        state = f"incomplete in the hub cache ({cache_problem})" if cache_problem else \
            "not in the hub cache"
        return None, [], [f"model.source {repo_id}: {state}; the hub was not checked "
                          "(--offline)"]
    try:
        files = hub_repo_files(repo_id)  # one request: no retries, no warnings
    except Exception as exc:
        return None, [f"model.source: {quoted(repo_id)} is no local directory "
                      f"({os.path.abspath(local_path(repo_id))} does not exist), and as a hub id "
                      f"it is not in the hub cache (HF_HOME) and the hub cannot tell about it "
                      f"({type(exc).__name__}: {str(exc)[:160]}); allowed: an existing model "
                      f"directory, or a hub repository that is reachable or cached (cache it "
                      f"with {hub_download_hint(repo_id)} where the hub is reachable)"], []
    if not {"config.json", "model_index.json"} & set(files):
        return None, [f"model.source: hub repository {repo_id} has no config.json or "
                      "model_index.json; expected a diffusers model"], []
    return None, [], [f"model.source {repo_id}: on the hub; downloaded into the hub cache on "
                      "first use"]


def describe_layout(source: str, layout: ModelLayout) -> str:
    """One line naming what a model is, read from its config files."""
    text = "no text" if layout.text is None else \
        f"prompts, guidance {layout.text.guidance}"
    h, w = layout.sample_size
    return (f"model.source {source}: {layout.family} model, {layout.process.name.upper()} "
            f"noise process (samplers {', '.join(layout.process.samplers)}), {text}, trained "
            f"at {w}x{h}, image sides multiples of {layout.downsample_factor}")
