"""The `sdedit-batch` command line: parses arguments, calls the library, prints results.

The run path's commands live here (validate, run, status, submit); the side tools' commands
(demo-data, prepare, preview, train, bench) in `pipeline/tools/cli.py`. These two modules are
the only ones that import click. Commands are thin: they parse, call one function of
`pipeline/` and print; every `PipelineError` becomes one "error: ..." line and its exit code in
`_Group.invoke`, the one error handler.
"""

from __future__ import annotations

import logging
from typing import Any

import click

from pipeline import __version__
from pipeline.errors import PipelineError, count
from pipeline.tools.cli import TOOL_COMMANDS


class _Group(click.Group):
    """The command group; turns a `PipelineError` of any command into its message and exit code
    (2 = bad job or storage refused, 1 = some shard failed)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except PipelineError as e:
            click.echo(f"error: {e}", err=True)
            ctx.exit(e.exit_code)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="sdedit-batch")
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
def main(verbose: int) -> None:
    """Batch SDEdit: turn rough guide images into realistic images at scale.

    A job is a YAML file (see jobs/). Typical use:

    \b
      sdedit-batch validate jobs/quickstart.yaml
      sdedit-batch run jobs/quickstart.yaml
      sdedit-batch status out/quickstart
    """
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from pipeline.redaction import SecretFilter

    for handler in logging.getLogger().handlers:  # credentials never reach a log line
        handler.addFilter(SecretFilter())
    # huggingface_hub gives its loggers a handler of their own besides passing each record on
    # to ours, so every line of it printed twice (once unformatted, unfiltered): ours only.
    from huggingface_hub.utils import logging as hub_logging

    hub_root = hub_logging.get_logger("huggingface_hub")
    for handler in list(hub_root.handlers):
        hub_root.removeHandler(handler)


set_option = click.option(
    "--set", "overrides", multiple=True, metavar="KEY.PATH=VALUE",
    help="Override a job-file value; VALUE is parsed as YAML. Repeatable, e.g. "
         "--set sdedit.t0=0.4 --set compute.actors.max=4 --set input.shards=[a.tar,b.tar]")


@main.command("validate")
@click.argument("job", metavar="JOB", type=click.Path(dir_okay=False))
@set_option
@click.option("--offline", is_flag=True,
              help="Skip every remote check (object storage, the Hugging Face hub); local "
                   "paths are still checked.")
@click.option("--overwrite", is_flag=True,
              help="Check as `run --overwrite` would: changed settings at the output are a "
                   "note (its results would be discarded), not a problem.")
def validate_cmd(job: str, overrides: tuple[str, ...], offline: bool, overwrite: bool) -> None:
    """Check a job file and what it names: print the resolved spec and the input shards.

    Checks what `run` checks before it starts, without loading any weights: the model source
    exists and looks loadable (a local directory's config files and whole weights files, a
    URL's config object, a hub id in the hub cache or on the hub); the input shards (brace
    ranges are counted, globs are listed; local shards must exist, and the first remote one);
    the output location can be written (a probe object, deleted again) and any job.json there
    has the same output-affecting settings; the settings the model decides (sampler, t0 and
    steps, prompts, guidance); how many shards are done. Exit code 0 when all holds (then
    `run` starts, and the last line says "ok"), 2 with every problem listed (storage errors
    such as missing credentials or buckets included).

    \b
    Example:
      sdedit-batch validate jobs/quickstart.yaml --set sdedit.t0=0.4
      sdedit-batch validate jobs/sketch2bedroom.yaml --offline
    """
    import yaml

    from pipeline.driver.preflight import preflight
    from pipeline.errors import PreflightError
    from pipeline.job.load import load_spec

    spec = load_spec(job, overrides)
    report = preflight(spec, offline=offline, overwrite=overwrite)
    click.echo(yaml.safe_dump(spec.to_dict(), sort_keys=False).rstrip())
    click.echo(f"# fingerprint: {spec.fingerprint()}")
    if report.shards is None:
        click.echo("# input shards: not listed")
    else:
        done = "?" if report.done is None else report.done
        pending = "?" if report.done is None else len(report.shards) - report.done
        click.echo(f"# input shards: {len(report.shards)} ({done} done, {pending} pending)")
    for note in report.notes:
        click.echo(f"# {note}")
    if report.problems:
        raise PreflightError(report.problems, source=job)
    click.echo(f"# ok: no problems found in {job}"
               + (" (local checks only: --offline)" if offline else ""))


@main.command("run")
@click.argument("job", metavar="JOB", type=click.Path(dir_okay=False))
@click.option("--address", default=None, metavar="ADDR",
              help="Ray cluster to join: auto, HOST:PORT or ray://HOST:10001. "
                   "Default: start a local Ray on this machine.")
@set_option
@click.option("--limit-shards", type=click.IntRange(min=1), default=None, metavar="N",
              help="Process at most N pending shards (a quick trial; run again for the rest).")
@click.option("--overwrite", is_flag=True,
              help="Discard results in output.path written with different settings.")
@click.option("--progress/--no-progress", default=True, show_default=True,
              help="Show a progress bar (shards, samples, images/s, ETA).")
def run_cmd(job: str, address: str | None, overrides: tuple[str, ...],
            limit_shards: int | None, overwrite: bool, progress: bool) -> None:
    """Run a job: SDEdit every input shard, write output shards + Parquet manifests.

    Resumable: running the same command again skips every shard with a commit marker
    (OUT/done/STEM.json) and processes the rest. A changed output-affecting setting (model,
    t0, sampler, ...) is refused unless --overwrite. Exit code 0 when every shard is done,
    1 when some shard failed after its retries (see OUT/failed/), 2 for a bad job or an
    output location that fails during the run (the shards not done are listed).

    \b
    Examples:
      sdedit-batch run jobs/quickstart.yaml
      sdedit-batch run jobs/sketch2bedroom.yaml --address auto --set compute.actors.max=8
    """
    from pipeline.driver.runner import run_job
    from pipeline.job.load import load_spec

    spec = load_spec(job, overrides)
    summary = run_job(spec, address=address, limit_shards=limit_shards, overwrite=overwrite,
                      progress=progress, announce=lambda line: click.echo(f"# {line}"))
    if summary.shards_done == 0 and not summary.failed:
        click.echo(f"nothing to do: all {summary.shards_already_done} of "
                   f"{summary.shards_total} shards are already done (no model work); "
                   f"outputs in {spec.output.path}")
        return
    click.echo(
        f"{spec.name}: shards {summary.shards_done} done now, "
        f"{summary.shards_already_done} done before, {len(summary.failed)} failed "
        f"(of {summary.shards_total}); samples {summary.samples}, outputs "
        f"{summary.outputs_ok} ok / {summary.outputs_error} error; "
        f"{summary.seconds:.1f} s, {summary.images_per_second:.2f} images/s")
    click.echo(f"error rows by kind: {_kinds(summary.errors_by_kind)}")
    click.echo(f"keys in more than one shard: "
               f"{_repeated(summary.keys_in_several_shards, spec.output.path)}")
    for url, error in summary.failed.items():
        click.echo(f"  FAILED {url}: {error}", err=True)
    click.echo(f"outputs: {spec.output.path}")
    left = summary.shards_total - summary.shards_already_done - summary.shards_done \
        - len(summary.failed)
    if limit_shards is not None and left > 0:
        click.echo(f"{count(left, 'shard')} of {summary.shards_total} not processed yet "
                   f"(--limit-shards {limit_shards}): run the same command again for the next "
                   f"{min(left, limit_shards)}, or without --limit-shards for all of them")
    raise SystemExit(summary.exit_code)


def _repeated(count: int | None, output: str) -> str:
    """The repeated-keys figure, or how to get it when it was not counted in passing."""
    if count is not None:
        return str(count)
    return f"not counted (sdedit-batch status {output} --repeated-keys counts them)"


def _kinds(counts: dict[str, int]) -> str:
    """"decode 2, mask 1" (by count, then name), or "none"."""
    ordered = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    return ", ".join(f"{kind} {count}" for kind, count in ordered) or "none"


@main.command("status")
@click.argument("target", metavar="TARGET")
@click.option("--address", default=None, metavar="URL",
              help="Ray Jobs API of the cluster (http://HEAD:8265): TARGET is a submission id.")
@click.option("--errors", "show_errors", is_flag=True,
              help="Also list the error rows of the manifests (key, shard, error_kind, error).")
@click.option("--limit", type=click.IntRange(min=0), default=20, show_default=True,
              metavar="N", help="With --errors: list at most N error rows.")
@click.option("--repeated-keys", is_flag=True,
              help="Count keys that occur in more than one shard at any job size (reads every "
                   "manifest's keys; without it they are counted up to 1,000,000 rows).")
def status_cmd(target: str, address: str | None, show_errors: bool, limit: int,
               repeated_keys: bool) -> None:
    """Show done, pending and failed shards, sample counts and error rows of a job.

    TARGET is the job's output path/URL or its job file: reads only the output (job.json,
    the done/ and failed/ markers and, for error rows and repeated keys, the manifests),
    while a job runs or after. Or a submission id printed by `sdedit-batch submit`
    (raysubmit_...) with --address (default RAY_API_SERVER_ADDRESS): the cluster's view of
    the submission, then the status of its output if reachable. Exit code 0 when no shard
    has failed, 1 when some shard has failed, 2 when TARGET holds no job (no job.json) or
    cannot be read.

    \b
    Examples:
      sdedit-batch status out/quickstart
      sdedit-batch status out/quickstart --errors --limit 50
      sdedit-batch status s3://bucket/out --repeated-keys
    """
    from pipeline.driver.submit import describe, is_submission_id, submission_status
    from pipeline.output.status import error_rows, job_status

    if address is not None or is_submission_id(target):
        sub = submission_status(address, target)
        click.echo("\n".join(describe(sub)))
        if sub.output is None:
            return
        target = sub.output
    st = job_status(target, repeated_keys=True if repeated_keys else None)
    total = "?" if st.shards_total is None else st.shards_total
    pending = "?" if st.pending is None else st.pending
    click.echo(f"job {st.name} at {st.output}")
    click.echo(f"shards: {st.done} done, {pending} pending, {len(st.failed)} failed "
               f"(of {total})")
    click.echo(f"samples: {st.samples}; outputs {st.outputs_ok} ok, {st.outputs_error} error")
    click.echo(f"error rows by kind: {_kinds(st.errors_by_kind)}")
    click.echo(f"keys in more than one shard: {_repeated(st.keys_in_several_shards, st.output)}")
    if st.unreadable:
        click.echo(f"done markers that are not JSON objects: {st.unreadable} (their shards "
                   "count as done; their counts are missing above)")
    for url, error in st.failed.items():
        click.echo(f"  FAILED {url}: {error}")
    if show_errors:
        from pipeline.input.shards import shard_stem

        rows, total = error_rows(st.output, st.storage_options, limit=limit)
        click.echo(f"error rows: {total}" + (f" (first {len(rows)})" if total > len(rows) else ""))
        for row in rows:
            click.echo(f"  {row['output_key']}  {shard_stem(row['input_shard'] or '?')}  "
                       f"{row['error_kind'] or 'unknown'}  {row['error']}")
        if total > len(rows):
            click.echo(f"  ... and {total - len(rows)} more (--limit {total} shows all)")
    raise SystemExit(1 if st.failed else 0)


@main.command("submit")
@click.argument("job", metavar="JOB", type=click.Path(exists=True, dir_okay=False))
@click.option("--address", default=None, metavar="URL",
              help="Ray Jobs API (dashboard) of the cluster, http://HEAD:8265 "
                   "[default: RAY_API_SERVER_ADDRESS].")
@set_option
@click.option("--wait/--no-wait", default=True, show_default=True,
              help="Follow the job's output and exit with its exit code; --no-wait prints the "
                   "submission id and returns.")
def submit_cmd(job: str, address: str | None, overrides: tuple[str, ...], wait: bool) -> None:
    """Run a job on a Ray cluster through the Ray Jobs API (the driver runs on the head).

    The job file (with --set applied) is validated here, uploaded as the submission's
    working_dir and run as `sdedit-batch run job.yaml --address auto`. Paths in it are read
    on the cluster: use URLs (s3://...) or absolute paths that exist there. With token
    authentication set RAY_AUTH_TOKEN to the cluster's token. Ctrl-C stops following, not
    the job. Exit code: the job's (0 done, 1 some shard failed, 2 bad job).

    \b
    Examples:
      sdedit-batch submit jobs/sketch2bedroom.yaml --address http://127.0.0.1:8265
      sdedit-batch submit jobs/sketch2bedroom.yaml --no-wait --set compute.actors.max=8
      sdedit-batch status raysubmit_XXXX --address http://127.0.0.1:8265
    """
    from pipeline.driver.submit import follow, submit

    sid, spec = submit(job, address, overrides)
    if not wait:
        click.echo(sid)
        return
    click.echo(f"submitted {spec.name} as {sid}", err=True)
    try:
        final = follow(address, sid, lambda text: click.echo(text, nl=False))
    except KeyboardInterrupt:
        click.echo(f"\nstopped following; {sid} keeps running: "
                   f"sdedit-batch status {sid} --address ...", err=True)
        raise SystemExit(130) from None
    click.echo(f"submission {sid}: {final.status} (exit code {final.exit_code})", err=True)
    raise SystemExit(final.exit_code)


for _command in TOOL_COMMANDS:
    main.add_command(_command)

if __name__ == "__main__":  # pragma: no cover
    main()
