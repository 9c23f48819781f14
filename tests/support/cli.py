"""Running the `sdedit-batch` command line as a real process in tests."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterable, Mapping

from tests.support.rayhead import kill_session


def run_cli_in_session(args: list[str], env: Mapping[str, str], timeout: float,
                       also: Iterable[int] = ()) -> subprocess.CompletedProcess[str]:
    """`python -m pipeline.cli ARGS` in its own session; every process of that session (and
    the pids in `also`) is ended afterwards, even on timeout."""
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", *args], env=dict(env),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    finally:
        kill_session(proc.pid, grace=0.5, also=also, leader=proc)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
