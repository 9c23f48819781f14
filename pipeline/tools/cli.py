"""Click commands of the side tools (demo-data, prepare, preview, train, bench, convert,
t0-sweep), added to the `sdedit-batch` group by `pipeline/cli.py`; each calls one function of
`pipeline/tools/`."""

from __future__ import annotations

import json
from typing import Any

import click

from pipeline.errors import count


@click.command("demo-data")
@click.option("--out", required=True, metavar="URL",
              help="Folder (any fsspec URL: local path, s3://, gs://, ...) for the shards.")
@click.option("--n", "n", required=True, type=click.IntRange(min=1), help="Number of images.")
@click.option("--size", default=64, show_default=True, type=click.IntRange(min=8),
              help="Image width and height in pixels.")
@click.option("--shard-size", default=256, show_default=True, type=click.IntRange(min=1),
              help="Images per shard.")
@click.option("--seed", default=0, show_default=True, type=int,
              help="Random seed; the same seed gives byte-identical shards.")
@click.option("--strokes", is_flag=True,
              help="Write SDEdit inputs: {key}.png = simulated stroke painting of the room, "
                   "{key}.target.png = the room (as in the paper's evaluation).")
def demo_data_cmd(out: str, n: int, size: int, shard_size: int, seed: int,
                  strokes: bool) -> None:
    """Write the built-in procedural "rooms" domain as WebDataset shards.

    Tiny bedroom-like scenes (walls in perspective, a wooden floor, a bed, a window, a lamp)
    with random colours and layout, written as OUT/rooms-000000.tar, ... with members
    `room_0000123.png`. Use them to train a demo model (`sdedit-batch train`) or as guides.

    \b
    Example:
      sdedit-batch demo-data --out data/rooms --n 4096
    """
    from pipeline.tools.demo_data import write_demo_data

    urls = write_demo_data(out, n, size=size, shard_size=shard_size, seed=seed, strokes=strokes)
    click.echo(f"wrote {count(n, 'image')} in {count(len(urls), 'shard')} to {out}")


def _storage_options(text: str | None) -> dict[str, Any] | None:
    """A --storage-options JSON object (fsspec keyword arguments), or None."""
    if text is None:
        return None
    try:
        options = json.loads(text)
    except json.JSONDecodeError as e:
        raise click.BadParameter(f"not valid JSON: {e}", param_hint="--storage-options") from e
    if not isinstance(options, dict):
        raise click.BadParameter("must be a JSON object", param_hint="--storage-options")
    return options


_STORAGE_OPTIONS_HELP = (
    'fsspec options as a JSON object, e.g. \'{"client_kwargs": {"endpoint_url": '
    '"http://127.0.0.1:8333"}}\' for an S3-compatible server.'
)


@click.command("prepare")
@click.argument("sources", nargs=-1, required=True, metavar="SRC...")
@click.option("--out", required=True, metavar="URL",
              help="Folder for the shards (local path or fsspec URL: s3://, gs://, ...); "
                   "shards are named shard-000000.tar, ...")
@click.option("--shard-size", default=1000, show_default=True, type=click.IntRange(min=1),
              help="Images per shard.")
@click.option("--size", default=256, show_default=True, type=click.IntRange(min=8),
              help="Side of the square images: centre-crop, then LANCZOS resize.")
@click.option("--strokes", type=click.Choice(["none", "simulate"]), default="none",
              show_default=True,
              help="none: the images are the guides. simulate: the guide is a simulated stroke "
                   "painting (median filter + 6-colour palette, as in the SDEdit paper) and the "
                   "image is kept as {key}.target.png.")
@click.option("--overwrite", is_flag=True, help="Replace shards already in --out.")
@click.option("--workers", default=4, show_default=True, type=click.IntRange(min=1),
              help="Threads reading and decoding images concurrently.")
@click.option("--storage-options", default=None, metavar="JSON", help=_STORAGE_OPTIONS_HELP)
@click.option("--progress/--no-progress", default=True, show_default=True,
              help="Show a progress bar on stderr.")
def prepare_cmd(sources: tuple[str, ...], out: str, shard_size: int, size: int, strokes: str,
                overwrite: bool, workers: int, storage_options: str | None,
                progress: bool) -> None:
    """Turn image folders, globs or URL lists into WebDataset input shards.

    Each SRC is a folder (searched recursively), a glob, one image file, or a .txt file of one
    URL or path per line (relative ones against the list's folder); local or any fsspec URL.
    Images are centre-cropped to a square and resized to --size; each becomes {key}.png, its key
    made from its relative path ('.' and '/' become '_', duplicates get a suffix). Unreadable
    files are skipped and listed. Exit code 1 if no file was readable.

    \b
    Examples:
      sdedit-batch prepare photos/ --out data/guides
      sdedit-batch prepare 's3://bucket/lsun/*.jpg' urls.txt --out s3://bucket/in \\
          --strokes simulate --shard-size 500
    """
    from pipeline.tools.prepare import prepare

    report = prepare(list(sources), out, shard_size=shard_size, size=size,
                     strokes=strokes,  # type: ignore[arg-type]
                     storage_options=_storage_options(storage_options), progress=progress,
                     overwrite=overwrite, workers=workers)
    click.echo(f"wrote {report.n_images} of {count(report.n_files, 'file')} in "
               f"{count(report.n_shards, 'shard')} to {out}")
    if report.skipped:
        click.echo(f"skipped {count(len(report.skipped), 'unreadable file')}:")
        for name, error in report.skipped:
            click.echo(f"  {name}: {error}")
    if report.n_images == 0:
        click.echo("error: no file could be read", err=True)
        raise SystemExit(1)


@click.command("preview")
@click.argument("out", metavar="OUT")
@click.option("--n", "n", default=32, show_default=True, type=click.IntRange(min=1),
              help="Outputs to draw (rows).")
@click.option("-o", "--output", default="preview.png", show_default=True, metavar="PATH",
              help="Where to write the PNG contact sheet (local path or fsspec URL).")
@click.option("--tile", default=None, type=click.IntRange(min=8), metavar="PX",
              help="Tile side in pixels [default: the size of the outputs].")
@click.option("--storage-options", default=None, metavar="JSON", help=_STORAGE_OPTIONS_HELP)
def preview_cmd(out: str, n: int, output: str, tile: int | None,
                storage_options: str | None) -> None:
    """Write a contact sheet of a job's results: guide | output (| target) per row.

    Draws the first N outputs of OUT/shards/*.tar (shards in name order, keys sorted within a
    shard), one row each (each output of an input with samples_per_input > 1), captioned with
    the output's key and t0, and says whether the shards hold more.

    \b
    Example:
      sdedit-batch preview out/quickstart --n 16 -o grid.png
    """
    from pipeline.tools.preview import write_preview

    preview = write_preview(out, output, n, _storage_options(storage_options), tile=tile)
    drawn = (f"the first {count(preview.rows, 'output')}; the shards hold more (--n for more "
             "rows)") if preview.more else f"all {count(preview.rows, 'output')} of the shards"
    click.echo(f"wrote {output} ({preview.sheet.width}x{preview.sheet.height} px): {drawn}")


def _channels(ctx: click.Context, param: click.Parameter, value: str) -> tuple[int, ...]:
    try:
        channels = tuple(int(c) for c in value.split(","))
    except ValueError as e:
        raise click.BadParameter(f"expected comma-separated integers, got {value!r}") from e
    if not channels or min(channels) < 1:
        raise click.BadParameter(f"expected positive integers, got {value!r}")
    return channels


@click.command("train")
@click.argument("data", nargs=-1, required=True, metavar="DATA...")
@click.option("--out", required=True, metavar="MODEL_DIR", type=click.Path(file_okay=False),
              help="Model directory to write (and to resume from if it holds a checkpoint).")
@click.option("--size", default=64, show_default=True, type=click.IntRange(min=8),
              help="Training resolution; images are centre-cropped and resized to it.")
@click.option("--steps", default=10000, show_default=True, type=click.IntRange(min=1),
              help="Total optimisation steps, counting those of earlier (resumed) runs.")
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(min=1))
@click.option("--lr", default=2e-4, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Peak AdamW learning rate (after a linear warm-up).")
@click.option("--warmup-steps", default=200, show_default=True, type=click.IntRange(min=0))
@click.option("--ema-decay", default=0.999, show_default=True,
              type=click.FloatRange(0, 1, max_open=True), help="Decay of the weight EMA.")
@click.option("--channels", default="32,64,64,128", show_default=True, callback=_channels,
              help="UNet block_out_channels, one number per resolution level.")
@click.option("--layers-per-block", default=1, show_default=True, type=click.IntRange(min=1))
@click.option("--attention/--no-attention", default=True, show_default=True,
              help="Self-attention in the UNet's middle block.")
@click.option("--snr-gamma", default=None, type=click.FloatRange(min=0, min_open=True),
              help="Min-SNR loss weighting with this gamma (e.g. 5) [default: off].")
@click.option("--bf16/--fp32", default=False, show_default=True,
              help="Run forward/backward under bfloat16 autocast (weights stay float32).")
@click.option("--checkpoint-every", default=500, show_default=True, type=click.IntRange(min=1),
              help="Steps between checkpoints; each also refreshes the exported model.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--device", default="auto", show_default=True,
              help="auto (CUDA when present, else CPU), cpu, cuda, cuda:1, ...")
@click.option("--threads", default=None, type=click.IntRange(min=1),
              help="Torch CPU threads [default: torch's choice].")
@click.option("--storage-options", default=None, metavar="JSON", help=_STORAGE_OPTIONS_HELP)
@click.option("--progress/--no-progress", default=True, help="Show a progress bar.")
def train_cmd(data: tuple[str, ...], out: str, size: int, steps: int, batch_size: int,
              lr: float, warmup_steps: int, ema_decay: float, channels: tuple[int, ...],
              layers_per_block: int, attention: bool, snr_gamma: float | None, bf16: bool,
              checkpoint_every: int, seed: int, device: str, threads: int | None,
              storage_options: str | None, progress: bool) -> None:
    """Train a small unconditional diffusion model (DDPM) on your own images.

    SDEdit turns rough guides into images of whatever domain its model was trained on: this is
    how you get SDEdit for your own domain. Put a few thousand images of it into WebDataset
    shards (`sdedit-batch prepare`, or `demo-data` for the built-in rooms), train here, and name
    MODEL_DIR as a job's model.

    DATA are shard URLs (local or fsspec), brace patterns (data/rooms-{000000..000015}.tar),
    globs, or folders of *.tar. MODEL_DIR becomes a diffusers model directory (config.json,
    diffusion_pytorch_model.safetensors with the EMA weights, scheduler_config.json) plus
    train_log.csv and checkpoint/. The same command again resumes an interrupted run; raise
    --steps to train further. Uses a GPU when present.

    \b
    Example:
      sdedit-batch demo-data --out data/rooms --n 4096
      sdedit-batch train data/rooms --out models/my-rooms --steps 20000
    """
    from pipeline.tools.train import train

    report = train(list(data), out, size=size, steps=steps, batch_size=batch_size, lr=lr,
                   warmup_steps=warmup_steps, ema_decay=ema_decay, block_out_channels=channels,
                   layers_per_block=layers_per_block, attention=attention, snr_gamma=snr_gamma,
                   bf16=bf16, checkpoint_every=checkpoint_every, seed=seed, device=device,
                   threads=threads, progress=progress,
                   storage_options=_storage_options(storage_options))
    loss = "n/a" if report.final_loss_ema is None else f"{report.final_loss_ema:.4f}"
    click.echo(f"trained {out}: steps {report.start_step} -> {report.steps}, "
               f"{report.parameters:,} parameters, loss (EMA) {loss}, "
               f"{report.seconds / 60:.1f} min in total on {report.device}")


@click.command("bench")
@click.option("--model", "source", default=None, metavar="SOURCE",
              help="A VP model (directory, hub id or URL) instead of random weights.")
@click.option("--arch", type=click.Choice(["ddpm-256", "ddpm-32", "tiny"]), default="ddpm-256",
              show_default=True, help="Architecture for random weights (ddpm-256 = the LSUN "
                                      "bedroom/church models of the paper).")
@click.option("--batch-sizes", default="1,8,32", show_default=True, callback=_channels)
@click.option("--dtypes", default="fp32,bf16", show_default=True,
              help="Comma-separated: fp32, bf16, fp16 (network precision; sampling is fp32).")
@click.option("--sampler", type=click.Choice(["ddpm", "ddim", "dpmpp2m"]), default="ddpm",
              show_default=True)
@click.option("--steps", type=click.IntRange(min=1), default=None,
              help="Network evaluations per edit [default: the sampler's].")
@click.option("--t0", default=0.5, show_default=True, type=click.FloatRange(0, 1, min_open=True))
@click.option("--threads", default=None, callback=lambda c, p, v: v and _channels(c, p, v),
              help="Torch CPU threads; comma-separated to compare [default: the CPU share].")
@click.option("--reference/--no-reference", default=True, show_default=True,
              help="Also time pipeline/tools/reference_loop.py (the official SDEdit loop).")
@click.option("--repeats", default=3, show_default=True, type=click.IntRange(min=1))
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:1, ...")
@click.option("--compile/--no-compile", "compile_", default=False, show_default=True,
              help="torch.compile the network (warm-up compiles it).")
@click.option("--cuda-graphs/--no-cuda-graphs", default=False, show_default=True,
              help="Replay CUDA graphs of the network (CUDA only; ignored elsewhere).")
@click.option("--channels-last/--no-channels-last", default=None,
              help="NHWC network memory format [default: on for CUDA].")
@click.option("--noise-threads", type=click.IntRange(min=0), default=None,
              help="Threads drawing noise ahead [default: up to 8 on CUDA, 0 on CPU].")
@click.option("--json", "json_path", default=None, metavar="PATH", help="Also write JSON here.")
@click.option("--family", type=click.Choice(["flux", "sdxl"]), default=None,
              help="A latent family at real size (random FLUX.1-dev-sized transformer or SDXL "
                   "UNet, 1024 px) instead of a pixel DDPM; --dtypes then names weights "
                   "precisions (bf16, fp16, fp8), diffusers' img2img pipeline runs beside it.")
@click.option("--smoke", is_flag=True, help="With --family: tiny configs on the CPU (a check).")
def bench_cmd(source: str | None, arch: str, batch_sizes: tuple[int, ...], dtypes: str,
              sampler: str, steps: int | None, t0: float, threads: tuple[int, ...] | None,
              reference: bool, repeats: int, device: str, compile_: bool, cuda_graphs: bool,
              channels_last: bool | None, noise_threads: int | None,
              json_path: str | None, family: str | None, smoke: bool) -> None:
    """Measure forwards/s, edits/s, TFLOP/s and MFU of sdedit.edit vs the paper's loop.

    \b
    GPU (the paper's model and chain: 500 DDPM steps from t0 = 0.5):
      sdedit-batch bench --arch ddpm-256 --batch-sizes 8,16,32 --dtypes fp32,bf16 --json out.json
    GPU, the latent families at 1024 px (s/step, edits/hour at t0 0.6, MFU, peak memory):
      sdedit-batch bench --family flux --dtypes bf16,fp8 --batch-sizes 1,4
    CPU (small and short):
      sdedit-batch bench --arch ddpm-32 --t0 0.01 --batch-sizes 1,8 --threads 1,2
    """
    from pipeline.tools.bench import BenchConfig, format_table, run_bench

    if family is not None:
        import torch

        from pipeline.tools.bench_latent import run_latent
        from sdedit import resolve_device

        result = run_latent(family, torch.device("cpu") if smoke else resolve_device(device),
                            smoke, tuple(d.strip() for d in dtypes.split(",") if d.strip()
                                         and d.strip() != "fp32") or ("bf16",),
                            (1,) if smoke else batch_sizes, reference)
        text = json.dumps(result, indent=2)
        click.echo(text)
        if json_path:
            with open(json_path, "w") as f:
                f.write(text)
        return

    config = BenchConfig(
        arch=arch, source=source, batch_sizes=batch_sizes,
        dtypes=tuple(d.strip() for d in dtypes.split(",") if d.strip()), sampler=sampler,
        steps=steps, t0=t0, threads=threads or (), reference=reference, repeats=repeats,
        device=device, compile=compile_, cuda_graphs=cuda_graphs, channels_last=channels_last,
        noise_threads=noise_threads)
    report = run_bench(config, progress=lambda m: click.echo(f"# {m}", err=True))
    click.echo(format_table(report))
    if json_path:
        with open(json_path, "w") as f:
            json.dump(report.to_dict(), f, indent=2)
        click.echo(f"wrote {json_path}")


@click.command("convert")
@click.argument("ckpt", metavar="CKPT", type=click.Path(exists=True, dir_okay=False))
@click.option("--config", "config", required=True, metavar="YAML",
              type=click.Path(exists=True, dir_okay=False),
              help="The YAML config the checkpoint was trained with (the official repository's "
                   "configs/bedroom.yml, church.yml, celeba.yml, ...).")
@click.option("--out", required=True, metavar="MODEL_DIR", type=click.Path(file_okay=False),
              help="The diffusers model directory to write (new or empty).")
@click.option("--overwrite", is_flag=True, help="Replace a MODEL_DIR that is not empty.")
def convert_cmd(ckpt: str, config: str, out: str, overwrite: bool) -> None:
    """Convert an original DDPM / SDEdit checkpoint into a model directory jobs can use.

    CKPT is the state dict of the official code's `models/diffusion.py` Model (SDEdit's
    bedroom.ckpt, church_outdoor.ckpt, celeba_hq.ckpt; DDPM's LSUN and CIFAR-10 models), read
    safely (torch.load with weights_only: no arbitrary unpickling). MODEL_DIR gets config.json (a
    diffusers UNet2DModel), diffusion_pytorch_model.safetensors and scheduler_config.json (the
    config's betas): set it as a job's model.source. The converted network predicts the same
    noise as the original within float32 rounding; unknown, missing or misshapen weights are
    named in the error.

    \b
    Example:
      sdedit-batch convert bedroom.ckpt --config configs/bedroom.yml --out models/bedroom
    """
    from pipeline.errors import PipelineError
    from pipeline.tools.convert import convert_checkpoint

    try:
        path = convert_checkpoint(ckpt, config, out, overwrite=overwrite)
    except ValueError as e:
        raise PipelineError(str(e)) from e
    click.echo(f"wrote {path} (diffusers UNet2DModel + scheduler); use it as model.source")


@click.command("t0-sweep")
@click.argument("shards", nargs=-1, required=True, metavar="SHARDS...")
@click.option("--t0", "t0s", default="0.3,0.45,0.6", show_default=True, metavar="LIST",
              help="The t0 values, comma-separated.")
@click.option("--out", required=True, metavar="DIR", help="Folder (or URL) for the shards.")
def t0_sweep_cmd(shards: tuple[str, ...], t0s: str, out: str) -> None:
    """Inputs of a t0 sweep: each sample of SHARDS once per t0.

    Its t0 becomes a per-row setting ({key}.json) and its key KEY_tNNN (1000 t0). Run a job on
    them, then `sdedit-batch eval` shows realism against faithfulness per t0.

    \b
    Example:
      sdedit-batch t0-sweep jobs/data/quickstart --t0 0.3,0.45,0.6 --out jobs/data/t0-sweep
    """
    from pipeline.tools.sweep import sweep_inputs

    values = [float(x) for x in t0s.split(",") if x.strip()]
    written = sweep_inputs(list(shards), values, out)
    click.echo(f"wrote {count(len(written), 'shard')} to {out}, each sample at t0 "
               + ", ".join(f"{t:g}" for t in values))


TOOL_COMMANDS = (demo_data_cmd, prepare_cmd, preview_cmd, train_cmd, bench_cmd, convert_cmd,
                 t0_sweep_cmd)
"""Added to the `sdedit-batch` group by `pipeline/cli.py`."""
