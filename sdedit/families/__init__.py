"""Model families: which layouts `load_model` reads and how each one is called.

Each family (`sdedit.families.base.Family`) claims a directory layout, reads what the model is
from its JSON files alone (`ModelLayout`) and loads its parts (`Loaded`). The first family in
`FAMILIES` that claims a directory gets it; the pixel family is the fallback whose checks name
what a directory lacks.

    pixel  UNet2DModel + a VP or VE scheduler (DDPM, NCSN++)          pixel space, no text
    sd     SD 1.x / 2.x: UNet2DConditionModel + CLIP + AutoencoderKL   latent VP, CFG
    sdxl   SDXL base / refiner: + CLIP-G with projection, size ids     latent VP, CFG
    sd3    SD3 / SD3.5: SD3Transformer2DModel + CLIP-L/G + T5 + VAE     latent flow, CFG
    flux   Flux.1: FluxTransformer2DModel + CLIP-L + T5 + VAE            latent flow, packed;
           guidance input (dev) or none (schnell)
    chroma Chroma: ChromaTransformer2DModel + T5 (masked) + VAE         latent flow, packed, CFG
    qwen-image  Qwen-Image: QwenImageTransformer2DModel + Qwen2.5-VL    latent flow, packed,
           + AutoencoderKLQwenImage                                     true CFG (norm-kept)
    z-image     Z-Image / Turbo: ZImageTransformer2DModel + Qwen3 + VAE latent flow, CFG
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
    """What the model directory is, without reading weights: the family that claims it, its
    noise process, sizes and text side, with config files that parse and name supported classes
    and the weights files present.

    Args:
        directory: the local model directory (a hub snapshot or a URL copy included).
        source: the source string, for messages.
    Raises:
        ModelSourceError naming the source and what is wrong.
    """
    index = _index(directory, source)
    family = next(f for f in FAMILIES if f.claims(directory, index))
    return family.inspect(directory, source, index)


def family_named(name: str) -> Family:
    """The family of `ModelLayout.family` `name`."""
    return next(f for f in FAMILIES if f.name == name)
