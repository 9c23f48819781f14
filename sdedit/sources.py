"""Where model files come from: a local directory, the Hugging Face hub cache, or an fsspec URL.

`resolve` makes any source a local directory: a hub download takes only the files `load_model`
reads, a URL is copied once into a cache (fsspec is imported only then).
docs/models.md#model-sources.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

logger = logging.getLogger(__name__)

__all__ = [
    "Layout",
    "ModelSourceError",
    "Resolved",
    "cached_snapshot",
    "file_sha256",
    "files_identity",
    "hub_allow_patterns",
    "hub_download_hint",
    "hub_repo_files",
    "local_path",
    "resolve",
    "source_kind",
    "transformers_allow_patterns",
]

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
WEIGHT_COMPONENTS = ("unet", "transformer", "vae", "text_encoder", "text_encoder_2",
                     "text_encoder_3")
"""Pipeline folders whose weights `load_model` reads."""
TEXT_COMPONENTS = ("tokenizer", "tokenizer_2", "tokenizer_3")
WEIGHT_STEMS = {name: ("model", "pytorch_model")
                for name in ("text_encoder", "text_encoder_2", "text_encoder_3")}
DEFAULT_STEMS = ("diffusion_pytorch_model",)
CHUNK = 1 << 22
FALLBACK_PATTERNS = ["model_index.json", "config.json", "scheduler_config.json",
                     "diffusion_pytorch_model.safetensors", "unet/config.json",
                     "unet/diffusion_pytorch_model.safetensors", "vae/config.json",
                     "vae/diffusion_pytorch_model.safetensors", "text_encoder/config.json",
                     "text_encoder/model.safetensors", "tokenizer/*",
                     "scheduler/scheduler_config.json", "transformer/config.json",
                     "transformer/diffusion_pytorch_model.safetensors",
                     "transformer/diffusion_pytorch_model.safetensors.index.json",
                     "transformer/diffusion_pytorch_model-*-of-*.safetensors",
                     *(f"text_encoder_{i}/{name}" for i in (2, 3) for name in (
                         "config.json", "model.safetensors", "model.safetensors.index.json",
                         "model-*-of-*.safetensors")),
                     "tokenizer_2/*", "tokenizer_3/*"]
"""What a hub fetch asks for when the repository cannot be listed (offline: the cache answers)."""
TRANSFORMERS_FALLBACK = ["*.json", "*.txt", "model.safetensors"]
"""What a hub fetch of a transformers model asks for when the repository cannot be listed."""
HUB_TIMEOUT = 10.0
"""Seconds one hub listing may take (`hub_repo_files`)."""


Layout = Literal["diffusers", "transformers"]
"""Which files of a hub repository a model needs (`resolve`)."""


class ModelSourceError(ValueError):
    """A model source is missing, unreachable, corrupt or of an unsupported kind."""


@dataclass(frozen=True)
class Resolved:
    """A source made local: `directory` holds the files; `revision` is the hub commit or None."""

    directory: Path
    revision: str | None = None


def source_kind(source: str) -> Literal["url", "local", "hub", "missing"]:
    """What a source names, as `resolve` decides: "url", "local" (an existing path), "hub" (an
    org/name that is not a local path) or "missing"."""
    if "://" in source and not source.startswith("file://"):
        return "url"
    if local_path(source).exists():
        return "local"
    if HUB_ID.match(source) and not source.startswith((".", "/")):
        return "hub"
    return "missing"


def local_path(source: str) -> Path:
    """The local path a source names (``file://`` and ``~`` resolved; not made absolute)."""
    return Path(source.removeprefix("file://")).expanduser()


def resolve(source: str, cache_dir: str | os.PathLike[str] | None,
            storage_options: dict[str, Any] | None, layout: Layout = "diffusers") -> Resolved:
    """A local directory holding the model files of `source`; `layout` says which files a hub
    download takes ("transformers": a model such as CLIP with its processor)."""
    kind = source_kind(source)
    if kind == "url":
        return Resolved(copy_url(source, cache_dir, storage_options or {}))
    path = local_path(source)
    if kind == "local" and path.is_dir():
        return Resolved(path)
    if kind == "local":
        raise ModelSourceError(
            f"model source {source!r} is a file; expected a model directory (convert an "
            "original DDPM/SDEdit checkpoint first: pipeline.tools.convert.convert_checkpoint)")
    if kind == "hub":
        directory = from_hub(source, layout)
        return Resolved(directory, directory.name)
    raise ModelSourceError(
        f"model source {source!r} not found; allowed: a local diffusers model directory, "
        "a hub id such as 'google/ddpm-ema-bedroom-256', or an fsspec URL (s3://, gs://, ...)"
    )


def _best_weights(names: set[str], folder: str, stems: Sequence[str]) -> list[str]:
    """The one weights variant of `folder` to fetch: full-precision safetensors, else .bin,
    sharded or not; never `stem.<variant>.<ext>` (fp16, ema, non_ema)."""
    prefix = f"{folder}/" if folder else ""
    for ext in ("safetensors", "bin"):
        for stem in stems:
            if f"{prefix}{stem}.{ext}" in names:
                return [f"{prefix}{stem}.{ext}"]
            index = f"{prefix}{stem}.{ext}.index.json"
            if index in names:
                shard = re.compile(re.escape(f"{prefix}{stem}-") + r"\d+-of-\d+\." + ext + "$")
                return [index, *sorted(n for n in names if shard.match(n))]
    return []


def hub_allow_patterns(repo_files: Iterable[str]) -> list[str]:
    """The files of a hub repository that `load_model` needs, as sorted exact allow_patterns:
    configs, tokenizers and one weights variant per component it reads; never safety checkers,
    root-level checkpoints or fp16 / ema variants."""
    names = set(repo_files)
    if "model_index.json" not in names:
        wanted = [n for n in ("config.json", "scheduler_config.json") if n in names]
        return sorted(wanted + _best_weights(names, "", DEFAULT_STEMS))
    wanted = ["model_index.json"]
    for folder in WEIGHT_COMPONENTS:
        if f"{folder}/config.json" in names:
            wanted.append(f"{folder}/config.json")
            wanted += _best_weights(names, folder, WEIGHT_STEMS.get(folder, DEFAULT_STEMS))
    for folder in TEXT_COMPONENTS:
        wanted += [n for n in names if n.startswith(f"{folder}/") and n.count("/") == 1]
    wanted += [n for n in ("scheduler/scheduler_config.json",) if n in names]
    return sorted(set(wanted))


def hub_repo_files(repo_id: str, timeout: float = HUB_TIMEOUT) -> list[str]:
    """The file paths of hub repository `repo_id` from one request, never retried (so that
    no network fails at once); raises what huggingface_hub raises."""
    from huggingface_hub import HfApi

    info = HfApi().model_info(repo_id, timeout=timeout)
    return [sibling.rfilename for sibling in info.siblings or []]


def hub_download_hint(repo_id: str) -> str:
    """The command that fills the hub cache with `repo_id` on a machine with network."""
    return f"`hf download {repo_id}`"


def transformers_allow_patterns(repo_files: Iterable[str]) -> list[str]:
    """The files of a transformers repository (CLIP and its processor) to fetch: top-level json
    and txt files and one PyTorch weights variant."""
    names = set(repo_files)
    wanted = [n for n in names if "/" not in n and n.endswith((".json", ".txt"))]
    return sorted(set(wanted + _best_weights(names, "", ("model", "pytorch_model"))))


def from_hub(repo_id: str, layout: Layout = "diffusers") -> Path:
    """The hub snapshot directory of `repo_id` (from the cache when offline), named by its
    commit."""
    from huggingface_hub import snapshot_download

    try:
        files: list[str] | None = hub_repo_files(repo_id)
    except Exception as exc:  # offline, no network: the cache may still hold a snapshot
        logger.info("cannot list hub repo %s (%s); trying the cache", repo_id, type(exc).__name__)
        files = None
    if layout == "transformers":
        patterns = transformers_allow_patterns(files) if files is not None else \
            TRANSFORMERS_FALLBACK
    else:
        patterns = hub_allow_patterns(files) if files is not None else FALLBACK_PATTERNS
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as exc:
        raise ModelSourceError(
            f"model source {repo_id!r}: could not get it from the Hugging Face hub or its cache "
            f"({type(exc).__name__}). On a machine with network access run "
            f"{hub_download_hint(repo_id)} (it fills the hub cache, HF_HOME), or copy the "
            "model directory somewhere reachable and set model.source to that path or URL."
        ) from exc


def cached_snapshot(repo_id: str) -> Path | None:
    """The hub-cache snapshot of `repo_id`'s main revision, or None; uses no network."""
    from huggingface_hub import try_to_load_from_cache

    for name in ("model_index.json", "config.json"):
        found = try_to_load_from_cache(repo_id, name)
        if isinstance(found, str):
            return Path(found).parent
    return None


def copy_url(url: str, cache_dir: str | os.PathLike[str] | None,
             storage_options: dict[str, Any]) -> Path:
    """Copy the directory (or one file) at `url` into the cache once, safe across processes:
    each copies into a temporary folder and renames it into place; a loser uses the winner's."""
    import fsspec  # only for URL sources: sdedit does not need fsspec otherwise

    root = Path(cache_dir or Path.home() / ".cache" / "sdedit-batch" / "models")
    name = hashlib.sha256(url.encode()).hexdigest()[:20]
    target = root / name
    if (target / ".complete").exists():
        return target
    try:
        fs, path = fsspec.core.url_to_fs(url, **storage_options)
        files = [f for f in fs.find(path) if not f.endswith("/")]
    except Exception as exc:
        raise ModelSourceError(f"model source {url!r}: cannot list it: {exc}") from exc
    if not files:
        raise ModelSourceError(f"model source {url!r}: no files at that URL")
    root.mkdir(parents=True, exist_ok=True)
    base = path.rstrip("/")
    partial = Path(tempfile.mkdtemp(prefix=f"{name}.", suffix=".partial", dir=root))
    try:
        for remote in files:
            # a URL to one file (a LoRA) is copied into the folder under its own name
            local = partial / (remote[len(base):].lstrip("/") or base.rsplit("/", 1)[-1])
            local.parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(remote, str(local))
        (partial / ".complete").touch()
        _publish(partial, target)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    logger.info("copied model %s to %s (%d files)", url, target, len(files))
    return target


def _publish(partial: Path, target: Path) -> None:
    """Rename the complete `partial` to `target`, unless a concurrent copy got there first."""
    for _ in range(2):
        try:
            os.rename(partial, target)  # atomic; fails if target is a non-empty directory
            return
        except OSError:
            if (target / ".complete").exists():
                return  # a concurrent winner: use its copy
            shutil.rmtree(target, ignore_errors=True)  # a stale, incomplete copy
    raise ModelSourceError(f"cannot place the model copy at {target}")


def files_identity(directory: Path, files: Iterable[Path]) -> str:
    """"sha256:<hex>" of the files a model was built from: the sha256 of what
    `cd DIR && sha256sum FILES... | sha256sum` prints for them sorted by relative path."""
    lines = []
    for path in sorted({Path(f) for f in files}, key=lambda p: p.relative_to(directory).as_posix()):
        lines.append(f"{file_sha256(path)}  {path.relative_to(directory).as_posix()}\n")
    return "sha256:" + hashlib.sha256("".join(lines).encode()).hexdigest()


def file_sha256(path: Path) -> str:
    """What `sha256sum FILE` prints, streamed (a LoRA's identity; its name does not count)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as stream:
        while chunk := stream.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def model_directory(source: str, storage_options: dict[str, Any] | None = None) -> Path:
    """The local directory of a model source, fetched as `load_model` would, to read its
    configs before loading it."""
    return resolve(source, None, storage_options).directory
