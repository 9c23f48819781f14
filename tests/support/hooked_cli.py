"""`python -m tests.support.hooked_cli HOOKS_JSON ARGS...`: the `sdedit-batch` command line with
test hooks (`pipeline.worker.hooks.Hooks`, fields as JSON) handed to `run_job` as an object.

Production code never reads hooks from the environment or anywhere else; a test that needs a
driver process with hooks (to SIGKILL it, or to run it against a cluster) starts this instead
of `python -m pipeline.cli`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import sys

from pipeline.cli import main
from pipeline.driver import runner
from pipeline.worker.hooks import Hooks


def hooked_main(argv: list[str]) -> None:
    """Run the CLI with `argv[1:]`, every `run_job` call given the hooks of `argv[0]`."""
    hooks = Hooks(**json.loads(argv[0]))
    runner.run_job = functools.partial(runner.run_job, hooks=hooks)  # type: ignore[assignment]
    main(argv[1:], prog_name="sdedit-batch")


def command(hooks: Hooks, *args: str) -> list[str]:
    """The command line running the CLI with `args` and `hooks`."""
    default = Hooks()
    fields = {f.name: getattr(hooks, f.name) for f in dataclasses.fields(Hooks)
              if getattr(hooks, f.name) != getattr(default, f.name)}
    return [sys.executable, "-m", "tests.support.hooked_cli", json.dumps(fields), *args]


if __name__ == "__main__":
    hooked_main(sys.argv[1:])
