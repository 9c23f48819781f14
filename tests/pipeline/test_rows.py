"""pipeline.rows: per-row t0, prompt and negative prompt from {key}.json / {key}.txt."""

from __future__ import annotations

import json

import pytest

from pipeline.rows import RowSettings, SettingError, row_settings

JOB = dict(t0=0.5, prompt="a room", negative_prompt=None)


def _read(members, conditional=True, check=lambda t0: None):
    return row_settings("k", members, conditional=conditional, check_t0=check, **JOB)


def test_job_values_are_the_defaults():
    assert _read({}) == RowSettings(0.5, "a room", "")
    assert _read({}, conditional=False) == RowSettings(0.5)


def test_json_sets_t0_and_prompts_and_txt_is_the_prompt_when_json_has_none():
    row = {"json": json.dumps({"t0": 0.3, "prompt": "a bed", "negative_prompt": "blurry",
                               "label": 7}).encode(), "txt": b"ignored caption\n"}
    assert _read(row) == RowSettings(0.3, "a bed", "blurry")
    assert _read({"txt": b"  a lamp\n", "json": b'{"t0": 1}'}) == RowSettings(1.0, "a lamp", "")
    assert _read({"json": b"[1, 2]", "txt": b"a sky"}) == RowSettings(0.5, "a sky", "")


def test_pixel_models_read_t0_only():
    row = {"json": json.dumps({"t0": 0.2, "prompt": 5}).encode(), "txt": b"\xff\xfe"}
    assert _read(row, conditional=False) == RowSettings(0.2)


@pytest.mark.parametrize(("members", "message"), [
    ({"json": b'{"t0": 0}'}, "t0 in k.json is 0; allowed: a number in (0, 1]"),
    ({"json": b'{"t0": 1.5}'}, "t0 in k.json is 1.5; allowed: a number in (0, 1]"),
    ({"json": b'{"t0": true}'}, "t0 in k.json is True; allowed: a number in (0, 1]"),
    ({"json": b'{"t0": "0.3"}'}, "t0 in k.json is '0.3'; allowed: a number in (0, 1]"),
    ({"json": b'{"prompt": ["a", "b"]}'}, "prompt in k.json is ['a', 'b'] (list); allowed: a "
                                          "string"),
    ({"json": b'{"negative_prompt": 3}'}, "negative_prompt in k.json is 3 (int); allowed"),
    ({"json": b"{not json"}, "k.json is not valid JSON"),
    ({"txt": b"\xff\xfe"}, "k.txt is not UTF-8 text"),
])
def test_bad_values_are_setting_errors_naming_the_member(members, message):
    with pytest.raises(SettingError) as info:
        _read(members)
    assert message in str(info.value)


def test_a_t0_the_jobs_steps_do_not_fit_is_refused():
    def check(t0: float) -> str | None:
        return "steps=20 is too many" if t0 < 0.02 else None

    with pytest.raises(SettingError, match=r"t0 in k.json is 0.01: steps=20 is too many"):
        _read({"json": b'{"t0": 0.01}'}, check=check)
    assert _read({"json": b'{"t0": 0.3}'}, check=check).t0 == 0.3
