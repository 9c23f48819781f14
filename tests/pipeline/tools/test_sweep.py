"""t0-sweep: every sample once per t0, its members kept, its own json keeping its settings."""

from __future__ import annotations

import json

import numpy as np
import pytest
import webdataset as wds
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.errors import PipelineError
from pipeline.input.reader import iter_raw
from pipeline.tools.sweep import sweep_inputs
from tests.support.shards import png


def test_sweep_writes_each_sample_once_per_t0(tmp_path):
    guide = png(np.zeros((8, 8, 3), np.uint8))
    with wds.TarWriter(str(tmp_path / "in-0.tar")) as tar:
        tar.write({"__key__": "a", "png": guide, "json": json.dumps({"prompt": "x"}).encode()})
        tar.write({"__key__": "b", "png": guide, "target.png": guide})
    result = CliRunner().invoke(main, ["t0-sweep", str(tmp_path / "in-0.tar"), "--t0", "0.3,0.6",
                                       "--out", str(tmp_path / "sweep")])
    assert result.exit_code == 0, result.output
    rows = {raw.key: raw.members for raw in iter_raw(str(tmp_path / "sweep" / "in-0.tar"), {})}
    assert sorted(rows) == ["a_t300", "a_t600", "b_t300", "b_t600"]
    assert json.loads(rows["a_t600"]["json"]) == {"prompt": "x", "t0": 0.6}
    assert rows["b_t300"]["target.png"] == guide and rows["b_t300"]["png"] == guide
    with pytest.raises(PipelineError, match=r"allowed: one or more values in \(0, 1\]"):
        sweep_inputs([str(tmp_path / "in-0.tar")], [0.0], str(tmp_path / "x"))
