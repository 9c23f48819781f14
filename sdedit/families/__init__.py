"""Model families: which directory layouts `load_model` reads, and how each is called.

The first family in `FAMILIES` that claims a directory gets it; the pixel family comes last and
names what a directory lacks. The families and what each refuses: docs/models.md#the-families.
"""

from __future__ import annotations

import json
from pathlib import Path

from sdedit.families import chroma, flux, pixel, qwen_image, sd, sd3, sdxl, z_image
from sdedit.families.base import Family, Loaded, ModelLayout
from sdedit.sources import ModelSourceError

__all__ = ["FAMILIES", "Family", "Loaded", "ModelLayout", "inspect_model_dir"]

FAMILIES: tuple[Family, ...] = (sd3.FAMILY, flux.FAMILY, chroma.FAMILY, qwen_image.FAMILY,
                                z_image.FAMILY, sdxl.FAMILY, sd.FAMILY, pixel.FAMILY)
"""Tried in order; the pixel family last (it claims every directory)."""


def _index(directory: Path, source: str) -> dict:
    path = directory / "model_index.json"
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelSourceError(f"model source {source!r}: model_index.json is not valid JSON: "
                               f"{exc}") from exc
    if not isinstance(data, dict):
        raise ModelSourceError(f"model source {source!r}: model_index.json is not a JSON object")
    return data


def inspect_model_dir(directory: Path, source: str) -> ModelLayout:
    """What the model directory is, from its configs and weights-file headers alone: the
    family that claims it, its noise process, sizes and text side. Raises ModelSourceError
    naming the source and what is wrong."""
    index = _index(directory, source)
    family = next(f for f in FAMILIES if f.claims(directory, index))
    return family.inspect(directory, source, index)


def family_named(name: str) -> Family:
    """The family of `ModelLayout.family` `name`."""
    return next(f for f in FAMILIES if f.name == name)
