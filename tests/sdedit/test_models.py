"""load_model: diffusers directories (both layouts), fsspec URLs, the hub cache, clear errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import fsspec
import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler

from sdedit import load_model
from sdedit.conditioning import Conditioning
from sdedit.models import ModelSourceError
from sdedit.processes import VEProcess, VPProcess
from sdedit.sources import files_identity
from tests.support.tiny_models import save_vp_model, tiny_unet


def _same_net(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([3, 700])
    with torch.no_grad():
        return torch.equal(a(x, t).sample, b(x, t).sample)


def test_round_trip_root_layout(tiny_vp_dir):
    model = load_model(tiny_vp_dir)
    assert model.family == "pixel" and isinstance(model.process, VPProcess)
    assert model.process.prediction_type == "epsilon"
    assert not model.conditional and not model.latent and model.codec is None
    root = Path(tiny_vp_dir)
    assert model.identity == files_identity(root, [
        root / "config.json", root / "diffusion_pytorch_model.safetensors",
        root / "scheduler_config.json"])
    assert model.sample_size == (16, 16) and model.in_channels == 3
    assert model.process.schedule.num_train_timesteps == 1000
    assert _same_net(model.net, tiny_unet())
    assert abs(float(model.process.schedule.betas[0]) - 1e-4) < 1e-12


def test_bin_weights_load_without_pickle_objects(tmp_path):
    save_vp_model(tmp_path / "m", safe=False)
    assert (tmp_path / "m" / "diffusion_pytorch_model.bin").exists()
    assert _same_net(load_model(tmp_path / "m").net, tiny_unet())


def test_pipeline_layout(tmp_path):
    scheduler = DDPMScheduler(beta_start=1e-4, beta_end=0.02, prediction_type="v_prediction")
    DDPMPipeline(unet=tiny_unet(seed=1), scheduler=scheduler).save_pretrained(tmp_path / "p")
    model = load_model(tmp_path / "p")
    assert model.process.prediction_type == "v_prediction"
    assert _same_net(model.net, tiny_unet(seed=1))


def test_ve_model_is_recognised(tiny_ve_dir):
    model = load_model(tiny_ve_dir)
    assert isinstance(model.process, VEProcess) and model.process.schedule.sigma_max == 50.0


@pytest.mark.parametrize("scheme", ["memory", "file"])
def test_fsspec_url_is_copied_to_the_cache(tiny_vp_dir, tmp_path, scheme):
    if scheme == "memory":
        fs = fsspec.filesystem("memory")
        for f in Path(tiny_vp_dir).iterdir():
            fs.pipe_file(f"/models/tiny/{f.name}", f.read_bytes())
        url = "memory://models/tiny"
    else:
        url = f"file://{tiny_vp_dir}"
    model = load_model(url, cache_dir=tmp_path / "cache")
    assert model.source == url
    assert _same_net(model.net, tiny_unet())
    if scheme == "memory":
        assert len(list((tmp_path / "cache").iterdir())) == 1


def test_hub_id_from_the_cache_offline(tiny_vp_dir, tmp_path, monkeypatch):
    import huggingface_hub.constants as hub

    repo = tmp_path / "hub" / "models--someone--tiny-ddpm"
    snap = repo / "snapshots" / ("a" * 40)
    snap.mkdir(parents=True)
    for f in Path(tiny_vp_dir).iterdir():
        (snap / f.name).write_bytes(f.read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    model = load_model("someone/tiny-ddpm")
    assert _same_net(model.net, tiny_unet())
    assert model.identity == "hf:someone/tiny-ddpm@" + "a" * 40


def test_hub_id_offline_and_not_cached(tmp_path, monkeypatch):
    import huggingface_hub.constants as hub

    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelSourceError) as info:
        load_model("google/ddpm-ema-bedroom-256")
    message = str(info.value)
    assert "`hf download google/ddpm-ema-bedroom-256`" in message  # the pinned hub's command
    assert "huggingface-cli" not in message  # which that huggingface_hub does not install


def _corrupt(path: Path) -> None:
    (path / "diffusion_pytorch_model.safetensors").write_bytes(b"not a safetensors file" * 10)


def _mismatched(path: Path) -> None:
    cfg = json.loads((path / "config.json").read_text())
    cfg["block_out_channels"] = [16, 32]
    (path / "config.json").write_text(json.dumps(cfg))


def _unsupported_scheduler(path: Path) -> None:
    (path / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "CMStochasticIterativeScheduler", "sigma_min": 0.002}))


def _flow_scheduler_on_a_unet(path: Path) -> None:
    (path / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0}))


def _conditional(path: Path) -> None:
    cfg = json.loads((path / "config.json").read_text())
    cfg["_class_name"] = "UNet2DConditionModel"
    (path / "config.json").write_text(json.dumps(cfg))


def _no_scheduler(path: Path) -> None:
    (path / "scheduler_config.json").unlink()


def _bad_json(path: Path) -> None:
    (path / "config.json").write_text("{ not json")


@pytest.mark.parametrize(
    ("damage", "fragment"),
    [
        (_corrupt, "diffusion_pytorch_model.safetensors is not a safetensors file"),
        (_mismatched, "cannot load diffusion_pytorch_model.safetensors"),
        (_unsupported_scheduler, "scheduler 'CMStochasticIterativeScheduler' is not supported"),
        (_flow_scheduler_on_a_unet, "a flow-matching scheduler with a UNet2DModel"),
        (_conditional, "'UNet2DConditionModel' is not supported"),
        (_no_scheduler, "missing scheduler_config.json"),
        (_bad_json, "config.json is not valid JSON"),
    ],
)
def test_broken_models_give_clear_errors(tmp_path, damage, fragment):
    path = save_vp_model(tmp_path / "m")
    damage(path)
    with pytest.raises(ModelSourceError) as info:
        load_model(path)
    assert fragment in str(info.value) and str(path) in str(info.value)


def test_missing_and_wrong_sources(tmp_path):
    with pytest.raises(ModelSourceError, match=r"not found; allowed: a local"):
        load_model(tmp_path / "nope" / "model")
    (tmp_path / "file.bin").write_bytes(b"x")
    with pytest.raises(ModelSourceError, match="is a file"):
        load_model(tmp_path / "file.bin")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelSourceError, match=r"no config\.json"):
        load_model(tmp_path / "empty")
    with pytest.raises(ModelSourceError, match="no files at that URL"):
        load_model("memory://does/not/exist", cache_dir=tmp_path / "c")


def test_importing_sdedit_pulls_no_ray_fsspec_or_click():
    code = ("import sys, sdedit; bad = [m for m in ('ray', 'fsspec', 'click') "
            "if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_stable_diffusion_pipeline_directory(tiny_sd_dir, tmp_path):
    import shutil

    from tests.support.tiny_latent import tiny_cond_unet

    directory = tmp_path / "sd"
    shutil.copytree(tiny_sd_dir, directory)
    (directory / "safety_checker").mkdir()            # never read: broken on purpose
    (directory / "safety_checker" / "config.json").write_text("{ not json")
    model = load_model(directory)
    assert model.conditional and model.latent and isinstance(model.process, VPProcess)
    assert model.family == "sd"
    assert model.sample_size == (16, 16) and model.downsample_factor == 4
    assert model.in_channels == 3 and model.state_shape(16, 24) == (4, 8, 12)
    assert model.process.schedule.num_train_timesteps == 1000
    assert abs(float(model.process.schedule.betas[0]) - 0.00085) < 1e-12
    assert all(p.dtype == torch.float32 for p in model.codec.vae.parameters())
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    context = torch.randn(2, 12, 32, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([3, 700])
    with torch.no_grad():
        expected = tiny_cond_unet()(x, t, encoder_hidden_states=context).sample
    cond = Conditioning({"encoder_hidden_states": context})
    assert torch.equal(model.denoise(x, t, cond), expected)
    with pytest.raises(ValueError, match="cond is missing"):
        model.denoise(x, t)
    assert model.identity.startswith("sha256:")
    assert model.identity == load_model(tiny_sd_dir).identity    # extra folders do not count


def _inpainting(path: Path) -> None:
    cfg = json.loads((path / "unet" / "config.json").read_text())
    cfg["in_channels"] = 9
    (path / "unet" / "config.json").write_text(json.dumps(cfg))


def _no_tokenizer(path: Path) -> None:
    import shutil

    shutil.rmtree(path / "tokenizer")


@pytest.mark.parametrize(
    ("damage", "fragment"),
    [
        (_inpainting, "unet in/out channels 9/4"),
        (_no_tokenizer, "no tokenizer/ folder"),
    ],
)
def test_unsupported_latent_layouts_are_refused(tiny_sd_dir, tmp_path, damage, fragment):
    import shutil

    directory = tmp_path / "sd"
    shutil.copytree(tiny_sd_dir, directory)
    damage(directory)
    with pytest.raises(ModelSourceError) as info:
        load_model(directory)
    assert fragment in str(info.value) and "supported: the StableDiffusionPipeline layout" in \
        str(info.value)
