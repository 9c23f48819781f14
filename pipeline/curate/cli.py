"""Click commands of the curate wing, eval and filter, added to the `sdedit-batch` group by
`pipeline/cli.py`; each parses its options and calls one function of `pipeline/curate/`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click


def _figure(value: Any, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}g}"


@click.command("eval")
@click.argument("output", metavar="OUT")
@click.option("--reference", multiple=True, metavar="SHARDS",
              help="Shards of real images (patterns as input.shards; repeatable): KID and FID "
                   "of the outputs against them. Without it: faithfulness and diversity only.")
@click.option("--reference-image", default=None, metavar="EXT",
              help="The reference shards' image member (default: the first of png, jpg, "
                   "jpeg, webp).")
@click.option("--features", type=click.Choice(["inception", "clip", "torchscript", "pixels"]),
              default="inception", show_default=True,
              help="KID/FID features: torchmetrics' InceptionV3 (needs torch-fidelity and its "
                   "weights), the CLIP image embeddings of score.clip_model (or --clip-model), "
                   "a network of your own (--feature-net), or 16x16 pixels (no weights; a "
                   "crude stand-in).")
@click.option("--feature-net", default=None, metavar="PATH",
              help="With --features torchscript: a torch.jit.save'd module, float32 (N, 3, H, "
                   "W) in [0, 1] -> (N, D).")
@click.option("--clip-model", default=None, metavar="SRC",
              help="The CLIP model of --features clip (default: the output's score.clip_model).")
@click.option("--inception-weights", default=None, metavar="PATH",
              help="torch-fidelity's InceptionV3 weights file, where they cannot be downloaded.")
@click.option("--kid-subset-size", default=1000, show_default=True,
              type=click.IntRange(min=2), help="Images per KID subset (clamped to the smaller "
                                               "set, as clean-fid does).")
@click.option("--kid-subsets", default=100, show_default=True, type=click.IntRange(min=1),
              help="KID subsets (1 subset of every image: the plain unbiased MMD^2).")
@click.option("--json", "json_path", default="eval.json", show_default=True, metavar="PATH",
              help="Where the figures go (JSON).")
@click.option("--png", "png_path", default="eval.png", show_default=True, metavar="PATH",
              help="Where the trade-off plot goes (one point per t0).")
@click.option("--device", default="auto", show_default=True,
              type=click.Choice(["auto", "cpu", "cuda"]), help="Where the features are made.")
def eval_cmd(output: str, reference: tuple[str, ...], reference_image: str | None,
             features: str, feature_net: str | None, clip_model: str | None,
             inception_weights: str | None, kid_subset_size: int, kid_subsets: int,
             json_path: str, png_path: str, device: str) -> None:
    """The paper's evaluation of OUT: realism (KID, FID), faithfulness, diversity, per t0.

    Realism needs --reference shards of real images of the target domain. Faithfulness is
    the distribution of faithfulness_l2 (manifest) and ssim (scores); diversity the mean
    pairwise cosine distance of the CLIP image embeddings (the embedding score) among the
    outputs of one guide and across the set. Rows with different t0 (a sweep) get one row each
    in the table and one point each in the plot: how to choose t0.

    \b
    Examples:
      sdedit-batch eval out/quickstart --reference 'data/real/rooms-{000000..000003}.tar'
      sdedit-batch eval out/sweep --reference data/real/ --features clip --json sweep.json
    """
    from pipeline.curate.evaluate import evaluate
    from pipeline.curate.plot import tradeoff_png

    result = evaluate(output, reference=reference, reference_image=reference_image,
                      features=features, clip_model=clip_model,
                      kid_subset_size=kid_subset_size, kid_subsets=kid_subsets,
                      inception_weights=inception_weights, feature_net=feature_net,
                      device=device)
    click.echo(f"{output}: {result['images']} outputs")
    if "reference" in result:
        click.echo(f"realism on {features} features ({result['features']['dims']}-d) vs "
                   f"{result['reference']['images']} reference images: KID "
                   f"{_figure(result['kid'])} +- {_figure(result['kid_std'])} "
                   f"({result['kid_subsets']} subsets of {result['kid_subset_size']}), FID "
                   f"{_figure(result['fid'])}" + (f" ({result['fid_note']})"
                                                  if result.get("fid_note") else ""))
    for name in ("faithfulness_l2", "ssim"):
        d = result[name]
        click.echo(f"{name}: " + ("not scored" if d is None else
                                  f"mean {_figure(d['mean'])}, p5 {_figure(d['p5'])}, median "
                                  f"{_figure(d['p50'])}, p95 {_figure(d['p95'])}"))
    div = result["diversity"]
    click.echo(f"diversity: within a guide {_figure(div['within_guide'])} ({div['guides']} "
               f"guides), across {_figure(div['across'])}" +
               (f" ({div['note']})" if div.get("note") else ""))
    click.echo("| t0 | images | L2 | ssim | KID | FID | diversity |")
    click.echo("|---:|---:|---:|---:|---:|---:|---:|")
    for r in result["per_t0"]:
        click.echo(f"| {r['t0']:g} | {r['images']} | {r['faithfulness_l2']:.2f} | "
                   f"{_figure(r['ssim'], 3)} | {_figure(r.get('kid'))} | "
                   f"{_figure(r.get('fid'))} | {_figure(r.get('diversity_across'), 3)} |")
    Path(json_path).write_text(json.dumps(result, indent=1))
    wrote = tradeoff_png(result, png_path)
    click.echo(f"figures: {json_path}" + (f"; plot: {png_path}" if wrote else
                                          " (no plot: neither KID nor embeddings)"))


@click.command("filter")
@click.argument("output", metavar="OUT")
@click.option("--where", default=None, metavar="SQL",
              help="SQL condition over the manifest and score columns (DuckDB), e.g. "
                   "\"aesthetic >= 5.5 AND clip_score >= 25\"; default: every ok row.")
@click.option("--out", "curated", required=True, metavar="CURATED",
              help="Where the curated WebDataset goes (local path or fsspec URL).")
@click.option("--dedup", default=None, type=click.FloatRange(-1, 1), metavar="COSINE",
              help="Dedup threshold: of rows whose CLIP image embeddings have cosine "
                   "similarity >= COSINE, only the best (--best) is kept (e.g. 0.95).")
@click.option("--best", default=None, metavar="COLUMN",
              help="The score that decides which near-duplicate stays (highest wins); default: "
                   "aesthetic, else clip_score, else ssim.")
@click.option("--shard-size", default=1000, show_default=True, type=click.IntRange(min=1),
              help="Rows per curated shard.")
@click.option("--overwrite", is_flag=True,
              help="Discard a curated set at CURATED made with other settings.")
def filter_cmd(output: str, where: str | None, curated: str, dedup: float | None,
               best: str | None, shard_size: int, overwrite: bool) -> None:
    """Write a curated WebDataset of the rows of OUT that pass --where (and --dedup).

    CURATED gets shards of --shard-size outputs with all their members (keys made unique:
    SOURCESTEM_KEY), manifests with lineage (source output, shard and key) and every score,
    and a commit marker per shard. Resumable like run: the selection is recorded first,
    shards with a marker are skipped.

    \b
    Examples:
      sdedit-batch filter out/sd15 --where "aesthetic >= 5.5 AND clip_score >= 25" \\
          --out curated/sd15 --dedup 0.95
      sdedit-batch filter out/quickstart --where "ssim >= 0.3" --out curated/quickstart
    """
    from pipeline.curate.curated import filter_output

    summary = filter_output(output, curated, where=where, dedup=dedup, best=best,
                            shard_size=shard_size, overwrite=overwrite)
    seen = f"{summary.rows_passed} of {summary.rows_seen} rows passed, " \
        if summary.rows_seen else ""
    click.echo(f"{seen}{summary.rows_kept} kept; shards {summary.shards_written} written "
               f"now, {summary.shards_before} before (of {summary.shards_total}); curated set "
               f"in {curated}")


CURATE_COMMANDS = (eval_cmd, filter_cmd)
