"""convert_checkpoint: an original DDPM/SDEdit checkpoint + YAML config -> a diffusers directory
whose eps equals the original network's, with clear errors for keys, configs and files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

from pipeline.tools.convert import _scheduler_config, convert_checkpoint
from sdedit import edit, load_model
from sdedit.schedules import VPSchedule
from tests.support.official_ddpm import official_config, official_model


def _write(tmp_path, config, state, name="model.ckpt"):
    torch.save(state, tmp_path / name)
    (tmp_path / "model.yml").write_text(yaml.safe_dump(config))
    return tmp_path / name, tmp_path / "model.yml"


@pytest.mark.parametrize(
    ("shape", "prefix"),
    [
        (dict(ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(8,)), ""),
        (dict(ch_mult=(1, 1, 2), num_res_blocks=2, attn_resolutions=(16,)), "module."),
    ],
)
def test_converted_eps_equals_the_original_network(tmp_path, shape, prefix):
    config = official_config(**shape)
    net = official_model(config)
    state = {prefix + k: v for k, v in net.state_dict().items()}
    ckpt, cfg = _write(tmp_path, config, state)
    out = convert_checkpoint(ckpt, cfg, tmp_path / "converted")
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "diffusion_pytorch_model.safetensors", "scheduler_config.json"]
    model = load_model(out)
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0, 499, 999])
    with torch.no_grad():
        expected = net(x, t)
    got = model.denoise(x, t)
    scale = float(expected.abs().max())
    assert scale > 0.1
    assert torch.allclose(got, expected, rtol=0, atol=1e-5 * scale), \
        float((got - expected).abs().max())
    # the schedule of the config: linear 1e-4..0.02 over 1000, small variance
    betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
    assert torch.allclose(model.process.schedule.betas, torch.from_numpy(betas), rtol=1e-12, atol=0)
    scheduler = json.loads((out / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "DDPMScheduler"
    assert scheduler["variance_type"] == "fixed_small" and scheduler["clip_sample"] is False
    # and it edits like any model
    out_img = edit(model, x.clamp(-1, 1), t0=0.003, seeds=[1, 2, 3])
    assert out_img.shape == x.shape


@pytest.mark.parametrize("kind", ["quad", "sigmoid", "const", "jsd"])
def test_official_beta_schedules(kind):
    config = official_config()
    config["diffusion"]["beta_schedule"] = kind
    betas = VPSchedule.from_config(_scheduler_config(config, "cfg")).betas.numpy()
    start, end, n = 1e-4, 0.02, 1000
    expected = {  # the official get_beta_schedule
        "quad": np.linspace(start**0.5, end**0.5, n, dtype=np.float64) ** 2,
        "sigmoid": 1 / (1 + np.exp(-np.linspace(-6, 6, n))) * (end - start) + start,
        "const": end * np.ones(n, dtype=np.float64),
        "jsd": 1.0 / np.linspace(n, 1, n, dtype=np.float64),
    }[kind]
    assert np.allclose(betas, expected, rtol=1e-12, atol=0)


def test_missing_and_unknown_keys_are_named(tmp_path):
    config = official_config()
    state = official_model(config).state_dict()
    del state["down.1.attn.0.q.weight"]
    state["down.1.attn.0.qkv.weight"] = torch.zeros(1)
    ckpt, cfg = _write(tmp_path, config, state)
    with pytest.raises(ValueError) as info:
        convert_checkpoint(ckpt, cfg, tmp_path / "out")
    message = str(info.value)
    assert "missing keys (1) down.1.attn.0.q.weight" in message
    assert "unknown keys (1) down.1.attn.0.qkv.weight" in message
    assert not (tmp_path / "out").exists()


def test_a_config_that_does_not_match_the_checkpoint(tmp_path):
    state = official_model(official_config()).state_dict()
    wrong = official_config(ch=64)                             # same keys, other shapes
    ckpt, cfg = _write(tmp_path, wrong, state)
    with pytest.raises(ValueError, match=r"conv_in\.weight has shape \(32, 3, 3, 3\); "
                                         r"allowed: \(64, 3, 3, 3\)"):
        convert_checkpoint(ckpt, cfg, tmp_path / "out")
    wrong = official_config(attn_resolutions=(4,))             # attention at another level
    ckpt, cfg = _write(tmp_path, wrong, state)
    with pytest.raises(ValueError, match=r"missing keys \(\d+\) down\.2\.attn\.0"):
        convert_checkpoint(ckpt, cfg, tmp_path / "out")


class _Pickled:
    pass


@pytest.mark.parametrize(
    ("payload", "fragment"),
    [
        ({"model": _Pickled()}, "cannot be loaded with weights_only=True"),
        ([{"conv_in.weight": torch.zeros(1)}, {}], "is a list, not a state dict"),
    ],
)
def test_unsafe_or_non_state_dict_checkpoints_are_refused(tmp_path, payload, fragment):
    ckpt, cfg = _write(tmp_path, official_config(), payload)
    with pytest.raises(ValueError) as info:
        convert_checkpoint(ckpt, cfg, tmp_path / "out")
    assert fragment in str(info.value) and str(ckpt) in str(info.value)


def test_bad_configs_and_outputs(tmp_path):
    state = official_model(official_config()).state_dict()
    config = official_config()
    del config["model"]["ch_mult"]
    ckpt, cfg = _write(tmp_path, config, state)
    with pytest.raises(ValueError, match=r"model\.ch_mult=None is missing or not a list"):
        convert_checkpoint(ckpt, cfg, tmp_path / "out")
    config = official_config()
    config["model"]["resamp_with_conv"] = False
    ckpt, cfg = _write(tmp_path, config, state)
    with pytest.raises(ValueError, match="resamp_with_conv=False"):
        convert_checkpoint(ckpt, cfg, tmp_path / "out")
    ckpt, cfg = _write(tmp_path, official_config(), state)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    with pytest.raises(ValueError, match="is not empty"):
        convert_checkpoint(ckpt, cfg, tmp_path / "full")
    assert (tmp_path / "full" / "x").read_text() == "keep me"
    assert convert_checkpoint(ckpt, cfg, tmp_path / "full", overwrite=True) == tmp_path / "full"
    assert not (tmp_path / "full" / "x").exists()
