"""Bounded values (issue 23): a prompt over `MAX_PROMPT_CHARS` is a job-file problem, and no
message repeats a long value whole (job file, --set, unknown keys, the engine's checks,
resume conflicts)."""

from __future__ import annotations

import pytest
import yaml

from pipeline.errors import SpecError
from pipeline.job.load import load_spec, parse_spec
from pipeline.job.spec import MAX_PROMPT_CHARS
from pipeline.output.jobrecord import resume_conflict
from sdedit import quoted, settings_problems
from tests.support.shards import job_data

HUGE = "a bedroom, " * 20_000  # 220,000 characters (the case: 10 MiB)


def _problems(data: dict, overrides: tuple[str, ...] = ()) -> list[str]:
    with pytest.raises(SpecError) as caught:
        parse_spec(data, overrides=overrides)
    return caught.value.errors


def test_quoted_keeps_a_prefix_and_says_how_long_the_value_is():
    assert quoted("a room") == "'a room'"
    assert quoted("x" * 81) == f"'{'x' * 80}'... (81 characters)"
    assert len(quoted(list(range(100_000)))) < 200 and len(quoted({"k": HUGE})) < 200


@pytest.mark.parametrize("name", ["prompt", "negative_prompt"])
def test_a_prompt_over_the_limit_is_refused_with_a_short_quote(tmp_path, name):
    data = job_data(tmp_path / "model", "in.tar", tmp_path / "out")
    data["sdedit"][name] = "x" * MAX_PROMPT_CHARS
    assert getattr(parse_spec(data).sdedit, name) == "x" * MAX_PROMPT_CHARS  # at the limit
    data["sdedit"][name] = HUGE
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(SpecError) as caught:
        load_spec(str(path))
    (problem,) = caught.value.errors
    assert problem.startswith(f"sdedit.{name}: 'a bedroom, a bedroom, ")
    assert f"... ({len(HUGE):,} characters) is longer than 10,000 characters; allowed: a " \
        "string of at most 10,000 characters, or null" in problem
    assert len(str(caught.value)) < 400
    assert not (tmp_path / "out").exists()  # refused before anything is written


def test_overrides_unknown_keys_and_bad_values_are_quoted_short(tmp_path):
    data = job_data(tmp_path / "model", "in.tar", tmp_path / "out")
    data["sdedit"]["x" * 5000] = 1
    data["name"] = "n" * 5000 + "!"
    problems = _problems(data, (f"sdedit.prompt={'y' * 50_000}", f"sdedit.{'z' * 5000}=1"))
    assert all(len(p) < 400 for p in problems), [len(p) for p in problems]
    assert any(p.startswith(f"sdedit.{'x' * 80}... (5,000 characters): unknown key")
               for p in problems)
    assert any("(5,001 characters) is not allowed" in p for p in problems)


def test_the_engines_checks_and_resume_conflicts_quote_short(tiny_vp, tmp_path):
    (problem,) = settings_problems(tiny_vp.process, None, source="m", family="pixel",
                                   tokens=4, sampler="ddpm", t0=0.5, steps=None, prompt=HUGE)
    assert len(problem[1]) < 300 and f"({len(HUGE):,} characters)" in problem[1]
    spec = parse_spec(job_data(tmp_path / "model", "in.tar", tmp_path / "out"))
    recorded = spec.output_affecting()  # an older job.json, whose prompt was not bounded
    recorded["sdedit"]["prompt"] = HUGE
    conflict = resume_conflict(spec, {"fingerprint": "old", "output_affecting": recorded})
    assert conflict is not None and len(conflict) < 400
    assert "sdedit.prompt: 'a bedroom, a bedroom, " in conflict and \
        f"({len(HUGE):,} characters) -> None" in conflict
