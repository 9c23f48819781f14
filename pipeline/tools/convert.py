"""Convert an original DDPM / SDEdit checkpoint into a diffusers UNet2DModel directory.

The official `Model` is a UNet2DModel with `flip_sin_to_cos=False, freq_shift=1,
downsample_padding=0, norm_eps=1e-6` and one-head attention, so weights map one to one (up blocks
in reverse order). See docs/models.md."""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = ["convert_checkpoint", "official_to_diffusers_config"]

logger = logging.getLogger(__name__)

VAR_TYPES = {"fixedsmall": "fixed_small", "fixedlarge": "fixed_large"}
BETA_SCHEDULES = {"linear": "linear", "quad": "scaled_linear"}
"""Official beta schedules diffusers names; const, jsd and sigmoid become trained_betas."""
RENAMES = [  # diffusers name piece -> official name piece, applied to one key in order
    (r"^time_embedding\.linear_1\.", "temb.dense.0."),
    (r"^time_embedding\.linear_2\.", "temb.dense.1."),
    (r"^conv_norm_out\.", "norm_out."),
    (r"^mid_block\.resnets\.0\.", "mid.block_1."),
    (r"^mid_block\.resnets\.1\.", "mid.block_2."),
    (r"^mid_block\.attentions\.0\.", "mid.attn_1."),
    (r"^down_blocks\.(\d+)\.resnets\.", r"down.\1.block."),
    (r"^down_blocks\.(\d+)\.attentions\.", r"down.\1.attn."),
    (r"^down_blocks\.(\d+)\.downsamplers\.0\.", r"down.\1.downsample."),
    (r"\.time_emb_proj\.", ".temb_proj."),
    (r"\.conv_shortcut\.", ".nin_shortcut."),
    (r"\.group_norm\.", ".norm."),
    (r"\.to_q\.", ".q."),
    (r"\.to_k\.", ".k."),
    (r"\.to_v\.", ".v."),
    (r"\.to_out\.0\.", ".proj_out."),
]


def convert_checkpoint(ckpt_path: str | os.PathLike[str], config_path: str | os.PathLike[str],
                       out_dir: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
    """Convert an official checkpoint and the YAML config it was trained with into a model
    directory jobs read; returns `out_dir`.

    Read with `weights_only=True` (no arbitrary unpickling); DataParallel's "module." prefix is
    accepted; a non-empty `out_dir` needs `overwrite`. ValueError names the file, field or keys
    missing, unknown or of the wrong shape, and what is allowed."""
    from diffusers import DDPMScheduler, UNet2DModel

    ckpt, out = Path(ckpt_path), Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"out_dir {str(out)!r} is not empty; allowed: a new or empty "
                         "directory, or overwrite=True")
    config = _read_yaml(Path(config_path))
    unet_config = official_to_diffusers_config(config, str(config_path))
    net = UNet2DModel.from_config(unet_config)
    state = _map_state(_read_state(ckpt), net.state_dict(), str(ckpt))
    net.load_state_dict(state, strict=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        net.save_pretrained(staging, safe_serialization=True)
        DDPMScheduler(**_scheduler_config(config, str(config_path))).save_config(staging)
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("converted %s (%d tensors) to %s", ckpt, len(state), out)
    return out


def official_to_diffusers_config(config: Mapping[str, Any], where: str = "config"
                                 ) -> dict[str, Any]:
    """The UNet2DModel config of an official YAML config (a parsed mapping)."""
    model = _section(config, "model", where)
    data = _section(config, "data", where)
    ch = _field(model, "ch", int, where, "model")
    mult = [int(m) for m in _field(model, "ch_mult", list, where, "model")]
    blocks = _field(model, "num_res_blocks", int, where, "model")
    size = _field(data, "image_size", int, where, "data")
    attn = [int(r) for r in model.get("attn_resolutions", [])]
    if not model.get("resamp_with_conv", True):
        raise ValueError(f"{where}: model.resamp_with_conv=False (average-pool resampling) is "
                         "not supported; allowed: true (every official config)")
    if model.get("type", "simple") != "simple":
        raise ValueError(f"{where}: model.type={model.get('type')!r} is not supported; "
                         "allowed: 'simple' (the DDPM Model of models/diffusion.py)")
    levels = [size // 2**i for i in range(len(mult))]
    return {
        "_class_name": "UNet2DModel", "sample_size": size,
        "in_channels": int(model.get("in_channels", data.get("channels", 3))),
        "out_channels": int(model.get("out_ch", 3)), "center_input_sample": False,
        "time_embedding_type": "positional", "flip_sin_to_cos": False, "freq_shift": 1,
        "down_block_types": ["AttnDownBlock2D" if r in attn else "DownBlock2D" for r in levels],
        "up_block_types": ["AttnUpBlock2D" if r in attn else "UpBlock2D" for r in levels[::-1]],
        "block_out_channels": [ch * m for m in mult], "layers_per_block": blocks,
        "mid_block_scale_factor": 1, "downsample_padding": 0, "act_fn": "silu",
        "attention_head_dim": None, "norm_num_groups": 32, "norm_eps": 1e-6,
        "dropout": float(model.get("dropout", 0.0)),
    }


def _read_yaml(path: Path) -> dict[str, Any]:
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"config {str(path)!r} cannot be read as YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"config {str(path)!r} is not a YAML mapping; allowed: the official "
                         "layout with data:, model: and diffusion: sections")
    return data


def _section(config: Mapping[str, Any], name: str, where: str) -> Mapping[str, Any]:
    section = config.get(name)
    if not isinstance(section, Mapping):
        raise ValueError(f"{where}: missing section {name!r}; allowed: the official layout "
                         "with data:, model: and diffusion: sections")
    return section


def _field(section: Mapping[str, Any], key: str, kind: type, where: str, name: str) -> Any:
    value = section.get(key)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ValueError(f"{where}: {name}.{key}={value!r} is missing or not a "
                         f"{kind.__name__}; allowed: a {kind.__name__} as in configs/bedroom.yml")
    return value


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"checkpoint {str(path)!r} cannot be loaded with weights_only=True: "
                         f"{type(exc).__name__}: {str(exc)[:300]}") from exc
    if not isinstance(state, Mapping) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise ValueError(f"checkpoint {str(path)!r} is a {type(state).__name__}, not a state "
                         "dict; allowed: a mapping of parameter names to tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _official_name(key: str, levels: int) -> str:
    """The official checkpoint key of a diffusers UNet2DModel key."""
    up = re.match(r"^up_blocks\.(\d+)\.(resnets|attentions|upsamplers\.0)\.(.*)$", key)
    if up:
        part = {"resnets": "block", "attentions": "attn", "upsamplers.0": "upsample"}[up[2]]
        key = f"up.{levels - 1 - int(up[1])}.{part}.{up[3]}"
    for pattern, replacement in RENAMES:
        key = re.sub(pattern, replacement, key)
    return key


def _map_state(official: dict[str, torch.Tensor], target: dict[str, torch.Tensor],
               where: str) -> dict[str, torch.Tensor]:
    """The diffusers state dict from the official one: every key accounted for, shapes checked."""
    levels = 1 + max(int(k.split(".")[1]) for k in target if k.startswith("up_blocks."))
    names = {key: _official_name(key, levels) for key in target}
    expected = set(names.values())
    missing = sorted(expected - official.keys())
    unknown = sorted(official.keys() - expected)
    if missing or unknown:
        raise ValueError(
            f"checkpoint {where!r} does not match its config: missing keys {_some(missing)}; "
            f"unknown keys {_some(unknown)}; allowed: exactly the keys of the official Model "
            "for this config (check ch, ch_mult, num_res_blocks, attn_resolutions, image_size)")
    state = {}
    for key, name in names.items():
        tensor = official[name]
        if tensor.shape != target[key].shape:
            if tensor.numel() != target[key].numel() or tensor.ndim != 4:
                raise ValueError(
                    f"checkpoint {where!r}: {name} has shape {tuple(tensor.shape)}; allowed: "
                    f"{tuple(target[key].shape)} for this config")
            tensor = tensor.reshape(target[key].shape)        # 1x1 conv -> linear
        state[key] = tensor.to(torch.float32).contiguous()
    return state


def _some(keys: list[str]) -> str:
    if not keys:
        return "none"
    shown = ", ".join(keys[:12])
    return f"({len(keys)}) {shown}" + (", ..." if len(keys) > 12 else "")


def _scheduler_config(config: Mapping[str, Any], where: str) -> dict[str, Any]:
    diffusion = _section(config, "diffusion", where)
    model = _section(config, "model", where)
    steps = _field(diffusion, "num_diffusion_timesteps", int, where, "diffusion")
    start = float(diffusion.get("beta_start", 1e-4))
    end = float(diffusion.get("beta_end", 0.02))
    kind = diffusion.get("beta_schedule", "linear")
    var_type = model.get("var_type", "fixedsmall")
    if var_type not in VAR_TYPES:
        raise ValueError(f"{where}: model.var_type={var_type!r} is not supported; allowed: "
                         f"{', '.join(VAR_TYPES)}")
    out: dict[str, Any] = {"num_train_timesteps": steps, "beta_start": start, "beta_end": end,
                           "variance_type": VAR_TYPES[var_type], "clip_sample": False,
                           "prediction_type": "epsilon"}
    if kind in BETA_SCHEDULES:
        out["beta_schedule"] = BETA_SCHEDULES[kind]
        return out
    if kind == "const":
        betas = torch.full((steps,), end, dtype=torch.float64)
    elif kind == "jsd":
        betas = 1.0 / torch.linspace(steps, 1, steps, dtype=torch.float64)
    elif kind == "sigmoid":
        betas = torch.sigmoid(torch.linspace(-6, 6, steps, dtype=torch.float64)) * (end - start) \
            + start
    else:
        raise ValueError(f"{where}: diffusion.beta_schedule={kind!r} is not supported; allowed: "
                         "linear, quad, const, jsd, sigmoid")
    out["trained_betas"] = betas.tolist()
    return out

