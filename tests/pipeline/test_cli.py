"""pipeline.cli: every command's --help, the one error handler, exit codes."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from pipeline import __version__
from pipeline.cli import main

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
