"""`python -m tests.support.hooked_cli HOOKS_JSON ARGS...`: the `sdedit-batch` command line with
test hooks (`pipeline.worker.hooks.Hooks`, fields as JSON) handed to `run_job` as an object. Hooks
of a subclass (e.g. `tests.support.gated_hooks.GatedHooks`) name it in the JSON's "class"
("module:name"); Ray's workers import it from the driver's working directory, so the command
runs in the repository root.

Production code never reads hooks from the environment or anywhere else; a test that needs a
driver process with hooks (to SIGKILL it, or to run it against a cluster) starts this instead
of `python -m pipeline.cli`.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import json
import sys
from pathlib import Path

from pipeline.cli import main
from pipeline.driver import runner
from pipeline.worker.hooks import Hooks

ROOT = Path(__file__).resolve().parents[2]
"""The repository root: the working directory `command` is to be run in."""


def _hooks_class(name: str | None) -> type[Hooks]:
    """`Hooks`, or the subclass named "module:name"."""
    if name is None:
        return Hooks
    module, _, attribute = name.partition(":")
    cls = getattr(importlib.import_module(module), attribute)
    if not (isinstance(cls, type) and issubclass(cls, Hooks)):
        raise TypeError(f"hooks class {name} is not a subclass of pipeline.worker.hooks.Hooks")
    return cls


def hooked_main(argv: list[str]) -> None:
    """Run the CLI with `argv[1:]`, every `run_job` call given the hooks of `argv[0]`."""
    fields = json.loads(argv[0])
    hooks = _hooks_class(fields.pop("class", None))(**fields)
    runner.run_job = functools.partial(runner.run_job, hooks=hooks)  # type: ignore[assignment]
    main(argv[1:], prog_name="sdedit-batch")


def command(hooks: Hooks, *args: str) -> list[str]:
    """The command line running the CLI with `args` and `hooks` (to be run in ROOT)."""
    cls = type(hooks)
    default = cls()
    fields: dict[str, object] = {f.name: getattr(hooks, f.name) for f in dataclasses.fields(cls)
                                 if getattr(hooks, f.name) != getattr(default, f.name)}
    if cls is not Hooks:
        fields["class"] = f"{cls.__module__}:{cls.__qualname__}"
    return [sys.executable, "-m", "tests.support.hooked_cli", json.dumps(fields), *args]


if __name__ == "__main__":
    hooked_main(sys.argv[1:])
