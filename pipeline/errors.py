"""The `PipelineError` family: errors the CLI turns into a clean message and an exit code."""

from __future__ import annotations


def count(n: int, noun: str) -> str:
    """"1 problem", "3 problems": a count with its noun in the right number (regular plurals)."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


class PipelineError(Exception):
    """Base class of every error the pipeline reports to a user (exit code 2 unless noted)."""

    exit_code: int = 2


class SpecError(PipelineError):
    """A job file or `--set` override is invalid. Holds every problem found, not just the first.

    Each entry of `errors` is one line: "key.path: value 'x' is ...; allowed: ...". The message
    counts them as "problems", as `PreflightError` does.
    """

    def __init__(self, errors: list[str], source: str = "job") -> None:
        self.errors = list(errors)
        self.source = source
        super().__init__(f"{source}: {count(len(self.errors), 'problem')}\n"
                         + "\n".join(f"  - {e}" for e in self.errors))


class PreflightError(SpecError):
    """A job refused by the checks made before any work (`pipeline.driver.preflight`): the model
    source, the input shards or the output location. Lists every problem found."""

    def __init__(self, errors: list[str], source: str = "job") -> None:
        super().__init__(errors, source)
        self.args = (f"{source}: {count(len(self.errors), 'problem')} found before any work\n"
                     + "\n".join(f"  - {e}" for e in self.errors),)


class StorageError(PipelineError):
    """A storage location cannot be read or written (permissions, missing bucket, network)."""


class ShardError(PipelineError):
    """One attempt at one input shard failed as a whole (unreadable tar, lost actor, ...).

    The runner retries the shard; after `compute.shard_retries` it is reported failed.
    """

    exit_code = 1


class ResumeConflictError(PipelineError):
    """The output folder holds a job whose output-affecting fingerprint differs from this spec."""


class ModelSettingsError(PipelineError):
    """The job's settings ask for what its model cannot do (a sampler its noise process does not
    run, t0 / steps its schedule cannot start from, prompts or guidance it does not take); found
    by `pipeline.job.modelcheck` before any work, or by an actor on the model it loaded. The whole
    job is refused: no shard could succeed."""


class RunStoppedError(StorageError):
    """The output location failed during a run (a `failed/` record or `job.json` could not be
    written): the run stops instead of grinding through shards it cannot record. The message
    names the location and the cause, and counts the shards done, failed and not done."""


class OutputBusyError(PipelineError):
    """Another run holds the output's lease (`pipeline.output.lease`): this run is refused
    before it writes anything, naming that run and how old its heartbeat is."""


class ScorerModelError(PipelineError):
    """A scorer model (`score.clip_model`, `score.aesthetic_model`) is missing, cannot be
    loaded, or does not fit the other (an aesthetic predictor for another embedding width).
    The whole job is refused: no shard could be scored."""
