"""Test-only hooks, inert unless a test sets `SDEDIT_BATCH_TEST_HOOKS`.

Tests set one environment variable holding JSON (the runner forwards `SDEDIT_BATCH_*` variables
to its actors), for example `hooks_env(crash="part-000001:3:/tmp/flag", batch_delay=0.3)`:

    crash        "STEM:OUTPUTS:FLAGFILE": the process exits once OUTPUTS outputs of shard STEM
                 are done, once (FLAGFILE records that it happened); tests actor loss.
    batch_delay  seconds to sleep after each batch (to stop a run mid-way).
    fake_gpu     true: compute.device cuda runs on the CPU (a fake multi-node cluster whose
                 GPUs are Ray resources only).

Production code reads the variable once per worker (`from_env`) and does nothing else when it is
unset.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

ENV = "SDEDIT_BATCH_TEST_HOOKS"


@dataclass(frozen=True)
class Hooks:
    """The hooks a test switched on (see the module docstring)."""

    crash: str | None = None
    batch_delay: float = 0.0
    fake_gpu: bool = False

    def after_batch(self, stem: str, outputs_done: int) -> None:
        """Run after each batch of shard `stem`, with that shard's outputs so far."""
        if self.batch_delay:
            time.sleep(self.batch_delay)
        if not self.crash:
            return
        target, outputs, flag = self.crash.split(":", 2)
        if target == stem and outputs_done >= int(outputs) and not os.path.exists(flag):
            with open(flag, "w") as handle:
                handle.write(f"crashed {stem} after {outputs_done} outputs\n")
            logger.error("test hook: exiting the process mid-shard %s", stem)
            os._exit(1)


def from_env() -> Hooks | None:
    """The hooks set in the environment, or None (the production case)."""
    raw = os.environ.get(ENV)
    return Hooks(**json.loads(raw)) if raw else None


def hooks_env(**hooks: Any) -> dict[str, str]:
    """The environment variable that switches `hooks` on (fields of `Hooks`)."""
    Hooks(**hooks)  # fail early on a misspelt hook
    return {ENV: json.dumps(hooks)}
