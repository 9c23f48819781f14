"""The published pipelines' configs as model directories with header-only weights files.

tests/data/published_configs.json holds the config files of FLUX.1-dev, FLUX.1-schnell, SDXL
base 1.0, SD3.5 Large, SD 1.5, Qwen-Image, Z-Image-Turbo and Chroma (where each came from: its
"_about" and docs/open-models.md); `published_dir` writes one as a diffusers pipeline directory
whose weights files are valid safetensors headers holding no tensors (whole, as
`check_weights_file` reads them) and whose tokenizer folders are empty: what
`inspect_model_dir`, `validate` and the memory plan read, without weights.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

CONFIGS = Path(__file__).resolve().parents[1] / "data" / "published_configs.json"
PUBLISHED = ("FLUX.1-dev", "FLUX.1-schnell", "stable-diffusion-xl-base-1.0",
             "stable-diffusion-3.5-large", "stable-diffusion-v1-5", "Qwen-Image", "Z-Image-Turbo",
             "Chroma")


def _empty_safetensors(path: Path) -> None:
    header = json.dumps({"__metadata__": {"format": "pt"}}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header)


def published_dir(name: str, root: Path) -> Path:
    """The pipeline directory of published model `name` (one of PUBLISHED) under `root`."""
    parts = json.loads(CONFIGS.read_text())[name]
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    for part, config in parts.items():
        if part == "model_index.json":
            (folder / part).write_text(json.dumps(config))
            continue
        (folder / part).mkdir(exist_ok=True)
        if part == "scheduler":
            (folder / part / "scheduler_config.json").write_text(json.dumps(config))
            continue
        (folder / part / "config.json").write_text(json.dumps(config))
        weights = "model" if part.startswith("text_encoder") else "diffusion_pytorch_model"
        _empty_safetensors(folder / part / f"{weights}.safetensors")
    for tokenizer in [k for k in parts["model_index.json"] if k.startswith("tokenizer")]:
        (folder / tokenizer).mkdir(exist_ok=True)
    return folder
