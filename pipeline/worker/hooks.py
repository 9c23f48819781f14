"""Test hooks: faults and stand-ins that a test or a benchmark hands to the run path as an
object.

Production code never builds one nor reads one from the environment; the default, `NO_HOOKS`,
does nothing. Flag files make a fault happen once across processes."""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch

from sdedit import DiffusionModel, default_noise_threads

logger = logging.getLogger(__name__)

__all__ = ["NO_HOOKS", "Hooks"]


@dataclass(frozen=True)
class Hooks:
    """The hooks a test switched on; every field is off by default."""

    crash: str | None = None
    """"STEM:OUTPUTS:FLAGFILE": the process exits once OUTPUTS outputs of shard STEM are done."""
    batch_delay: float = 0.0
    """Seconds to sleep after each batch (to stop a run mid-way)."""
    fake_gpu: bool = False
    """compute.device cuda runs on the CPU (a fake cluster whose GPUs are Ray resources only)."""
    fail_write: str | None = None
    """"STEM:FLAGFILE": writing the first output of shard STEM raises OSError."""
    stall_read: str | None = None
    """"STEM:FLAGFILE": reading shard STEM never returns (the per-shard deadline's test)."""
    hold_read: str | None = None
    """"STEM:GATEFILE": reading shard STEM waits until GATEFILE exists (a run held, no timing)."""
    fail_start: str | None = None
    """A message: the worker's constructor raises RuntimeError with it."""
    stand_in_ms: float | None = None
    """The network becomes a stand-in that sleeps this many ms per image (releasing the GIL, as
    a GPU wait does) and predicts zeros: an emulated device; noise is drawn in threads."""
    score_stand_in_ms: float | None = None
    """The scorers' device work becomes a sleep of this many ms per image giving zero scores."""
    device_memory_gb: float | None = None
    """The worker checks the memory plan against a device of this many GB (2^30 bytes)."""

    def starting(self) -> None:
        """Run when a worker starts, before it loads its model."""
        if self.fail_start:
            raise RuntimeError(f"test hook: {self.fail_start}")

    def install(self, model: DiffusionModel) -> None:
        """Swap the network of a loaded pixel model for the stand-in, if one is asked for."""
        if self.stand_in_ms is not None:
            model.net = _SleepNet(self.stand_in_ms)
            # rebuilds the runner around the new network; noise threads as on a GPU host
            model.accelerate(noise_threads=default_noise_threads())

    def install_scorer(self, scorer: Any) -> None:
        """Swap the scorers' device work for the stand-in, if one is asked for."""
        if self.score_stand_in_ms is not None:
            scorer.score = _SleepScores(self.score_stand_in_ms, scorer)

    def before_read(self, stem: str) -> None:
        """Run before shard `stem` is read: blocks for good when `stall_read` names it, until
        its gate file exists when `hold_read` does."""
        if self.hold_read:
            target, gate = self.hold_read.split(":", 1)
            while target == stem and not os.path.exists(gate):
                time.sleep(0.05)
        if self.stall_read:
            target, flag = self.stall_read.split(":", 1)
            if target == stem and _once(flag, f"stalled the read of {stem}"):
                logger.error("test hook: the read of shard %s never returns", stem)
                threading.Event().wait()

    def after_batch(self, stem: str, outputs_done: int) -> None:
        """Run after each batch of shard `stem`, with that shard's outputs so far."""
        if self.batch_delay:
            time.sleep(self.batch_delay)
        if not self.crash:
            return
        target, outputs, flag = self.crash.split(":", 2)
        if target == stem and outputs_done >= int(outputs) and \
                _once(flag, f"crashed {stem} after {outputs_done} outputs"):
            logger.error("test hook: exiting the process mid-shard %s", stem)
            os._exit(1)

    def before_write(self, stem: str) -> None:
        """Run before an output of shard `stem` is appended to its tar."""
        if self.fail_write:
            target, flag = self.fail_write.split(":", 1)
            if target == stem and _once(flag, f"failed a write of {stem}"):
                raise OSError(f"test hook: writing shard {stem} failed")


NO_HOOKS = Hooks()
"""The default everywhere: no hook does anything."""


class _SleepNet(torch.nn.Module):
    """A network call that takes `ms` milliseconds per image and predicts zeros."""

    def __init__(self, ms: float) -> None:
        super().__init__()
        self.ms = ms

    def forward(self, x: torch.Tensor, t: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if self.ms > 0:
            time.sleep(self.ms * x.shape[0] / 1000.0)
        return SimpleNamespace(sample=torch.zeros_like(x))


class _SleepScores:
    """Scores that take `ms` milliseconds per image and are all zero."""

    def __init__(self, ms: float, scorer: Any) -> None:
        self.ms, self.metrics = ms, sorted(scorer.metrics)
        self.width = scorer.clip.width if scorer.clip is not None else 0

    def __call__(self, inputs: Any) -> list[dict[str, Any]]:
        time.sleep(self.ms * len(inputs) / 1000.0)
        zero = {name: 0.0 for name in self.metrics if name != "embedding"}
        if "embedding" in self.metrics:
            zero["embedding"] = [0.0] * self.width
        return [dict(zero) for _ in inputs]


def _once(flag: str, note: str) -> bool:
    """True the first time for `flag` (a file records it, across processes), False after."""
    try:
        with open(flag, "x") as handle:
            handle.write(note + "\n")
    except FileExistsError:
        return False
    return True
