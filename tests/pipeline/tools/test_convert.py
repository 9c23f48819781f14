"""`sdedit-batch convert`: an original checkpoint becomes a model directory a job can use."""

from __future__ import annotations

import torch
import yaml
from click.testing import CliRunner

from pipeline.cli import main
from sdedit import load_model
from tests.support.official_ddpm import official_config, official_model


def test_convert_cli_writes_a_loadable_model_and_names_bad_keys(tmp_path):
    config = official_config()
    net = official_model(config)
    torch.save(net.state_dict(), tmp_path / "model.ckpt")
    (tmp_path / "model.yml").write_text(yaml.safe_dump(config))
    args = ["convert", str(tmp_path / "model.ckpt"), "--config", str(tmp_path / "model.yml")]
    result = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "m")])
    assert result.exit_code == 0, result.output
    assert "use it as model.source" in result.output
    assert load_model(tmp_path / "m").kind == "vp"
    again = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "m")])
    assert again.exit_code == 2 and "is not empty" in again.output
    state = net.state_dict()
    del state["conv_out.weight"]
    torch.save(state, tmp_path / "broken.ckpt")
    broken = CliRunner().invoke(main, ["convert", str(tmp_path / "broken.ckpt"), "--config",
                                       str(tmp_path / "model.yml"), "--out", str(tmp_path / "b")])
    assert broken.exit_code == 2 and "missing keys (1) conv_out.weight" in broken.output
    assert "Traceback" not in broken.output
