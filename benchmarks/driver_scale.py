"""The driver at scale: time and peak memory of `status`, planning and a finished `run`, and
the scheduling time per shard, as the number of shards grows.

Part 1 (`--shards`): fake committed outputs of N shards of `--rows` manifest rows each (job.json,
done/ markers as the worker writes them, with the sizes and digests of their files, Parquet
manifests with every column, 10 KiB stand-in tars; every 100th shard repeats the keys of the one
before it, so the repeated-key count is known), locally and, with
`--s3-shards`, on the tests' SeaweedFS S3 server on loopback. Each measurement runs in a fresh
Python process, which reports its wall time and peak RSS (VmHWM); "imports" is that process
after importing the pipeline (torch, ray, pyarrow) and nothing else:
    status             `job_status(OUT)` (repeated keys counted only up to 1,000,000 rows)
    status --repeated  `job_status(OUT, repeated_keys=True)` (every manifest's keys)
    plan_pending       `expand_shards(brace pattern)` + `OutputFolder.plan` (listings of done/,
                       shards/ and manifests/, the done markers read to compare sizes)
    run (all done)     `run_job(spec)` of the job whose shards are all done
With `--old DIR` (a checkout of older code) `status`, `plan` and `run` also run with DIR's code,
side by side.

Part 2 (`--sched`): `run_job` on a real local Ray with one actor and a zero-cost stand-in
network (test hook `stand_in_ms=0`), over M one-sample shards (16 px, ddim 1 step), local disk;
seconds per shard in steady state = (last commit - first commit) / (M - 1), from the markers.

    python benchmarks/driver_scale.py --shards 1000,10000,100000 --s3-shards 1000,10000 \\
        --sched 200,2000 [--old /tmp/old-main] [--json out.json]
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from pipeline.job.load import parse_spec  # noqa: E402
from pipeline.output.layout import DONE, JOB_RECORD, MANIFESTS  # noqa: E402
from pipeline.output.manifest import COLUMNS, MANIFEST_SCHEMA, manifest_row  # noqa: E402

EVERY = 100
"""Every EVERY-th shard repeats the keys of the shard before it."""

_CHILD = r"""
import json, os, sys, time
sys.path.insert(0, sys.argv[1])
what, out, options, extra = sys.argv[2], sys.argv[3], json.loads(sys.argv[4]), sys.argv[5:]
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
import pipeline.driver.runner, pipeline.output.status, pipeline.input.shards
import pipeline.output.folder, pipeline.job.load
start = time.perf_counter()
result = None
if what == "status":
    st = pipeline.output.status.job_status(out, options)
    result = [st.done, st.samples, st.keys_in_several_shards]
elif what == "status-repeated":
    st = pipeline.output.status.job_status(out, options, repeated_keys=True)
    result = [st.done, st.samples, st.keys_in_several_shards]
elif what == "plan":
    shards = pipeline.input.shards.expand_shards([extra[0]], {})
    plan = pipeline.output.folder.OutputFolder(out, options).plan(shards)
    pending, done = (plan.pending, plan.done) if hasattr(plan, "pending") else plan
    result = [len(pending), len(done)]
elif what == "run-done":
    spec = pipeline.job.load.load_spec(extra[0])
    summary = pipeline.driver.runner.run_job(spec, progress=False)
    result = [summary.shards_done, summary.shards_already_done]
print(json.dumps({"seconds": time.perf_counter() - start, "rss": hwm(), "result": result}))
"""


def measure(code: Path, what: str, out: str, options: dict[str, Any],
            *extra: str) -> dict[str, Any]:
    """Run one measurement in a fresh process with the pipeline of `code`."""
    env = {**os.environ, "PYTHONPATH": str(code)}
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(code), what, out,
                           json.dumps(options), *extra], capture_output=True, text=True,
                          env=env, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def imports_rss(code: Path) -> int:
    """Peak RSS of a process that only imports the pipeline."""
    script = ("import sys; sys.path.insert(0, sys.argv[1]); import pipeline.driver.runner, "
              "pipeline.output.status\nfor l in open('/proc/self/status'):\n"
              "    l.startswith('VmHWM:') and print(int(l.split()[1]) * 1024)")
    proc = subprocess.run([sys.executable, "-c", script, str(code)], capture_output=True,
                          text=True, check=True, env={**os.environ, "PYTHONPATH": str(code)})
    return int(proc.stdout.strip())


def template(rows: int) -> pa.Table:
    """A manifest of `rows` ok rows with realistic values; keys are replaced per shard."""
    now = dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc)
    row = manifest_row(**{**dict.fromkeys(COLUMNS), "key": "k", "output_key": "k",
                          "sample_index": 0, "input_shard": "/data/in/p-000000.tar",
                          "output_shard": "/data/out/shards/p-000000.tar", "status": "ok",
                          "seed": 123456789012345678, "t0": 0.5, "sampler": "ddpm",
                          "steps": 500, "repeats": 1, "model": "google/ddpm-ema-bedroom-256",
                          "width": 256, "height": 256, "faithfulness_l2": 31.5,
                          "seconds": 0.25, "worker": "node-1:1234", "created_at": now,
                          "eta": 0.0, "dtype": "fp32", "batch_size": 8,
                          "model_identity": "sha256:" + "0" * 64})
    return pa.Table.from_pylist([row] * rows, schema=MANIFEST_SCHEMA)


def manifest(base: pa.Table, shard: int) -> bytes:
    """Parquet bytes of shard `shard`'s manifest (its own keys, or its predecessor's)."""
    owner = shard - 1 if shard % EVERY == EVERY - 1 else shard
    n = base.num_rows
    table = base.set_column(0, "key", pa.array([f"p{owner:06d}-{i:05d}" for i in range(n)]))
    for name, value in (("input_shard", f"/data/in/p-{shard:06d}.tar"),
                        ("output_shard", f"/data/out/shards/p-{shard:06d}.tar")):
        table = table.set_column(COLUMNS.index(name), name, pa.array([value] * n))
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()


TAR = bytes(10240)
"""The stand-in tar of every shard (its size and digest recorded by its marker)."""


def marker(shard: int, rows: int, manifest_data: bytes) -> bytes:
    """A done marker as the worker writes it."""
    from pipeline.output.writer import files_record

    stem = f"p-{shard:06d}"
    return json.dumps({
        "stem": stem, "input_shard": f"/data/in/{stem}.tar",
        "output_shard": f"/data/out/shards/{stem}.tar",
        "manifest": f"/data/out/manifests/{stem}.parquet", "samples": rows,
        "outputs_ok": rows - 2, "outputs_error": 2, "errors_by_kind": {"decode": 2},
        "seconds": 812.5, "timings": {"decode": 41.2, "device": 790.1, "encode": 60.3,
                                      "commit": 1.9}, "in_flight_max": 96,
        "worker": "node-1:1234", "fingerprint": "0" * 64,
        "created_at": "2024-01-01T00:00:00+00:00",
        "files": files_record(len(TAR), zlib.crc32(TAR), manifest_data)}, indent=1).encode()


def make_outputs(out: str, options: dict[str, Any], spec_data: dict[str, Any], n: int,
                 rows: int) -> float:
    """Write the fake committed outputs of `n` shards; returns the seconds it took."""
    from pipeline.output.jobrecord import job_record
    from pipeline.output.layout import SHARDS
    from pipeline.storage import url_fs

    start = time.perf_counter()
    spec = parse_spec(spec_data, source="driver_scale")
    fs, base_path = url_fs(out, options)
    base = template(rows)
    files = {f"{base_path}/{JOB_RECORD}": json.dumps(job_record(spec), indent=1).encode()}
    local = out.startswith("/")
    if local:
        for sub in (DONE, MANIFESTS, SHARDS):
            os.makedirs(f"{base_path}/{sub}", exist_ok=True)

    def batch(lo: int, hi: int) -> None:
        blobs = {}
        for i in range(lo, hi):
            data = manifest(base, i)
            blobs[f"{base_path}/{MANIFESTS}/p-{i:06d}.parquet"] = data
            blobs[f"{base_path}/{SHARDS}/p-{i:06d}.tar"] = TAR
            blobs[f"{base_path}/{DONE}/p-{i:06d}.json"] = marker(i, rows, data)
        if local:
            for path, data in blobs.items():
                with open(path, "wb") as handle:
                    handle.write(data)
        else:
            fs.pipe(blobs)

    fs.pipe(files)
    step = 500
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda lo: batch(lo, min(n, lo + step)), range(0, n, step)))
    return time.perf_counter() - start


def scale_part(args: argparse.Namespace, tmp: Path, model: Path, where: str, counts: list[int],
               options: dict[str, Any], root: str) -> list[dict[str, Any]]:
    results = []
    for n in counts:
        out = f"{root}/out-{n}"
        pattern = f"/data/in/p-{{000000..{n - 1:06d}}}.tar"
        spec_data = {"name": f"scale-{n}", "model": {"source": str(model)},
                     "input": {"shards": pattern}, "output": {"path": out,
                                                              "storage_options": options},
                     "sdedit": {"t0": 0.5, "sampler": "ddpm"}, "compute": {"device": "cpu"}}
        made = make_outputs(out, options, spec_data, n, args.rows)
        job = tmp / f"job-{where}-{n}.yaml"
        job.write_text(json.dumps(spec_data))
        expected = (n // EVERY) * args.rows
        row: dict[str, Any] = {"where": where, "shards": n, "rows": n * args.rows,
                               "make_s": made, "expected_repeated": expected}
        for what, extra in (("status", ()), ("status-repeated", ()), ("plan", (pattern,)),
                            ("run-done", (str(job),))):
            found = measure(ROOT, what, out, options, *extra)
            row[what] = found
            print(f"{where} {n} shards: {what} {found['seconds']:.1f} s, "
                  f"{found['rss'] / 2**20:.0f} MiB, {found['result']}", flush=True)
        if args.old and n <= args.old_max:
            for what, extra in (("status", ()), ("plan", (pattern,)),
                                ("run-done", (str(job),))):
                found = measure(Path(args.old), what, out, options, *extra)
                row[f"{what}-old"] = found
                print(f"{where} {n} shards: {what} (old code) {found['seconds']:.1f} s, "
                      f"{found['rss'] / 2**20:.0f} MiB, {found['result']}", flush=True)
        results.append(row)
        if not args.keep:
            from pipeline.storage import url_fs

            fs, path = url_fs(out, options)
            if out.startswith("/"):
                shutil.rmtree(path, ignore_errors=True)
            else:
                fs.rm(path, recursive=True)
    return results


def sched_part(args: argparse.Namespace, tmp: Path, model: Path) -> list[dict[str, Any]]:
    """Seconds per shard of a real run over M one-sample shards, zero-cost network."""
    import numpy as np
    import ray
    import webdataset as wds

    from pipeline.driver.runner import run_job
    from pipeline.images import encode_image
    from pipeline.worker.hooks import Hooks

    counts = [int(x) for x in args.sched.split(",")]
    inputs = tmp / "sched-in"
    inputs.mkdir()
    rng = np.random.default_rng(0)
    for i in range(max(counts)):
        with wds.TarWriter(str(inputs / f"q-{i:06d}.tar")) as tar:
            tar.write({"__key__": f"q{i}", "png": encode_image(
                rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))})
    results = []
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    try:
        for m in counts:
            out = tmp / f"sched-out-{m}"
            spec = parse_spec({
                "name": f"sched-{m}", "model": {"source": str(model)},
                "input": {"shards": f"{inputs}/q-{{000000..{m - 1:06d}}}.tar"},
                "output": {"path": str(out)},
                "sdedit": {"t0": 0.5, "sampler": "ddim", "steps": 1},
                "compute": {"device": "cpu", "actors": 1, "batch_size": 1}},
                source="driver_scale")
            start = time.perf_counter()
            summary = run_job(spec, progress=False, hooks=Hooks(stand_in_ms=0))
            wall = time.perf_counter() - start
            assert summary.shards_done == m and not summary.failed, summary
            stamps = sorted(dt.datetime.fromisoformat(json.loads(p.read_text())["created_at"])
                            for p in (out / DONE).iterdir())
            steady = (stamps[-1] - stamps[0]).total_seconds() / (m - 1)
            results.append({"shards": m, "wall_s": wall, "per_shard_s": steady})
            print(f"scheduling {m} shards: wall {wall:.1f} s, {steady * 1000:.1f} ms per shard "
                  "in steady state", flush=True)
            shutil.rmtree(out, ignore_errors=True)
    finally:
        ray.shutdown()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shards", default="1000,10000,100000")
    parser.add_argument("--s3-shards", default="", help="shard counts on the S3 server")
    parser.add_argument("--rows", type=int, default=1000)
    parser.add_argument("--sched", default="200,2000", help="'' to skip part 2")
    parser.add_argument("--old", default=None, help="a checkout of older code to compare")
    parser.add_argument("--old-max", type=int, default=10000,
                        help="shard counts above this skip the old code (it holds every row)")
    parser.add_argument("--keep", action="store_true", help="keep the fake outputs")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    from tests.support.tiny_models import save_vp_model

    tmp = Path(tempfile.mkdtemp(prefix="driver-scale-"))
    report: dict[str, Any] = {"imports_rss": imports_rss(ROOT), "scale": [], "sched": []}
    print(f"imports only: {report['imports_rss'] / 2**20:.0f} MiB", flush=True)
    server = None
    try:
        model = save_vp_model(tmp / "model")
        counts = [int(x) for x in args.shards.split(",") if x]
        report["scale"] += scale_part(args, tmp, model, "local", counts, {}, str(tmp))
        if args.s3_shards:
            from tests.support.seaweed import SeaweedS3, weed_binary

            server = SeaweedS3(tmp / "seaweed", weed=weed_binary())
            server.start()
            bucket = server.create_bucket("scale")
            s3_counts = [int(x) for x in args.s3_shards.split(",")]
            report["scale"] += scale_part(args, tmp, model, "s3", s3_counts,
                                          server.storage_options(), bucket)
        if args.sched:
            report["sched"] = sched_part(args, tmp, model)
    finally:
        if server is not None:
            server.close()
        shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
