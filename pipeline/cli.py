"""The `sdedit-batch` command line: the run path's commands (validate, run, score, status, submit).

The side tools' commands are in `pipeline/tools/cli.py`, eval and filter in
`pipeline/curate/cli.py`; these three modules alone import click. Each command parses, calls one
function of `pipeline/` and prints; `_Group.invoke`, the one error handler, turns a
`PipelineError` into one "error: ..." line and its exit code. See docs/jobs.md."""

from __future__ import annotations

import json
import logging
from typing import Any

import click

from pipeline import __version__
from pipeline.curate.cli import CURATE_COMMANDS
from pipeline.errors import PipelineError, count
from pipeline.tools.cli import TOOL_COMMANDS


class _Group(click.Group):
    """The command group: a `PipelineError` of any command becomes its message and exit code (2 =
    bad job or storage refused, 1 = some shard failed)."""

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

    Checks, without loading any weights, what `run` checks before it starts: the model source
    looks loadable (a local directory's configs and whole weights files, a URL's config object, a
    hub id in the hub cache or on the hub); the input shards (brace ranges counted, globs listed;
    local shards must exist, and the first remote one); the output can be written (a probe
    object, deleted again) and any job.json there has the same output-affecting settings; the
    settings the model decides (sampler, t0 and steps, prompts, guidance); how many shards are
    done. Exit code 0 when all holds (then `run` starts; the last line says "ok"), 2 with every
    problem listed, storage errors such as missing credentials or buckets included.

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

    Resumable: the same command again skips every shard whose commit marker (OUT/done/STEM.json)
    vouches for whole files and processes the rest (a damaged commit is said and made again). A
    changed output-affecting setting (model, t0, sampler, ...) is refused unless --overwrite. One
    run per output: a run holds OUT/lease.json, and a second run there is refused (exit 2),
    naming the first. Exit code 0 when every shard is done, 1 when some shard failed after its
    retries (see OUT/failed/), 2 for a bad job or an output location that fails during the run
    (the shards not done are listed).

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
    click.echo(f"warnings: {summary.warnings_text()}")
    if summary.damaged:
        click.echo(f"damaged shards made again: {len(summary.damaged)} "
                   f"({', '.join(_stem(url) for url in list(summary.damaged)[:5])}"
                   f"{' ...' if len(summary.damaged) > 5 else ''})")
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


def _stem(url: str) -> str:
    from pipeline.input.shards import shard_stem

    return shard_stem(url)


def _repeated(count: int | None, output: str) -> str:
    """The repeated-keys figure, or how to get it when it was not counted in passing."""
    if count is not None:
        return str(count)
    return f"not counted (sdedit-batch status {output} --repeated-keys counts them)"


def _kinds(counts: dict[str, int]) -> str:
    """"decode 2, mask 1" (by count, then name), or "none"."""
    ordered = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    return ", ".join(f"{kind} {count}" for kind, count in ordered) or "none"


@main.command("score")
@click.argument("output", metavar="OUT")
@click.option("--job", "job", default=None, metavar="JOB", type=click.Path(dir_okay=False),
              help="A job file whose score: (and compute:) sections to use.")
@set_option
@click.option("--metrics", default=None, metavar="LIST",
              help="Scorers, comma-separated: ssim, clip_score, aesthetic, embedding.")
@click.option("--clip-model", default=None, metavar="SRC", help="score.clip_model.")
@click.option("--aesthetic-model", default=None, metavar="SRC", help="score.aesthetic_model.")
@click.option("--prompt", default=None, metavar="TEXT",
              help="score.prompt: the text of clip_score for rows without a prompt.")
@click.option("--address", default=None, metavar="ADDR", help="Ray cluster to join (as run).")
@click.option("--limit-shards", type=click.IntRange(min=1), default=None, metavar="N",
              help="Score at most N shards (run again for the rest).")
@click.option("--overwrite", is_flag=True,
              help="Discard scores made with other settings and score every shard again.")
@click.option("--progress/--no-progress", default=True, show_default=True)
def score_cmd(output: str, job: str | None, overrides: tuple[str, ...], metrics: str | None,
              clip_model: str | None, aesthetic_model: str | None, prompt: str | None,
              address: str | None, limit_shards: int | None, overwrite: bool,
              progress: bool) -> None:
    """Score the outputs of OUT after the fact: write OUT/scores/STEM.parquet per shard.

    The same scores as a run with that score: section (from the outputs as written), on Ray
    actors, shard by shard; resumable like run (shards with a sidecar are skipped). Settings: a
    job file's score: section (--job), the options, or --set score.KEY=VALUE. Settings other than
    those OUT's scores were made with are refused unless --overwrite.

    \b
    Examples:
      sdedit-batch score out/quickstart --metrics ssim,clip_score,embedding \\
          --clip-model openai/clip-vit-large-patch14 --prompt "a photo of a room"
      sdedit-batch score out/sd15 --job jobs/score.yaml --overwrite
    """
    from pipeline.driver.scoring import score_output, score_spec

    given = list(overrides)
    if metrics is not None:
        given.append(f"score.metrics=[{metrics}]")
    for key, value in (("clip_model", clip_model), ("aesthetic_model", aesthetic_model),
                       ("prompt", prompt)):
        if value is not None:
            given.append(f"score.{key}={json.dumps(value)}")
    spec = score_spec(output, job, given)
    summary = score_output(spec, address=address, limit_shards=limit_shards,
                           overwrite=overwrite, progress=progress)
    left = summary.shards_committed - summary.shards_scored_before - summary.shards_scored \
        - len(summary.failed)
    click.echo(f"scored {summary.shards_scored} shard(s) now ({summary.scored} of "
               f"{summary.rows} rows ok), {summary.shards_scored_before} before, "
               f"{len(summary.failed)} failed, {left} not yet (of {summary.shards_committed} "
               f"committed); {summary.seconds:.1f} s; sidecars in {output}/scores")
    for stem, error in summary.failed.items():
        click.echo(f"  FAILED {stem}: {error}", err=True)
    raise SystemExit(summary.exit_code)


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
@click.option("--verify", is_flag=True,
              help="Read every committed tar and manifest through and check them against the "
                   "digests their commit markers record (without it: their sizes, by listing).")
def status_cmd(target: str, address: str | None, show_errors: bool, limit: int,
               repeated_keys: bool, verify: bool) -> None:
    """Show done, pending and failed shards, sample counts and error rows of a job.

    TARGET is the job's output path / URL or its job file: only the output is read (job.json, its
    lease, the markers, one listing each of shards/ and manifests/; the manifests and tars for
    error rows, repeated keys and --verify), while a job runs or after. Or a submission id
    printed by `sdedit-batch submit` (raysubmit_...) with --address (default
    RAY_API_SERVER_ADDRESS): the cluster's view of the submission, then the status of its output
    if reachable. Exit code 0 when no shard has failed, 1 when some shard has failed, 2 when a
    committed shard is damaged (a file missing, cut short or unreadable: `run` makes it again),
    or TARGET holds no job (no job.json) or cannot be read.

    \b
    Examples:
      sdedit-batch status out/quickstart
      sdedit-batch status out/quickstart --errors --limit 50
      sdedit-batch status s3://bucket/out --repeated-keys --verify
    """
    from pipeline.driver.submit import describe, is_submission_id, submission_status
    from pipeline.output.folder import OutputFolder
    from pipeline.output.status import error_rows, job_status

    if address is not None or is_submission_id(target):
        sub = submission_status(address, target)
        click.echo("\n".join(describe(sub)))
        if sub.output is None:
            return
        target = sub.output
    st = job_status(target, repeated_keys=True if repeated_keys else None, verify=verify)
    total = "?" if st.shards_total is None else st.shards_total
    pending = "?" if st.pending is None else st.pending
    click.echo(f"job {st.name} at {st.output}")
    if st.lease is not None:
        click.echo(f"running: {st.lease.describe()}" if st.lease.stale is None else
                   f"lease: {st.lease.describe()} (the next run takes it over)")
    click.echo(f"shards: {st.done} done, {pending} pending, {len(st.failed)} failed "
               f"(of {total})")
    click.echo(f"samples: {st.samples}; outputs {st.outputs_ok} ok, {st.outputs_error} error")
    click.echo(f"error rows by kind: {_kinds(st.errors_by_kind)}")
    click.echo(f"warnings: {st.warnings_text()}")
    scored = OutputFolder(st.output, st.storage_options).scored_stems()
    if scored:
        rest = "" if len(scored) >= st.done else " (sdedit-batch score OUT scores the rest)"
        click.echo(f"scores: {len(scored)} of {st.done} done shards have a sidecar{rest}")
    click.echo(f"keys in more than one shard: {_repeated(st.keys_in_several_shards, st.output)}")
    if st.unreadable:
        click.echo(f"done markers that are not JSON objects: {st.unreadable} (their shards "
                   "count as done; their counts are missing above)")
    if st.unrecorded:
        click.echo(f"done markers written before file sizes were recorded: {st.unrecorded} "
                   "(their tars and manifests are checked for presence only)")
    if st.damaged:
        click.echo(f"damaged committed shards: {len(st.damaged)} (`run` makes them again)")
        for stem, why in sorted(st.damaged.items()):
            click.echo(f"  DAMAGED {stem}: {why}")
    elif verify:
        click.echo(f"verified: {st.done} committed shards read through, digests as recorded")
    for url, error in st.failed.items():
        click.echo(f"  FAILED {url}: {error}")
    unreadable: dict[str, str] = {}
    if show_errors:
        from pipeline.input.shards import shard_stem

        rows, total, unreadable = error_rows(st.output, st.storage_options, limit=limit)
        click.echo(f"error rows: {total}" + (f" (first {len(rows)})" if total > len(rows) else "")
                   + (f", from the readable manifests ({len(unreadable)} cannot be read)"
                      if unreadable else ""))
        for row in rows:
            click.echo(f"  {row['output_key']}  {shard_stem(row['input_shard'] or '?')}  "
                       f"{row['error_kind'] or 'unknown'}  {row['error']}")
        if total > len(rows):
            click.echo(f"  ... and {total - len(rows)} more (--limit {total} shows all)")
        for name, why in sorted(unreadable.items()):
            click.echo(f"  UNREADABLE {name}: {why}")
    raise SystemExit(2 if st.damaged or unreadable else 1 if st.failed else 0)


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

    The job file (with --set applied) is validated here, uploaded as the submission's working_dir
    and run as `sdedit-batch run job.yaml --address auto`. Paths in it are read on the cluster:
    use URLs (s3://...) or absolute paths that exist there. With token authentication, set
    RAY_AUTH_TOKEN to the cluster's token. Ctrl-C stops following, not the job. Exit code: the
    job's (0 done, 1 some shard failed, 2 bad job).

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


for _command in (*TOOL_COMMANDS, *CURATE_COMMANDS):
    main.add_command(_command)

if __name__ == "__main__":  # pragma: no cover
    main()
