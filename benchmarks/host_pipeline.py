"""Device-busy fraction of `sdedit-batch run` with an emulated device whose speed is known.

The network is replaced by a stand-in (test hook `stand_in_ms`) whose every call sleeps F ms
per image in the batch, releasing the GIL as waiting on a GPU does, and predicts zeros. The
model still goes through the real path: a UNet2DModel directory saved with save_pretrained,
`load_model`, the Ray actor, the worker's read -> decode -> batch -> edit -> encode -> write ->
commit. The sampler makes one network evaluation per image (ddim, 1 step), so F is the device
time per image and the ideal wall time of N images is N * F.

Busy fraction = device time / wall time in steady state. Actor start-up, model load and warm-up
cancel out in the difference of two runs of different lengths (one local Ray serves every run,
so its own start-up is outside the timings):
    busy = F * (N_long - N_short) / (wall_long - wall_short).
A second estimate from the long run alone: F * (images committed after its first shard) /
(time from its first commit to its last), from the commit markers ("busy, commits").
Inputs: 256 px stroke-like paintings (flat colour regions, as SDEdit guides are), shards of
about 100 images; outputs PNG. With --s3 the inputs and outputs live on the tests' SeaweedFS
S3 server on loopback. With --scores each setting is measured twice: without scores and with
a `score:` section of all four scorers (ssim, clip_score, aesthetic, embedding) on a random
CLIP whose processor works at 224 px as ViT-L/14's does (the host work of the real one: resize,
crop, normalise, in the host pool); the scorers' device work is emulated too (test hook
`score_stand_in_ms`): --score-ms per image slept in the device thread (default 2.4: the fp32
peak-rate time of ViT-L/14's 162 GFLOPs on an H100, benchmarks/clip_flops.py).

    python benchmarks/host_pipeline.py --ms 10,25,50 --host-threads 1,2,4 [--s3]
        [--scores [--score-ms 2.4]] [--json out.json]

`--cpu-cost N`: no run; the CPU seconds (this thread's own, `time.thread_time`: what a core
spends, whatever else the machine runs) of the host work of one image of --size px, over N
images: decode the guide PNG, the float guide and output conversions, the output's 8 bits and
faithfulness, PNG level 1 of the output, the guide copy (the input bytes when they are a plain
RGB PNG, as the writer does), the tar member bytes. Host cores one GPU needs = that / the
device seconds per image / the busy fraction wanted.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from diffusers import DDPMScheduler, UNet2DModel
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.images import encode_image
from pipeline.job.load import parse_spec
from pipeline.output.folder import OutputFolder
from pipeline.output.layout import DONE
from pipeline.storage import join, url_fs
from pipeline.worker.hooks import Hooks


def painting(rng: np.random.Generator, size: int) -> np.ndarray:
    """A stroke-like guide: a few flat colour regions from a 6-colour palette, uint8 RGB."""
    palette = rng.integers(0, 256, (6, 3))
    img = Image.new("RGB", (size, size), tuple(int(c) for c in palette[0]))
    draw = ImageDraw.Draw(img)
    for _ in range(12):
        x0, y0 = rng.integers(0, size, 2)
        w, h = rng.integers(size // 8, size // 2, 2)
        color = tuple(int(c) for c in palette[rng.integers(0, 6)])
        shape = draw.ellipse if rng.random() < 0.3 else draw.rectangle
        shape([int(x0), int(y0), int(x0 + w), int(y0 + h)], fill=color)
    return np.asarray(img)


def write_inputs(root: str, options: dict[str, Any], shards: int, per_shard: int,
                 size: int) -> list[str]:
    """`shards` tars of `per_shard` paintings under `root` (local folder or URL)."""
    rng = np.random.default_rng(0)
    fs, base = url_fs(root, options)
    fs.makedirs(base, exist_ok=True)
    urls = []
    for s in range(shards):
        url = join(root, f"in-{s:06d}.tar")
        with fs.open(f"{base}/in-{s:06d}.tar", "wb") as stream, wds.TarWriter(stream) as tar:
            for i in range(per_shard):
                tar.write({"__key__": f"s{s}_{i:05d}", "png": encode_image(painting(rng, size))})
        urls.append(url)
    return urls


def write_model(path: Path, size: int) -> None:
    """A small UNet2DModel directory at `size` px (its weights are never used: stand-in)."""
    torch.manual_seed(0)
    UNet2DModel(sample_size=size, in_channels=3, out_channels=3, layers_per_block=1,
                block_out_channels=(8, 16), norm_num_groups=4,
                down_block_types=("DownBlock2D",) * 2,
                up_block_types=("UpBlock2D",) * 2).save_pretrained(path)
    DDPMScheduler(beta_start=1e-4, beta_end=0.02).save_config(path)


def write_scorers(path: Path) -> dict[str, Any]:
    """A random CLIP (224 px processor, tiny network) and aesthetic MLP under `path`; the
    `score:` section that uses them."""
    from tests.support.tiny_clip import save_aesthetic, save_clip

    clip = save_clip(path / "clip", image_size=224, patch_size=32)
    aesthetic = save_aesthetic(path / "aesthetic.pth")
    return {"metrics": ["ssim", "clip_score", "aesthetic", "embedding"],
            "clip_model": str(clip), "aesthetic_model": str(aesthetic),
            "prompt": "a photo of a room"}


def one_run(model: Path, shards: list[str], out: str, options: dict[str, Any], ms: float,
            host_threads: int, batch: int, t0: float,
            score: dict[str, Any] | None = None) -> tuple[float, int, dict]:
    """(wall seconds, images, summary stats) of one `run_job` (with `score` as its score:)."""
    from pipeline.driver.runner import run_job  # here: gpu_run.py imports this module without Ray

    compute: dict[str, Any] = {"device": "cpu", "batch_size": batch, "actors": 1}
    if host_threads:
        compute["host_threads"] = host_threads
    spec = parse_spec({
        "name": "host-pipeline", "model": {"source": str(model)},
        "input": {"shards": shards, "storage_options": options},
        "output": {"path": out, "storage_options": options},
        "sdedit": {"t0": t0, "sampler": "ddim", "steps": 1, "seed": 0},
        "compute": compute, **({"score": {k: v for k, v in score.items() if k != "_ms"}}
                               if score else {})})
    start = time.perf_counter()
    summary = run_job(spec, progress=False, hooks=Hooks(
        stand_in_ms=ms, score_stand_in_ms=score.get("_ms") if score else None))
    wall = time.perf_counter() - start
    assert not summary.failed and summary.outputs_error == 0, summary
    return wall, summary.outputs_ok, markers_cpu(out, options)


def markers_cpu(out: str, options: dict[str, Any]) -> dict[str, float]:
    """Sums of the per-shard stage times of the commit markers, and `commit_rate`: images
    committed after the first shard over the time from the first commit to the last."""
    fs, base = url_fs(OutputFolder(out).url(DONE), options)
    markers = sorted((json.loads(fs.cat_file(p)) for p in fs.ls(base, detail=False)),
                     key=lambda m: m["created_at"])
    totals: dict[str, float] = {}
    for marker in markers:
        for key, value in marker.get("timings", {"seconds": marker["seconds"]}).items():
            totals[key] = totals.get(key, 0.0) + float(value)
    if len(markers) > 1:
        first, last = (dt.datetime.fromisoformat(markers[i]["created_at"]) for i in (0, -1))
        images = sum(m["outputs_ok"] for m in markers[1:])
        totals["commit_rate"] = images / (last - first).total_seconds()
    return totals


def measure(args: argparse.Namespace, root: str, options: dict[str, Any], model: Path,
            ms: float, host_threads: int, score: dict[str, Any] | None = None
            ) -> dict[str, Any]:
    short, long = args.shards
    inputs = write_inputs(join(root, f"in-{ms}-{host_threads}"), options, long, args.per_shard,
                          args.size)
    runs = []
    tag = "-scores" if score else ""
    for n in (short, long):
        out = join(root, f"out-{ms}-{host_threads}-{n}{tag}")
        wall, images, stages = one_run(model, inputs[:n], out, options, ms, host_threads,
                                       args.batch, args.t0, score)
        runs.append((wall, images, stages))
    (w1, n1, _), (w2, n2, stages) = runs
    busy = ms / 1000 * (n2 - n1) / (w2 - w1)
    commit_rate = stages.pop("commit_rate")
    per_image = {k: 1000 * v / n2 for k, v in stages.items()}
    return {"ms": ms, "host_threads": host_threads, "scores": bool(score),
            "images": [n1, n2], "wall": [w1, w2],
            "busy": busy, "busy_commits": ms / 1000 * commit_rate,
            "images_per_s": (n2 - n1) / (w2 - w1), "ideal_images_per_s": 1000 / ms,
            "per_image_ms": per_image}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ms", default="10,25,50", help="device ms per image, comma-separated")
    parser.add_argument("--host-threads", default="1,2,4",
                        help="compute.host_threads values (0 = leave unset)")
    parser.add_argument("--shards", default="1,4", help="short,long run lengths in shards")
    parser.add_argument("--per-shard", type=int, default=100)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--t0", type=float, default=0.002,
                        help="the outputs' grain: with the stand-in predicting zeros an output is "
                             "the guide plus noise of sqrt((1 - a)/a), 2 levels at 0.002 (about "
                             "a generated photo's; it sets the PNG encoding cost), 6 at 0.02")
    parser.add_argument("--s3", action="store_true", help="inputs and outputs on SeaweedFS S3")
    parser.add_argument("--scores", action="store_true",
                        help="measure each setting without and with the four scorers")
    parser.add_argument("--score-ms", type=float, default=2.4,
                        help="emulated device ms per image of the scorers (with --scores)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--cpu-cost", type=int, default=0, metavar="N",
                        help="only measure the host CPU seconds per image, over N images")
    args = parser.parse_args()
    if args.cpu_cost:
        torch.set_num_threads(1)
        cost = cpu_cost(args.size, args.cpu_cost)
        print(json.dumps({"size": args.size, "cpu_s_per_image": cost}, indent=1))
        if args.json:
            Path(args.json).write_text(json.dumps({"size": args.size, "cpu_s_per_image": cost},
                                                  indent=1))
        return
    args.shards = [int(x) for x in args.shards.split(",")]
    with tempfile.TemporaryDirectory(prefix="host-pipeline-") as tmp:  # removed at the end
        results = run_matrix(args, Path(tmp))
    print("\n| F (ms) | host threads | scores | busy | busy, commits | images/s | ideal |")
    print("|---:|---:|---|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['ms']:g} | {r['host_threads']} | {'on' if r['scores'] else 'off'} | "
              f"{r['busy']:.2f} | "
              f"{r['busy_commits']:.2f} | {r['images_per_s']:.1f} | "
              f"{r['ideal_images_per_s']:.1f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results},
                                              indent=1))


def cpu_cost(size: int, n: int) -> dict[str, float]:
    """CPU seconds per image of each host stage at `size` px (see the module docstring)."""
    from pipeline.images import decode_guide
    from pipeline.worker.encode import faithfulness_l2

    rng = np.random.default_rng(0)
    guides = [encode_image(painting(rng, size)) for _ in range(n)]
    grain = [torch.randn(3, size, size, generator=torch.Generator().manual_seed(i)) * 2 / 127.5
             for i in range(n)]  # a generated photo's grain (2 levels): it sets PNG's cost
    spent = {"decode": 0.0, "prepare": 0.0, "output": 0.0, "png": 0.0}
    for data, noise in zip(guides, grain, strict=True):
        start = time.thread_time()
        guide = decode_guide(data, "g.png")
        mark = time.thread_time()
        tensor = torch.from_numpy(guide).permute(2, 0, 1).float() / 127.5 - 1
        out = tensor + noise  # stands for the edit's output (made on the device)
        spent["decode"] += mark - start
        start = time.thread_time()
        spent["prepare"] += start - mark
        pixels = ((out + 1) * 127.5).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()
        faithfulness_l2(pixels, guide, None)
        mark = time.thread_time()
        spent["output"] += mark - start
        encode_image(pixels, "png", png_compress_level=1)
        spent["png"] += time.thread_time() - mark
    result = {k: v / n for k, v in spent.items()}
    result["total"] = sum(result.values())
    return result


def run_matrix(args: argparse.Namespace, tmp: Path) -> list[dict[str, Any]]:
    """One `measure` per F x host threads, with inputs, outputs and model under `tmp` (or
    on a SeaweedFS server whose data is there)."""
    model = tmp / "model"
    write_model(model, args.size)
    import ray

    server = None
    root, options = str(tmp), {}
    results = []
    try:
        if args.s3:
            from tests.support.seaweed import SeaweedS3, weed_binary

            server = SeaweedS3(tmp / "seaweed", weed=weed_binary())
            server.start()
            root, options = server.create_bucket("bench"), server.storage_options()
        scores = [None, {**write_scorers(tmp / "scorers"), "_ms": args.score_ms}] \
            if args.scores else [None]
        ray.init(address="local", include_dashboard=False, log_to_driver=False)
        for ms in [float(x) for x in args.ms.split(",")]:
            for threads in [int(x) for x in args.host_threads.split(",")]:
                for score in scores:
                    row = measure(args, root, options, model, ms, threads, score)
                    results.append(row)
                    stages = ", ".join(f"{k} {v:.1f}" for k, v in row["per_image_ms"].items())
                    print(f"F={ms:g} ms host_threads={threads} scores "
                          f"{'on' if score else 'off'}: busy {row['busy']:.3f} "
                          f"(commits {row['busy_commits']:.3f}), {row['images_per_s']:.1f} "
                          f"img/s (ideal {row['ideal_images_per_s']:.1f}); per image ms: "
                          f"{stages}", flush=True)
    finally:
        ray.shutdown()
        if server is not None:
            server.close()
    return results


if __name__ == "__main__":
    main()
