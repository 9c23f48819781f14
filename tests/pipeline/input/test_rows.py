"""pipeline.input.rows: per-row t0, prompt and negative prompt from {key}.json / {key}.txt."""

from __future__ import annotations

import json

import pytest

from pipeline.input.rows import RowSettings, SettingError, row_settings

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
    assert _read({"json": b"{}", "txt": b"a sky"}) == RowSettings(0.5, "a sky", "")


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
    ({"json": b"{not json"}, "k.json cannot be read as JSON (JSONDecodeError: "),
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


@pytest.mark.parametrize(("members", "message"), [
    # any exception while reading the json is the row's (these failed the whole shard)
    ({"json": b'{"t0": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"},
     "k.json cannot be read as JSON (RecursionError: "),
    ({"json": b'{"t0": 1' + b"0" * 5000 + b"}"}, "k.json cannot be read as JSON (ValueError: "
                                                  "Exceeds the limit"),
    ({"json": b'{"t0": 1' + b"0" * 400 + b"}"}, "t0 in k.json is 1000000000...00000000000; "
                                                "allowed: a number in (0, 1]"),
    # a json that is not an object, or a misspelt setting (these were ok rows with the job's t0)
    ({"json": b"[0.3]"}, "k.json is a JSON list; allowed: a JSON object; its keys t0, "
                         "prompt, negative_prompt are settings, other keys carried metadata"),
    ({"json": b'"a room"'}, "k.json is a JSON string"),
    ({"json": b"null"}, "k.json is a JSON null"),
    ({"json": b'{"T0": 0.9}'}, "T0 in k.json is not a setting; did you mean t0? (allowed "
                               "settings: t0, prompt, negative_prompt; other keys are carried "
                               "metadata, but this one looks like a misspelt setting)"),
    ({"json": b'{"t_0": 0.9}'}, "did you mean t0?"),
    ({"json": b'{"strength": 0.9}'}, "did you mean t0?"),
    ({"json": b'{"to": 0.9}'}, "did you mean t0?"),
    ({"json": b'{"prompts": ["a"]}'}, "did you mean prompt?"),
    ({"json": b'{"promt": "a room"}'}, "did you mean prompt?"),
    ({"json": b'{"prompt_2": "a room"}'}, "did you mean prompt?"),
    ({"json": b'{"Negative-Prompt": "x"}'}, "did you mean negative_prompt?"),
    ({"json": b'{"t0": 0.3, "t0": 0.9}'}, "k.json sets t0 more than once"),
    ({"json": b'{"prompt": "\\ud800"}'}, "prompt in k.json is not valid Unicode (surrogates "
                                         "not allowed at character 0)"),
])
def test_rows_that_could_not_be_read_or_were_silently_ignored_are_setting_errors(members,
                                                                                message):
    with pytest.raises(SettingError) as info:
        _read(members)
    assert message in str(info.value)


def test_other_json_keys_are_carried_metadata():
    """img2dataset's json and near names that are no misspelling pass; a pixel model reads
    only t0, so a misspelt prompt is no error there (prompts are not read at all)."""
    meta = {"url": "http://x", "caption": "a room", "key": "000", "status": "success",
            "width": 256, "height": 256, "original_width": 512, "sha256": "ab", "seed": 3,
            "steps": 50, "prompt_id": 7, "exif": "{}", "t0": 0.4}
    assert _read({"json": json.dumps(meta).encode()}) == RowSettings(0.4, "a room", "")
    assert _read({"json": b'{"promt": 1}'}, conditional=False) == RowSettings(0.5)
    with pytest.raises(SettingError, match="did you mean t0"):
        _read({"json": b'{"T0": 0.3}'}, conditional=False)


@pytest.mark.parametrize("members, where", [
    ({"json": json.dumps({"prompt": "y" * 10_001}).encode()}, "prompt in k.json"),
    ({"json": json.dumps({"negative_prompt": "y" * 10_001}).encode()},
     "negative_prompt in k.json"),
    ({"txt": b"y" * 10_001}, "k.txt"),
])
def test_a_prompt_over_the_limit_is_a_setting_error_quoted_short(members, where):
    assert _read({"txt": b"y" * 10_000}).prompt == "y" * 10_000  # the limit itself is taken
    with pytest.raises(SettingError) as info:
        _read(members)
    assert str(info.value) == (f"{where} is '{'y' * 80}'... (10,001 characters): longer than "
                               "10,000 characters; allowed: a prompt of at most 10,000 "
                               "characters")
    with pytest.raises(SettingError, match=r"k.txt holds 10,485,760 bytes; allowed: a prompt "
                                           r"of at most 10,000 characters"):
        _read({"txt": b"y" * 2**23 + b"\xff" * 2**21})  # refused unread: 10 MiB, not UTF-8


def test_a_prompt_a_pixel_model_does_not_use_is_a_row_warning():
    notes: list[str] = []
    row = json.dumps({"prompt": "a room", "negative_prompt": "", "t0": 0.3}).encode()
    settings = row_settings("k", {"json": row}, conditional=False, check_t0=lambda t0: None,
                            notes=notes, **JOB)
    assert settings == RowSettings(0.3)
    assert notes == ["prompt in json not used: the model takes no prompts"]
