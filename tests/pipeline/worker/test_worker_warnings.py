"""Warnings that reach the user (issue 23): a prompt the text encoder cuts is recorded in its
manifest row and output json and counted in the marker, which `run`'s summary and `status` add
up; Python warnings raised in the worker are counted too; a prompt over the limit is a setting
row quoted short."""

from __future__ import annotations

import dataclasses
import json
import tarfile
import warnings

import numpy as np
import pyarrow.parquet as pq
import webdataset as wds
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.driver.runner import RunSummary
from pipeline.job.spec import MAX_PROMPT_CHARS
from pipeline.output.jobrecord import prepare_output
from pipeline.output.status import job_status
from pipeline.worker.hooks import Hooks
from pipeline.worker.shard import ShardWorker
from tests.support.shards import make_spec, png

LONG = "red blue cat dog room bed lamp sky red blue cat"  # 11 words: 13 CLIP tokens of 12
CUT = "prompt cut at 12 tokens by text_encoder"
NEGATIVE_CUT = "negative prompt cut at 12 tokens by text_encoder"


@dataclasses.dataclass(frozen=True)
class WarnOnce(Hooks):
    """Raises one UserWarning after the first batch, as a library in the actor would."""

    batches: list[int] = dataclasses.field(default_factory=list)

    def after_batch(self, stem: str, outputs_done: int) -> None:
        self.batches.append(outputs_done)
        if len(self.batches) == 1:
            warnings.warn("a library's warning", UserWarning, stacklevel=1)


def test_a_cut_prompt_is_recorded_per_row_and_counted_in_the_summary_and_status(
        tiny_sd, tiny_sd_dir, tmp_path):
    guide = png(np.random.default_rng(0).integers(0, 256, (16, 16, 3), np.uint8))
    rows = {"k0": {"prompt": LONG}, "k1": {}, "k2": {"prompt": "x" * (MAX_PROMPT_CHARS + 1)},
            "k3": {"negative_prompt": LONG}, "k4": {"prompt": LONG}}
    url = str(tmp_path / "in.tar")
    with wds.TarWriter(url) as tar:
        for key, settings in rows.items():
            tar.write({"__key__": key, "png": guide, "json": json.dumps(settings).encode()})
    out = tmp_path / "out"
    spec = make_spec(tiny_sd_dir, [url], out, sdedit={"prompt": "lamp"},
                     compute={"batch_size": 2})
    prepare_output(spec, overwrite=False)  # job.json, as `run` writes it
    with warnings.catch_warnings(record=True) as shown:  # counted, and still shown
        warnings.simplefilter("default")
        stats = ShardWorker(spec, model=tiny_sd, hooks=WarnOnce()).process(url)
    assert [str(w.message) for w in shown].count("a library's warning") == 1

    manifest = {r["key"]: r for r in pq.read_table(out / "manifests" / "in.parquet").to_pylist()}
    assert manifest["k0"]["prompt"] == LONG  # the prompt given, and what was taken of it
    assert manifest["k0"]["prompt_truncated"] == "text_encoder kept 12 of 13 tokens"
    assert manifest["k3"]["negative_prompt_truncated"] == "text_encoder kept 12 of 13 tokens"
    assert manifest["k1"]["prompt_truncated"] is manifest["k1"]["negative_prompt_truncated"] \
        is manifest["k0"]["negative_prompt_truncated"] is None
    error = manifest["k2"]["error"]  # over the limit: a setting row that quotes a prefix
    assert manifest["k2"]["error_kind"] == "setting" and len(error) < 300
    assert f"'{'x' * 80}'... (10,001 characters): longer than 10,000 characters" in error
    with tarfile.open(out / "shards" / "in.tar") as tar:
        metadata = json.load(tar.extractfile("k0.json"))  # type: ignore[arg-type]
    assert metadata["prompt_truncated"] == "text_encoder kept 12 of 13 tokens"

    assert stats.row_warnings == {CUT: 2, NEGATIVE_CUT: 1}
    kind = next(k for k in stats.actor_warnings if "a library's warning" in k)
    assert kind.startswith("UserWarning: a library's warning (") and \
        stats.actor_warnings[kind] == 1
    marker = json.loads((out / "done" / "in.json").read_text())
    assert marker["row_warnings"] == stats.row_warnings
    summary = RunSummary()  # what run_job makes of the actors' stats
    summary.add(dataclasses.asdict(stats))
    assert summary.warnings_text().startswith(f"2 rows: {CUT}; 1 row: {NEGATIVE_CUT}; ")
    assert job_status(str(out)).row_warnings == {CUT: 2, NEGATIVE_CUT: 1}
    result = CliRunner().invoke(main, ["status", str(out)])
    assert f"warnings: 2 rows: {CUT}; 1 row: {NEGATIVE_CUT}; 1 time: UserWarning" \
        in result.output
