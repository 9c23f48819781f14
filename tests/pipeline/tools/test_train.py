"""Training a tiny DDPM: a loadable diffusers model dir, a falling loss, exact resume."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel
from safetensors.torch import load_file

from pipeline.errors import PipelineError
from pipeline.input.shards import expand_shards
from pipeline.tools.demo_data import write_demo_data
from pipeline.tools.train import train
from pipeline.tools.train_data import image_batches

TINY: dict[str, Any] = dict(size=16, batch_size=4, block_out_channels=(8, 16), norm_num_groups=8,
                            threads=1, progress=False, shuffle_buffer=8, warmup_steps=2)


@pytest.fixture(scope="module")
def rooms(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Four 16 px rooms in two shards."""
    out = tmp_path_factory.mktemp("rooms")
    write_demo_data(str(out), 4, size=16, shard_size=2, seed=0)
    return str(out)


def test_training_data_braces_globs_and_folders(rooms: str, tmp_path: Path) -> None:
    expected = [f"{rooms}/rooms-000000.tar", f"{rooms}/rooms-000001.tar"]
    assert expand_shards(f"{rooms}/rooms-{{000000..000001}}.tar") == expected
    assert expand_shards(rooms) == expected
    assert expand_shards([f"{rooms}/*.tar"]) == expected
    with pytest.raises(PipelineError, match="no training shards"):
        train(f"{rooms}/nothing-*.tar", str(tmp_path / "m"), steps=1, **TINY)


def test_image_batches_shapes_and_range(rooms: str) -> None:
    import numpy as np

    batches = image_batches(expand_shards(rooms), 8, 3, rng=np.random.default_rng(0),
                            shuffle_buffer=4)
    for _ in range(3):  # more than one epoch of 4 images
        x = next(batches)
        assert x.shape == (3, 3, 8, 8) and x.dtype == torch.float32
        assert float(x.min()) >= -1.0 and float(x.max()) <= 1.0 and float(x.std()) > 0.05


def test_train_writes_a_loadable_model_dir(rooms: str, tmp_path: Path) -> None:
    out = tmp_path / "model"
    report = train(rooms, str(out), steps=3, checkpoint_every=2, **TINY)
    assert (report.start_step, report.steps, len(report.losses)) == (0, 3, 3)
    for name in ("config.json", "diffusion_pytorch_model.safetensors", "scheduler_config.json",
                 "train_log.csv", "checkpoint/state.pt"):
        assert (out / name).is_file(), name
    unet = UNet2DModel.from_pretrained(str(out))
    assert unet.config.sample_size == 16 and tuple(unet.config.block_out_channels) == (8, 16)
    assert sum(p.numel() for p in unet.parameters()) == report.parameters
    scheduler = DDPMScheduler.from_config(DDPMScheduler.load_config(str(out)))
    cfg = scheduler.config
    assert (cfg.num_train_timesteps, cfg.beta_start, cfg.beta_end) == (1000, 1e-4, 0.02)
    assert (cfg.beta_schedule, cfg.prediction_type) == ("linear", "epsilon")
    assert (cfg.variance_type, cfg.clip_sample) == ("fixed_small", False)
    with torch.no_grad():
        eps = unet(torch.zeros(1, 3, 16, 16), torch.tensor([10])).sample
    assert eps.shape == (1, 3, 16, 16) and torch.isfinite(eps).all()
    rows = list(csv.DictReader((out / "train_log.csv").open()))
    assert [int(r["step"]) for r in rows] == [1, 2, 3]
    assert set(rows[0]) == {"step", "loss", "loss_ema", "seconds"}
    state = torch.load(out / "checkpoint" / "state.pt", weights_only=True)
    assert state["step"] == 3


def test_loss_falls_when_overfitting(rooms: str, tmp_path: Path) -> None:
    report = train(rooms, str(tmp_path / "m"), steps=120, lr=2e-3, checkpoint_every=1000, **TINY)
    first = sum(report.losses[:20]) / 20
    last = sum(report.losses[-20:]) / 20
    assert last < 0.6 * first, (first, last)


def test_resume_continues_exactly(rooms: str, tmp_path: Path) -> None:
    straight = train(rooms, str(tmp_path / "a"), steps=8, checkpoint_every=100, **TINY)
    first = train(rooms, str(tmp_path / "b"), steps=4, checkpoint_every=100, **TINY)
    resumed = train(rooms, str(tmp_path / "b"), steps=8, checkpoint_every=100, **TINY)
    assert first.start_step == 0 and resumed.start_step == 4 and len(resumed.losses) == 4
    assert resumed.losses == straight.losses[4:]
    a = load_file(str(tmp_path / "a" / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(tmp_path / "b" / "diffusion_pytorch_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = list(csv.DictReader((tmp_path / "b" / "train_log.csv").open()))
    assert [int(r["step"]) for r in rows] == list(range(1, 9))
    done = train(rooms, str(tmp_path / "b"), steps=6, checkpoint_every=100, **TINY)
    assert (done.start_step, done.steps, done.losses) == (8, 8, [])


def test_resume_refuses_a_different_model(rooms: str, tmp_path: Path) -> None:
    train(rooms, str(tmp_path / "m"), steps=1, **TINY)
    cfg = json.loads((tmp_path / "m" / "checkpoint" / "train_config.json").read_text())
    assert cfg["unet"]["block_out_channels"] == [8, 16]
    with pytest.raises(PipelineError, match="different model"):
        train(rooms, str(tmp_path / "m"), steps=2, **{**TINY, "block_out_channels": (16, 16)})


def test_bad_arguments(rooms: str, tmp_path: Path) -> None:
    with pytest.raises(PipelineError, match="divisible"):
        train(rooms, str(tmp_path / "m"), steps=1, **{**TINY, "size": 15})
    with pytest.raises(PipelineError, match="ema_decay"):
        train(rooms, str(tmp_path / "m"), steps=1, ema_decay=1.0, **TINY)


def test_cli_train_and_resume(rooms: str, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from pipeline.cli import main

    out = str(tmp_path / "m")
    args = ["train", f"{rooms}/rooms-{{000000..000001}}.tar", "--out", out, "--size", "16",
            "--batch-size", "2", "--channels", "8,16", "--threads", "1", "--no-progress"]
    first = CliRunner().invoke(main, [*args, "--steps", "2"])
    assert first.exit_code == 0, first.output
    assert "steps 0 -> 2" in first.output
    second = CliRunner().invoke(main, [*args, "--steps", "3"])
    assert second.exit_code == 0 and "steps 2 -> 3" in second.output
    clash = CliRunner().invoke(main, [*args, "--steps", "4", "--channels", "16,16"])
    assert clash.exit_code == 2 and "different model" in clash.output
