"""The `PipelineError` family: errors the CLI turns into a clean message and an exit code."""

from __future__ import annotations


def count(n: int, noun: str) -> str:
    """"1 problem", "3 problems": `n` with its noun in the right number (regular plurals)."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


class PipelineError(Exception):
    """Base of every error the pipeline reports to a user (exit code 2 unless noted)."""

    exit_code: int = 2


class SpecError(PipelineError):
    """A job file or `--set` override is invalid; `errors` holds every problem, one line each."""

    def __init__(self, errors: list[str], source: str = "job") -> None:
        self.errors = list(errors)
        self.source = source
        super().__init__(f"{source}: {count(len(self.errors), 'problem')}\n"
                         + "\n".join(f"  - {e}" for e in self.errors))


class PreflightError(SpecError):
    """A job refused by the checks made before any work; lists every problem found."""

    def __init__(self, errors: list[str], source: str = "job") -> None:
        super().__init__(errors, source)
        self.args = (f"{source}: {count(len(self.errors), 'problem')} found before any work\n"
                     + "\n".join(f"  - {e}" for e in self.errors),)


class StorageError(PipelineError):
    """A storage location cannot be read or written (permissions, missing bucket, network)."""


class ShardError(PipelineError):
    """One attempt at one input shard failed as a whole; the runner retries it."""

    exit_code = 1


class ResumeConflictError(PipelineError):
    """The output folder holds a job whose output-affecting fingerprint differs from this spec."""


class ModelSettingsError(PipelineError):
    """The job asks for what its model cannot do; found before any work or by an actor on the
    model it loaded, and refuses the whole job."""


class RunStoppedError(StorageError):
    """The output location failed during a run (a `failed/` record or `job.json` not written):
    the run stops, naming the location, the cause and the shards done, failed and not done."""


class OutputBusyError(PipelineError):
    """Another run holds the output's lease: refused before anything is written."""


class ScorerModelError(PipelineError):
    """A scorer model is missing, unloadable or does not fit the other; refuses the job."""
