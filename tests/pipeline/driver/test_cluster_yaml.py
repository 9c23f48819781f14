"""cluster.yaml passes Ray's own cluster-config validation, and has the intended node types."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER_YAML = Path(__file__).resolve().parents[3] / "cluster.yaml"


def _load() -> dict[str, Any]:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def _validated(raw: dict[str, Any]) -> dict[str, Any]:
    """What `ray up` does before launching: fill AWS defaults, then check against the schema."""
    config = prepare_config(copy.deepcopy(raw))
    validate_config(config)
    return config


def test_cluster_yaml_is_valid_for_ray() -> None:
    config = _validated(_load())
    assert config["provider"]["type"] == "aws"
    assert config["provider"]["region"] == "us-west-2"
    assert config["idle_timeout_minutes"] == 5
    assert config["max_workers"] >= 1


def test_head_is_cpu_only_and_gpu_workers_scale_from_zero() -> None:
    config = _validated(_load())
    node_types = config["available_node_types"]
    head = node_types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    assert head["resources"]["CPU"] == 8
    workers = [spec for name, spec in node_types.items() if name != config["head_node_type"]]
    gpu_workers = [spec for spec in workers if spec["resources"].get("GPU", 0) >= 1]
    assert gpu_workers, "no worker node type offers a GPU"
    for spec in gpu_workers:
        assert spec["min_workers"] == 0
        assert 1 <= spec["max_workers"] <= config["max_workers"]
        assert spec["node_config"]["InstanceType"].startswith(("g", "p"))


def test_setup_installs_torch_and_this_package() -> None:
    config = _load()
    commands = "\n".join(config["setup_commands"])
    assert "pip install" in commands and "torch" in commands
    assert "sdedit_batch" in commands or "sdedit-batch" in commands
    assert "./jobs" in config["file_mounts"].values()


@pytest.mark.parametrize(
    ("breakage", "error"),
    [
        ("resources_not_integer", jsonschema.ValidationError),
        ("unknown_top_level_key", jsonschema.ValidationError),
        ("head_type_missing", ValueError),
        ("min_workers_above_max", ValueError),
    ],
)
def test_broken_copies_fail_validation(breakage: str, error: type[Exception]) -> None:
    raw = _load()
    gpu = raw["available_node_types"]["gpu_worker"]
    if breakage == "resources_not_integer":
        gpu["resources"]["GPU"] = "one"
    elif breakage == "unknown_top_level_key":
        raw["max_worker"] = raw.pop("max_workers")  # a typo
    elif breakage == "head_type_missing":
        raw["head_node_type"] = "no_such_type"
    elif breakage == "min_workers_above_max":
        gpu["min_workers"] = raw["max_workers"] + 1
    with pytest.raises(error):
        _validated(raw)
