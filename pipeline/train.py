"""Train a small unconditional DDPM on WebDataset image shards: SDEdit for your own domain.

SDEdit needs a diffusion model of the *target* domain. `train` fits a diffusers `UNet2DModel`
with the DDPM objective (Ho et al., 2020, arXiv 2006.11239): linear betas 1e-4..0.02 over
1000 steps, x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps, loss = |eps - eps_theta|^2,
AdamW, an EMA of the weights, random horizontal flips. The result is a model directory laid out
like google/ddpm-ema-bedroom-256 (`config.json`, `diffusion_pytorch_model.safetensors` holding
the EMA weights, `scheduler_config.json`) that every loader of the project accepts.

Training state lives in `OUT/checkpoint/` (written every `checkpoint_every` steps and at the
end); running `train` again with the same `out_dir` resumes from it, `steps` being the total.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import logging
import math
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np
import torch
import webdataset.tariterators as wds_tar
from diffusers import DDPMScheduler, UNet2DModel
from PIL import Image
from tqdm.auto import tqdm

from pipeline.errors import PipelineError, StorageError

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
    """What one call of `train` did.

    `losses` are the per-step training losses of this call only (steps start_step+1 .. steps);
    `seconds` counts the wall time of every run that contributed to the model, resumes included.
    """

    out_dir: str
    start_step: int
    steps: int
    parameters: int
    device: str
    seconds: float
    losses: list[float] = field(default_factory=list)
    final_loss_ema: float | None = None


IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")


def expand_data_urls(data: Sequence[str] | str,
                     storage_options: Mapping[str, Any] | None = None) -> list[str]:
    """Shard URLs from URLs, brace patterns (`{000000..000015}`), globs and folders of `*.tar`."""
    items = [data] if isinstance(data, str) else list(data)
    try:
        from braceexpand import braceexpand
    except ImportError:  # pragma: no cover - braceexpand comes with webdataset
        def braceexpand(pattern: str) -> Iterator[str]:
            yield pattern
    urls: list[str] = []
    opts = dict(storage_options or {})
    for item in items:
        for url in braceexpand(item):
            fs, path = fsspec.core.url_to_fs(url, **opts)
            try:
                if any(ch in path for ch in "*?["):
                    urls.extend(fs.unstrip_protocol(p) for p in sorted(fs.glob(path)))
                elif fs.isdir(path):
                    urls.extend(fs.unstrip_protocol(p) for p in sorted(fs.glob(path + "/*.tar")))
                else:
                    urls.append(url)
            except OSError as e:
                raise StorageError(f"cannot list training data {url}: {e}") from e
    if not urls:
        raise PipelineError(f"no training shards found in {data!r}")
    return urls


def _decode_image(sample: Mapping[str, Any], size: int) -> torch.Tensor | None:
    """The first image member of a WebDataset sample as a tensor (3, size, size) in [-1, 1]."""
    ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
    if ext is None:
        return None
    try:
        img = Image.open(io.BytesIO(sample[ext])).convert("RGB")
    except (OSError, ValueError) as e:
        logger.warning("skipping unreadable image %s.%s: %s", sample.get("__key__"), ext, e)
        return None
    w, h = img.size
    side = min(w, h)
    if w != h:
        left, top = (w - side) // 2, (h - side) // 2
        img = img.crop((left, top, left + side, top + side))
    if side != size:
        img = img.resize((size, size), Image.Resampling.BICUBIC)
    arr = np.asarray(img, dtype=np.float32)  # (size, size, 3) in [0, 255]
    return torch.from_numpy(arr).permute(2, 0, 1) / 127.5 - 1.0


def _samples(urls: Sequence[str], rng: np.random.Generator,
             storage_options: Mapping[str, Any] | None) -> Iterator[dict[str, Any]]:
    """WebDataset samples of every shard, in a new random shard order each epoch, forever."""
    opts = dict(storage_options or {})

    def streams() -> Iterator[dict[str, Any]]:
        for i in rng.permutation(len(urls)):
            try:
                with fsspec.open(urls[i], "rb", **opts) as f:
                    yield {"url": urls[i], "stream": f}
            except OSError as e:
                raise StorageError(f"cannot read training shard {urls[i]}: {e}") from e

    while True:
        n = 0
        for sample in wds_tar.group_by_keys(wds_tar.tar_file_expander(streams())):
            n += 1
            yield sample
        if n == 0:
            raise PipelineError(f"the training shards hold no samples: {urls[:3]}...")


def image_batches(urls: Sequence[str], size: int, batch_size: int, *, rng: np.random.Generator,
                  shuffle_buffer: int = 1000, skip_batches: int = 0,
                  storage_options: Mapping[str, Any] | None = None) -> Iterator[torch.Tensor]:
    """Endless shuffled batches (batch_size, 3, size, size), float32 in [-1, 1], from shards.

    The buffer holds encoded samples; only emitted ones are decoded. The first `skip_batches`
    batches are drawn but not decoded, so a resumed run sees exactly the batches it would have.
    """
    buffer: list[Mapping[str, Any]] = []
    batch: list[torch.Tensor] = []
    to_skip = skip_batches * batch_size
    for sample in _samples(urls, rng, storage_options):
        if not any(e in sample for e in IMAGE_EXTENSIONS):
            continue
        if len(buffer) < shuffle_buffer:
            buffer.append(sample)
            if len(buffer) < min(shuffle_buffer, 100):
                continue
            sample = buffer.pop(int(rng.integers(len(buffer))))
        else:
            j = int(rng.integers(len(buffer)))
            buffer[j], sample = sample, buffer[j]
        if to_skip > 0:
            to_skip -= 1
            continue
        image = _decode_image(sample, size)
        if image is None:
            continue
        batch.append(image)
        if len(batch) == batch_size:
            yield torch.stack(batch)
            batch = []


def make_unet(size: int, block_out_channels: Sequence[int], layers_per_block: int = 1,
              norm_num_groups: int = 8, attention: bool = True) -> UNet2DModel:
    """A small DDPM UNet for `size` x `size` RGB images: convolutional blocks at every level,
    one self-attention layer in the middle block when `attention` is set."""
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


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError as e:
        raise PipelineError(f"unknown device {device!r}: {e}") from e


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
    """Train (or resume training) an unconditional DDPM on the images of WebDataset shards.

    Args:
        data: shard URLs (any fsspec URL), brace patterns like `data/rooms-{000000..000015}.tar`,
            glob patterns, or folders holding `*.tar`. Members .png/.jpg/.jpeg/.webp are used.
        out_dir: local model directory; holds the exported model, `train_log.csv` and
            `checkpoint/`. If a checkpoint exists, training resumes from it.
        size: training resolution; images are centre-cropped to square and resized.
        steps: total number of optimisation steps (including those of earlier runs).
        batch_size, lr, warmup_steps: AdamW batch size, peak learning rate, linear warm-up.
        ema_decay: decay of the weight EMA (warmed up as min(decay, (1 + k) / (10 + k))).
        block_out_channels, layers_per_block, norm_num_groups, attention: the UNet size.
        checkpoint_every: steps between checkpoints (and model exports).
        shuffle_buffer: samples held in the shuffle buffer.
        seed: seeds weights, noise, timesteps, flips and data order.
        device: "auto" (CUDA if present, else CPU), "cpu", "cuda", "cuda:1", ...
        bf16: run forward/backward under bfloat16 autocast (weights stay float32).
        snr_gamma: if set, weight each sample's loss by min(SNR_t, gamma) / SNR_t (Min-SNR,
            Hang et al. 2023, arXiv 2303.09556), which speeds up learning the coarse structure.
        threads: torch intra-op threads (None: torch's default).
        progress: show a progress bar with the loss.

    Returns:
        A `TrainReport`; the model directory is complete when it returns.
    """
    if steps < 1 or batch_size < 1 or checkpoint_every < 1:
        raise PipelineError("steps, batch_size and checkpoint_every must be >= 1")
    if not 0.0 <= ema_decay < 1.0:
        raise PipelineError(f"ema_decay must be in [0, 1), got {ema_decay}")
    if threads is not None:
        torch.set_num_threads(threads)
    dev = _resolve_device(device)
    urls = expand_data_urls(data, storage_options)
    os.makedirs(out_dir, exist_ok=True)
    ckpt_dir = os.path.join(out_dir, CHECKPOINT_DIR)

    torch.manual_seed(seed)
    model = make_unet(size, block_out_channels, layers_per_block, norm_num_groups, attention)
    config = json.loads(json.dumps({
        "unet": {k: v for k, v in model.config.items() if not k.startswith("_")},
        "scheduler": SCHEDULER_CONFIG}, default=str))
    ema = copy.deepcopy(model).requires_grad_(False)
    model.to(dev).train()
    ema.to(dev).eval()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    generator = torch.Generator("cpu").manual_seed(seed)
    start_step, seconds_before, loss_ema = 0, 0.0, float("nan")

    state_path = os.path.join(ckpt_dir, STATE_FILE)
    if os.path.exists(state_path):
        with open(os.path.join(ckpt_dir, CONFIG_FILE)) as f:
            saved = json.load(f)
        if saved != config:
            raise PipelineError(f"{out_dir} holds a checkpoint of a different model or schedule; "
                                "use another out_dir or the same model settings")
        state = torch.load(state_path, map_location=dev, weights_only=True)
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["rng_torch"])
        start_step, seconds_before = int(state["step"]), float(state["seconds"])
        loss_ema = float(state["loss_ema"])
        logger.info("resuming %s from step %d", out_dir, start_step)
    else:
        os.makedirs(ckpt_dir, exist_ok=True)
        with open(os.path.join(ckpt_dir, CONFIG_FILE), "w") as f:
            json.dump(config, f, indent=2)

    n_params = sum(p.numel() for p in model.parameters())
    log_path = os.path.join(out_dir, LOG_FILE)
    log_rows: list[dict[str, Any]] = list(_read_log(log_path, start_step))
    scheduler = DDPMScheduler(**SCHEDULER_CONFIG)
    alpha_bar = scheduler.alphas_cumprod.to(dev, torch.float32)  # (1000,)
    losses: list[float] = []
    t_start = time.monotonic()

    def elapsed() -> float:
        return seconds_before + time.monotonic() - t_start

    def checkpoint(step: int) -> None:
        _save_checkpoint(ckpt_dir, {
            "step": step, "seconds": elapsed(), "loss_ema": loss_ema,
            "model": model.state_dict(), "ema": ema.state_dict(),
            "optimizer": optimizer.state_dict(), "rng_torch": generator.get_state(),
        })
        _write_log(log_path, log_rows)
        _export(ema, out_dir)
        logger.info("checkpoint at step %d in %s", step, ckpt_dir)

    if start_step >= steps:
        logger.info("%s is already trained to step %d >= %d", out_dir, start_step, steps)
        _export(ema, out_dir)
        return TrainReport(out_dir, start_step, start_step, n_params, str(dev), seconds_before,
                           [], None if math.isnan(loss_ema) else loss_ema)

    # A resumed run replays the data order up to start_step, so it sees the batches it would
    # have seen without the interruption (if the shards and batch size are unchanged).
    batches: Iterator[torch.Tensor] = image_batches(
        urls, size, batch_size, rng=np.random.default_rng(seed), shuffle_buffer=shuffle_buffer,
        skip_batches=start_step, storage_options=storage_options)
    bar = tqdm(total=steps, initial=start_step, disable=not progress, desc="train",
               unit="step", dynamic_ncols=True)
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16)
    try:
        for step in range(start_step + 1, steps + 1):
            x0 = next(batches)  # (B, 3, size, size) float32 in [-1, 1]
            b = x0.shape[0]
            flip = torch.rand(b, generator=generator) < 0.5
            x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0).to(dev)
            t = torch.randint(0, 1000, (b,), generator=generator).to(dev)
            eps = torch.randn(x0.shape, generator=generator).to(dev)
            a = alpha_bar[t][:, None, None, None]
            x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
            for group in optimizer.param_groups:
                group["lr"] = lr * min(1.0, step / max(warmup_steps, 1))
            with autocast:
                pred = model(x_t, t).sample
            per_sample = (pred.float() - eps).pow(2).mean(dim=(1, 2, 3))  # (B,)
            if snr_gamma is not None:
                snr = alpha_bar[t] / (1 - alpha_bar[t])
                per_sample = per_sample * snr.clamp(max=snr_gamma) / snr
            loss = per_sample.mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            _ema_update(ema, model, min(ema_decay, (1 + step) / (10 + step)))

            value = float(loss.detach())
            if not math.isfinite(value):
                raise PipelineError(f"training diverged at step {step} (loss {value})")
            losses.append(value)
            loss_ema = value if math.isnan(loss_ema) else 0.98 * loss_ema + 0.02 * value
            log_rows.append({"step": step, "loss": f"{value:.6f}", "loss_ema": f"{loss_ema:.6f}",
                             "seconds": f"{elapsed():.1f}"})
            bar.update(1)
            bar.set_postfix(loss=f"{loss_ema:.4f}")
            if step % checkpoint_every == 0 or step == steps:
                checkpoint(step)
    finally:
        bar.close()
    return TrainReport(out_dir, start_step, steps, n_params, str(dev), elapsed(), losses,
                       loss_ema)
