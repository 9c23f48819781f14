"""Where a LoRA's weights file is: a local file or folder, a hub file, or an fsspec URL."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from sdedit.sources import ModelSourceError, copy_url, local_path, source_kind

__all__ = ["PREFERRED", "WEIGHT_EXTS", "lora_file", "lora_kind"]

WEIGHT_EXTS = (".safetensors", ".bin")
PREFERRED = ("pytorch_lora_weights.safetensors", "pytorch_lora_weights.bin")
"""The file names diffusers' `save_lora_weights` writes; preferred in a folder of several."""


def _pick(names: Sequence[str], where: str) -> str:
    """The LoRA weights file of a folder: pytorch_lora_weights.*, else the only .safetensors,
    else the only .bin (diffusers' choice, made strict)."""
    usable = [n for n in names if n.endswith(WEIGHT_EXTS)
              and not any(s in n for s in ("scheduler", "optimizer", "checkpoint"))]
    for name in PREFERRED:
        if name in usable:
            return name
    for ext in WEIGHT_EXTS:
        found = sorted(n for n in usable if n.endswith(ext))
        if len(found) == 1:
            return found[0]
        if found:
            raise ModelSourceError(f"LoRA {where}: several weight files ({', '.join(found)}); "
                                   "allowed: name one of them as the source")
    raise ModelSourceError(f"LoRA {where}: no .safetensors or .bin weights file; allowed: a "
                           "LoRA file, or a folder holding one (pytorch_lora_weights.safetensors)")


def lora_kind(source: str) -> str:
    """What a LoRA source names: "local", "url", "hub" (org/name or org/name/file.safetensors)
    or "missing"."""
    kind = source_kind(source)
    parts = source.split("/")
    if kind == "missing" and len(parts) > 2 and source.endswith(WEIGHT_EXTS) \
            and not source.startswith((".", "/", "~")):
        return "hub"
    return kind


def lora_file(source: str, cache_dir: str | Path | None = None,
              storage_options: Mapping[str, Any] | None = None) -> Path:
    """The local weights file of a LoRA source (URLs copied into the model cache once, hub
    files through the hub cache); ModelSourceError naming the source and what is wrong."""
    kind = lora_kind(source)
    if kind == "local":
        path = local_path(source)
        if path.is_file():
            return path
        return path / _pick([p.name for p in path.iterdir() if p.is_file()], source)
    if kind == "url":
        folder = copy_url(source, cache_dir, dict(storage_options or {}))
        return folder / _pick([p.name for p in folder.iterdir() if p.is_file()], source)
    if kind == "hub":
        parts = source.split("/")
        return _from_hub("/".join(parts[:2]), "/".join(parts[2:]) or None, source)
    raise ModelSourceError(f"LoRA {source!r} not found; allowed: a local LoRA file or folder, a "
                           "hub id (org/name or org/name/file.safetensors) or an fsspec URL")


def _from_hub(repo: str, filename: str | None, source: str) -> Path:
    """One LoRA file of a hub repository, through the hub cache."""
    from huggingface_hub import HfApi, hf_hub_download, try_to_load_from_cache

    try:
        if filename is None:
            filename = _pick([f for f in HfApi().list_repo_files(repo) if "/" not in f], source)
        return Path(hf_hub_download(repo, filename))
    except ModelSourceError:
        raise
    except Exception as exc:  # offline: the cache may hold it
        for name in [filename] if filename else list(PREFERRED):
            cached = try_to_load_from_cache(repo, name)
            if isinstance(cached, str):
                return Path(cached)
        raise ModelSourceError(
            f"LoRA {source!r}: could not get it from the Hugging Face hub or its cache "
            f"({type(exc).__name__}); allowed: a reachable or cached hub LoRA, a local file or "
            "an fsspec URL") from exc
