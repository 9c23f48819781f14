"""pipeline.cli: every command's --help, the one error handler, exit codes."""

from __future__ import annotations

import http.server
import os
import subprocess
import sys
import threading
from typing import ClassVar

import pytest
from click.testing import CliRunner

from pipeline import __version__
from pipeline.cli import main
from tests.support.shards import write_job, write_shards

COMMANDS = ["validate", "run", "status", "submit", "demo-data", "prepare", "preview", "train",
            "bench", "convert"]


def test_the_group_lists_every_command_and_its_version():
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    for name in COMMANDS:
        assert f"  {name} " in result.output
    assert __version__ in CliRunner().invoke(main, ["--version"]).output


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_explains_itself(command):
    """Usage, a description, options and at least one example command line (the assertion
    before held for any output containing "--")."""
    result = CliRunner().invoke(main, [command, "--help"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("Usage: ") and "Options:" in result.output
    _, _, rest = result.output.partition("\n\n")
    assert rest.split("\n", 1)[0].strip(), "no description"
    assert f"  sdedit-batch {command} " in result.output, "no example command line"


def test_pipeline_errors_become_one_line_and_their_exit_code(tmp_path):
    runner = CliRunner()
    missing = runner.invoke(main, ["validate", str(tmp_path / "nope.yaml")])
    assert missing.exit_code == 2
    assert missing.output.startswith("error: ") and "cannot read job file" in missing.output
    assert "Traceback" not in missing.output
    status = runner.invoke(main, ["status", str(tmp_path)])
    assert status.exit_code == 2 and "no job.json" in status.output
    preview = runner.invoke(main, ["preview", str(tmp_path), "-o", str(tmp_path / "p.png")])
    assert preview.exit_code == 2 and "no output shards" in preview.output


def test_a_bad_job_is_refused_by_run_before_any_work(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text("name: x\nmodel: {source: m}\ninput: {shards: a.tar}\n"
                   "output: {path: out}\nsdedit: {t0: 2}\n")
    result = CliRunner().invoke(main, ["run", str(job)])
    assert result.exit_code == 2
    assert "sdedit.t0: 2 is out of range; allowed: a number in (0, 1]" in result.output
    assert not (tmp_path / "out").exists()


def test_status_help_names_its_argument_and_every_exit_code():
    result = CliRunner().invoke(main, ["status", "--help"])
    assert result.exit_code == 0
    assert "Usage: main status [OPTIONS] TARGET\n" in result.output
    text = " ".join(result.output.split())
    assert ("Exit code 0 when no shard has failed, 1 when some shard has failed, 2 when a "
            "committed shard is damaged (a file missing, cut short or unreadable: `run` makes it "
            "again), or TARGET holds no job (no job.json) or cannot be read.") in text


def test_validate_says_so_when_the_job_is_fine(tiny_vp_dir, tmp_path):
    shards = write_shards(tmp_path / "in", n_shards=1, per_shard=1, bad=False)
    job = write_job(tmp_path / "job.yaml", tiny_vp_dir, shards, tmp_path / "out")
    result = CliRunner().invoke(main, ["validate", str(job)])
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[-1] == f"# ok: no problems found in {job}"
    offline = CliRunner().invoke(main, ["validate", str(job), "--offline"])
    assert offline.stdout.splitlines()[-1] == (f"# ok: no problems found in {job} (local checks "
                                               "only: --offline)")


class _Unavailable(http.server.BaseHTTPRequestHandler):
    """A hub that answers every request with 503 (which huggingface_hub's backoff retries)."""

    requests: ClassVar[list[str]] = []

    def do_GET(self):
        type(self).requests.append(self.path)
        self.send_response(503)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


_VALIDATE_THEN_LOG = """
import logging, sys
from pipeline.cli import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
logging.getLogger("huggingface_hub.file_download").warning("one hub line")
"""


def test_a_hub_id_is_asked_once_and_the_suggested_command_exists(tmp_path):
    """validate on a hub id the hub cannot answer: one request (huggingface_hub's listing
    retried 5 times over 23 s, logging each retry twice), the suggestion names `hf download`
    (the pinned huggingface_hub has no huggingface-cli), and a line of huggingface_hub's
    loggers prints once."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Unavailable)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _Unavailable.requests = []
    job = tmp_path / "job.yaml"
    job.write_text(f"name: hub\nmodel: {{source: someone/missing-model}}\n"
                   f"input: {{shards: {tmp_path}/in.tar}}\noutput: {{path: {tmp_path}/out}}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_ENDPOINT=f"http://127.0.0.1:{server.server_address[1]}",
               HF_HOME=str(tmp_path / "hf"))
    try:
        result = subprocess.run([sys.executable, "-c", _VALIDATE_THEN_LOG, "validate", str(job)],
                                capture_output=True, text=True, timeout=120, env=env)
    finally:
        server.shutdown()
        server.server_close()
    assert "error: " in result.stderr and "Traceback" not in result.stderr, result.stderr
    asked = [path for path in _Unavailable.requests if path.startswith("/api/models/")]
    assert asked == ["/api/models/someone/missing-model"], _Unavailable.requests
    assert "Retrying" not in result.stderr
    assert "(cache it with `hf download someone/missing-model` where the hub is reachable)" \
        in result.stderr
    assert "huggingface-cli" not in result.stderr
    assert result.stderr.count("one hub line") == 1, result.stderr
