"""`GatedHooks`: the test hooks plus a gate that holds every shard read until a file exists.

A test that checks the state of a cluster while work is pending (GPU nodes added for actors that
wait for them) holds the work back with the gate, checks, then creates the file: what it checks
then never depends on how fast a loaded machine gets through the work. The actors unpickle this
class, so the driver must run with the repository root as its working directory (Ray puts the
driver's working directory on its workers' import path), as `tests.support.hooked_cli` does.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

from pipeline.worker.hooks import Hooks

POLL_S = 0.2


@dataclass(frozen=True)
class GatedHooks(Hooks):
    """`Hooks` whose `before_read` first waits for the file `gate` (a local path) to exist."""

    gate: str | None = None

    def before_read(self, stem: str) -> None:
        """Wait for the gate, then run the usual hook."""
        while self.gate and not os.path.exists(self.gate):
            time.sleep(POLL_S)
        super().before_read(stem)
