"""Test-only hooks, inert unless a test sets `SDEDIT_BATCH_TEST_HOOKS`.

Tests set one environment variable holding JSON (the runner forwards `SDEDIT_BATCH_*` variables
to its actors), for example `hooks_env(crash="part-000001:3:/tmp/flag", batch_delay=0.3)`:

    crash        "STEM:OUTPUTS:FLAGFILE": the process exits once OUTPUTS outputs of shard STEM
                 are done, once (FLAGFILE records that it happened); tests actor loss.
    batch_delay  seconds to sleep after each batch (to stop a run mid-way).
    fake_gpu     true: compute.device cuda runs on the CPU (a fake multi-node cluster whose
                 GPUs are Ray resources only).
    fail_write   "STEM:FLAGFILE": writing the first output of shard STEM raises OSError, once
                 (FLAGFILE records that it happened); tests that a write error aborts the shard.
    stand_in_ms  > 0: the loaded model's network is replaced by a stand-in whose every call
                 sleeps this many milliseconds per image (releasing the GIL, as waiting on a
                 GPU does) and predicts zeros: an emulated device whose busy time is known
                 exactly (benchmarks/host_pipeline.py). Noise is drawn ahead in background
                 threads, as the fast path does on a GPU host.

Production code reads the variable once per worker (`from_env`) and does nothing else when it is
unset.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import torch

from sdedit.accel import default_noise_threads

if TYPE_CHECKING:
    from sdedit import DiffusionModel

logger = logging.getLogger(__name__)

ENV = "SDEDIT_BATCH_TEST_HOOKS"


@dataclass(frozen=True)
class Hooks:
    """The hooks a test switched on (see the module docstring)."""

    crash: str | None = None
    batch_delay: float = 0.0
    fake_gpu: bool = False
    fail_write: str | None = None
    stand_in_ms: float = 0.0

    def install(self, model: DiffusionModel) -> None:
        """Swap the network of a loaded pixel model for the stand-in, if one is asked for."""
        if self.stand_in_ms > 0:
            model.net = _SleepNet(self.stand_in_ms)
            # rebuilds the runner around the new network; noise threads as on a GPU host
            model.accelerate(noise_threads=default_noise_threads())

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


class _SleepNet(torch.nn.Module):
    """A network call that takes `ms` milliseconds per image and predicts zeros."""

    def __init__(self, ms: float) -> None:
        super().__init__()
        self.ms = ms

    def forward(self, x: torch.Tensor, t: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        time.sleep(self.ms * x.shape[0] / 1000.0)
        return SimpleNamespace(sample=torch.zeros_like(x))


def _once(flag: str, note: str) -> bool:
    """True the first time for `flag` (a file records it), False afterwards."""
    if os.path.exists(flag):
        return False
    with open(flag, "w") as handle:
        handle.write(note + "\n")
    return True


def from_env() -> Hooks | None:
    """The hooks set in the environment, or None (the production case)."""
    raw = os.environ.get(ENV)
    return Hooks(**json.loads(raw)) if raw else None


def hooks_env(**hooks: Any) -> dict[str, str]:
    """The environment variable that switches `hooks` on (fields of `Hooks`)."""
    Hooks(**hooks)  # fail early on a misspelt hook
    return {ENV: json.dumps(hooks)}
