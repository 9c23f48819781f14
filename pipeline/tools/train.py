"""Train a small unconditional DDPM on WebDataset image shards: SDEdit for your own domain.

A diffusers `UNet2DModel` fit with the DDPM objective (Ho et al., 2020), AdamW and an EMA of the
weights, exported as a model directory jobs accept; the same `out_dir` again resumes from its
checkpoint. See docs/models.md."""

from __future__ import annotations

import copy
import csv
import json
import logging
import math
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from diffusers import DDPMScheduler, UNet2DModel
from tqdm.auto import tqdm

from pipeline.errors import PipelineError
from pipeline.input.shards import expand_shards
from pipeline.tools.train_data import image_batches
from sdedit import VPSchedule, resolve_device

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoint"
STATE_FILE = "state.pt"
CONFIG_FILE = "train_config.json"
LOG_FILE = "train_log.csv"
LOG_COLUMNS = ("step", "loss", "loss_ema", "seconds")

#: The DDPM schedule of the original LSUN models, saved next to every trained UNet.
SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02,
    "beta_schedule": "linear", "prediction_type": "epsilon", "variance_type": "fixed_small",
    "clip_sample": False,
}


@dataclass(frozen=True)
class TrainReport:
    """What one call of `train` did: `losses` of this call's steps only, `seconds` of every run
    that made the model, resumes included."""

    out_dir: str
    start_step: int
    steps: int
    parameters: int
    device: str
    seconds: float
    losses: list[float] = field(default_factory=list)
    final_loss_ema: float | None = None


def make_unet(size: int, block_out_channels: Sequence[int], layers_per_block: int = 1,
              norm_num_groups: int = 8, attention: bool = True) -> UNet2DModel:
    """A small DDPM UNet for `size` x `size` RGB images, one self-attention layer in the middle
    block when `attention` is set."""
    n = len(block_out_channels)
    if n < 1 or size % (2 ** (n - 1)) != 0:
        raise PipelineError(f"size {size} must be divisible by 2**(levels-1) = {2 ** (n - 1)}")
    if any(c % norm_num_groups for c in block_out_channels):
        raise PipelineError(f"block_out_channels {tuple(block_out_channels)} must be multiples "
                            f"of norm_num_groups {norm_num_groups}")
    return UNet2DModel(
        sample_size=size, in_channels=3, out_channels=3,
        block_out_channels=tuple(block_out_channels), layers_per_block=layers_per_block,
        down_block_types=("DownBlock2D",) * n, up_block_types=("UpBlock2D",) * n,
        norm_num_groups=norm_num_groups, add_attention=attention,
        attention_head_dim=min(block_out_channels[-1], 64),
    )


@torch.no_grad()
def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, parameter by parameter (buffers copied)."""
    for e, p in zip(ema.parameters(), model.parameters(), strict=True):
        e.lerp_(p.detach(), 1.0 - decay)
    for e, b in zip(ema.buffers(), model.buffers(), strict=True):
        e.copy_(b)


def _read_log(path: str, upto: int) -> list[dict[str, str]]:
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        return [row for row in csv.DictReader(f) if int(row["step"]) <= upto]


def _write_log(path: str, rows: list[dict[str, Any]]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=LOG_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def _export(ema: UNet2DModel, out_dir: str) -> None:
    """Write the EMA UNet and the DDPM scheduler config as a diffusers model directory."""
    ema.save_pretrained(out_dir, safe_serialization=True)
    DDPMScheduler(**SCHEDULER_CONFIG).save_config(out_dir)


def _save_checkpoint(ckpt_dir: str, state: dict[str, Any]) -> None:
    os.makedirs(ckpt_dir, exist_ok=True)
    tmp = os.path.join(ckpt_dir, STATE_FILE + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, os.path.join(ckpt_dir, STATE_FILE))


@dataclass
class _State:
    """Everything a checkpoint holds, live on the training device."""

    model: UNet2DModel
    ema: UNet2DModel
    optimizer: torch.optim.Optimizer
    generator: torch.Generator
    step: int = 0
    seconds_before: float = 0.0
    loss_ema: float = float("nan")

    def to_checkpoint(self, seconds: float) -> dict[str, Any]:
        return {"step": self.step, "seconds": seconds, "loss_ema": self.loss_ema,
                "model": self.model.state_dict(), "ema": self.ema.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "rng_torch": self.generator.get_state()}


def _start(out_dir: str, model: UNet2DModel, lr: float, seed: int,
           dev: torch.device) -> _State:
    """A fresh training state, or the one of `out_dir`'s checkpoint (same model required)."""
    ckpt_dir = os.path.join(out_dir, CHECKPOINT_DIR)
    config = json.loads(json.dumps({
        "unet": {k: v for k, v in model.config.items() if not k.startswith("_")},
        "scheduler": SCHEDULER_CONFIG}, default=str))
    ema = copy.deepcopy(model).requires_grad_(False)
    model.to(dev).train()
    ema.to(dev).eval()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    state = _State(model, ema, optimizer, torch.Generator("cpu").manual_seed(seed))
    state_path = os.path.join(ckpt_dir, STATE_FILE)
    if not os.path.exists(state_path):
        os.makedirs(ckpt_dir, exist_ok=True)
        with open(os.path.join(ckpt_dir, CONFIG_FILE), "w") as f:
            json.dump(config, f, indent=2)
        return state
    with open(os.path.join(ckpt_dir, CONFIG_FILE)) as f:
        if json.load(f) != config:
            raise PipelineError(f"{out_dir} holds a checkpoint of a different model or schedule; "
                                "use another out_dir or the same model settings")
    saved = torch.load(state_path, map_location=dev, weights_only=True)
    model.load_state_dict(saved["model"])
    ema.load_state_dict(saved["ema"])
    optimizer.load_state_dict(saved["optimizer"])
    state.generator.set_state(saved["rng_torch"])
    state.step, state.seconds_before = int(saved["step"]), float(saved["seconds"])
    state.loss_ema = float(saved["loss_ema"])
    logger.info("resuming %s from step %d", out_dir, state.step)
    return state


def _loss(state: _State, x0: torch.Tensor, alpha_bar: torch.Tensor, dev: torch.device,
          bf16: bool, snr_gamma: float | None) -> torch.Tensor:
    """The DDPM loss of one batch x0 (B, 3, S, S) in [-1, 1]; flips, timesteps and noise come
    from the state's generator in that order, so a resumed run draws the same."""
    b = x0.shape[0]
    flip = torch.rand(b, generator=state.generator) < 0.5
    x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0).to(dev)
    t = torch.randint(0, 1000, (b,), generator=state.generator).to(dev)
    eps = torch.randn(x0.shape, generator=state.generator).to(dev)
    a = alpha_bar[t][:, None, None, None]
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
        pred = state.model(x_t, t).sample
    per_sample = (pred.float() - eps).pow(2).mean(dim=(1, 2, 3))  # (B,)
    if snr_gamma is not None:
        snr = alpha_bar[t] / (1 - alpha_bar[t])
        per_sample = per_sample * snr.clamp(max=snr_gamma) / snr
    return per_sample.mean()


def _optimise(state: _State, loss: torch.Tensor, lr: float, warmup_steps: int,
              ema_decay: float) -> None:
    """One AdamW step (linear warm-up, gradient norm clipped to 1), then the EMA update."""
    for group in state.optimizer.param_groups:
        group["lr"] = lr * min(1.0, state.step / max(warmup_steps, 1))
    state.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(state.model.parameters(), 1.0)
    state.optimizer.step()
    _ema_update(state.ema, state.model, min(ema_decay, (1 + state.step) / (10 + state.step)))


def train(
    data: Sequence[str] | str,
    out_dir: str,
    *,
    size: int = 64,
    steps: int = 10000,
    batch_size: int = 32,
    lr: float = 2e-4,
    warmup_steps: int = 200,
    ema_decay: float = 0.999,
    block_out_channels: Sequence[int] = (32, 64, 64, 128),
    layers_per_block: int = 1,
    norm_num_groups: int = 8,
    attention: bool = True,
    checkpoint_every: int = 500,
    shuffle_buffer: int = 1000,
    seed: int = 0,
    device: str = "auto",
    bf16: bool = False,
    snr_gamma: float | None = None,
    threads: int | None = None,
    progress: bool = True,
    storage_options: Mapping[str, Any] | None = None,
) -> TrainReport:
    """Train (or resume) an unconditional DDPM on the images of WebDataset shards; the model
    directory is complete when it returns.

    Args:
        data: shard URLs, brace or glob patterns, or folders of `*.tar`; png / jpg / jpeg / webp
            members are used.
        out_dir: local model directory, with `train_log.csv` and `checkpoint/` (resumed from).
        steps: total optimisation steps, those of earlier runs included.
        ema_decay: decay of the weight EMA, warmed up as min(decay, (1 + k) / (10 + k)).
        device: "auto" (CUDA if present), "cpu", "cuda", "cuda:1", ...
        bf16: forward and backward under bfloat16 autocast (weights stay float32).
        snr_gamma: weight each sample's loss by min(SNR_t, gamma) / SNR_t (Min-SNR, Hang et al.
            2023), which learns the coarse structure faster.
    """
    if steps < 1 or batch_size < 1 or checkpoint_every < 1:
        raise PipelineError("steps, batch_size and checkpoint_every must be >= 1")
    if not 0.0 <= ema_decay < 1.0:
        raise PipelineError(f"ema_decay must be in [0, 1), got {ema_decay}")
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        dev = resolve_device(device)
        urls = expand_shards(data, storage_options)
    except (ValueError, PipelineError) as exc:
        raise PipelineError(f"no training shards found in {data!r}: {exc}"
                            if isinstance(exc, PipelineError) else str(exc)) from exc
    os.makedirs(out_dir, exist_ok=True)
    torch.manual_seed(seed)
    model = make_unet(size, block_out_channels, layers_per_block, norm_num_groups, attention)
    state = _start(out_dir, model, lr, seed, dev)
    start_step = state.step
    n_params = sum(p.numel() for p in model.parameters())
    log_path = os.path.join(out_dir, LOG_FILE)
    log_rows: list[dict[str, Any]] = list(_read_log(log_path, start_step))
    alpha_bar = VPSchedule.from_config(SCHEDULER_CONFIG).alphas_cumprod.to(dev, torch.float32)
    losses: list[float] = []
    t_start = time.monotonic()

    def elapsed() -> float:
        return state.seconds_before + time.monotonic() - t_start

    def checkpoint() -> None:
        _save_checkpoint(os.path.join(out_dir, CHECKPOINT_DIR), state.to_checkpoint(elapsed()))
        _write_log(log_path, log_rows)
        _export(state.ema, out_dir)
        logger.info("checkpoint at step %d in %s", state.step, out_dir)

    if start_step >= steps:
        logger.info("%s is already trained to step %d >= %d", out_dir, start_step, steps)
        _export(state.ema, out_dir)
        return TrainReport(out_dir, start_step, start_step, n_params, str(dev),
                           state.seconds_before, [],
                           None if math.isnan(state.loss_ema) else state.loss_ema)

    # A resumed run replays the data order up to start_step, so it sees the batches it would
    # have seen without the interruption (if the shards and batch size are unchanged).
    batches: Iterator[torch.Tensor] = image_batches(
        urls, size, batch_size, rng=np.random.default_rng(seed), shuffle_buffer=shuffle_buffer,
        skip_batches=start_step, storage_options=storage_options)
    bar = tqdm(total=steps, initial=start_step, disable=not progress, desc="train",
               unit="step", dynamic_ncols=True)
    try:
        while state.step < steps:
            state.step += 1
            loss = _loss(state, next(batches), alpha_bar, dev, bf16, snr_gamma)
            _optimise(state, loss, lr, warmup_steps, ema_decay)
            value = float(loss.detach())
            if not math.isfinite(value):
                raise PipelineError(f"training diverged at step {state.step} (loss {value})")
            losses.append(value)
            state.loss_ema = value if math.isnan(state.loss_ema) else \
                0.98 * state.loss_ema + 0.02 * value
            log_rows.append({"step": state.step, "loss": f"{value:.6f}",
                             "loss_ema": f"{state.loss_ema:.6f}", "seconds": f"{elapsed():.1f}"})
            bar.update(1)
            bar.set_postfix(loss=f"{state.loss_ema:.4f}")
            if state.step % checkpoint_every == 0 or state.step == steps:
                checkpoint()
    finally:
        bar.close()
    return TrainReport(out_dir, start_step, steps, n_params, str(dev), elapsed(), losses,
                       state.loss_ema)
