"""Session fixtures: tiny seeded models saved to disk once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.support.tiny_models import save_ve_model, save_vp_model

# Tiny models are dominated by per-op overhead: one thread is fastest and never oversubscribes
# the cores of a shared 2-core CI machine.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_vp_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny DDPM (16x16, ~42k parameters) in the diffusers root layout."""
    return save_vp_model(tmp_path_factory.mktemp("models") / "tiny-vp")


@pytest.fixture(scope="session")
def tiny_ve_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny VE score model (fourier time embedding) with a ScoreSdeVeScheduler config."""
    return save_ve_model(tmp_path_factory.mktemp("models") / "tiny-ve")


@pytest.fixture(scope="session")
def tiny_vp(tiny_vp_dir: Path):
    from sdedit import load_model

    return load_model(tiny_vp_dir)


@pytest.fixture(scope="session")
def tiny_ve(tiny_ve_dir: Path):
    from sdedit import load_model

    return load_model(tiny_ve_dir)


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Stable Diffusion pipeline directory (16x16 images, 8x8x4 latents)."""
    from tests.support.tiny_latent import save_sd_model

    return save_sd_model(tmp_path_factory.mktemp("models") / "tiny-sd")


@pytest.fixture(scope="session")
def tiny_sd(tiny_sd_dir: Path):
    from sdedit import load_model

    return load_model(tiny_sd_dir)


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SDXL pipeline directory (16x16 images, 8x8x4 latents, two text encoders)."""
    from tests.support.tiny_sdxl import save_sdxl_model

    return save_sdxl_model(tmp_path_factory.mktemp("models") / "tiny-sdxl")


@pytest.fixture(scope="session")
def tiny_sdxl(tiny_sdxl_dir: Path):
    from sdedit import load_model

    return load_model(tiny_sdxl_dir)


@pytest.fixture(scope="session")
def tiny_sd3_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SD3 pipeline directory with T5 (16x16 images, 8x8x4 latents, patch 2)."""
    from tests.support.tiny_flow import save_sd3_model

    return save_sd3_model(tmp_path_factory.mktemp("models") / "tiny-sd3")


@pytest.fixture(scope="session")
def tiny_sd3(tiny_sd3_dir: Path):
    from sdedit import load_model

    return load_model(tiny_sd3_dir)


@pytest.fixture(scope="session")
def tiny_flux_dev_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Flux-dev pipeline directory (guidance input, dynamic shift; 16x16 images)."""
    from tests.support.tiny_flow import save_flux_model

    return save_flux_model(tmp_path_factory.mktemp("models") / "tiny-flux-dev", dev=True)


@pytest.fixture(scope="session")
def tiny_flux_dev(tiny_flux_dev_dir: Path):
    from sdedit import load_model

    return load_model(tiny_flux_dev_dir)


@pytest.fixture(scope="session")
def tiny_flux_schnell_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Flux-schnell pipeline directory (no guidance input, shift 1)."""
    from tests.support.tiny_flow import save_flux_model

    return save_flux_model(tmp_path_factory.mktemp("models") / "tiny-flux-schnell", dev=False)


@pytest.fixture(scope="session")
def tiny_flux_schnell(tiny_flux_schnell_dir: Path):
    from sdedit import load_model

    return load_model(tiny_flux_schnell_dir)


@pytest.fixture(scope="session")
def open_family_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny Qwen-Image (32x32 images), Z-Image and Chroma (16x16) pipeline directories by
    family name (`tests.support.tiny_families`)."""
    from tests.support.tiny_families import save_family_model

    root = tmp_path_factory.mktemp("models")
    return {family: save_family_model(root / f"tiny-{family}", family)
            for family in ("qwen-image", "z-image", "chroma")}


@pytest.fixture(scope="session")
def open_family_models(open_family_dirs: dict[str, Path]) -> dict:
    """The models of `open_family_dirs`, loaded once."""
    from sdedit import load_model

    return {family: load_model(directory) for family, directory in open_family_dirs.items()}


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random CLIP model + processor (hidden 32, 32 px images, projection 16)."""
    from tests.support.tiny_clip import save_clip

    return save_clip(tmp_path_factory.mktemp("models") / "tiny-clip")


@pytest.fixture(scope="session")
def tiny_aesthetic_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random LAION aesthetic predictor state dict for the tiny CLIP's 16-d embeddings."""
    from tests.support.tiny_clip import save_aesthetic

    return save_aesthetic(tmp_path_factory.mktemp("models") / "aesthetic.pth")
