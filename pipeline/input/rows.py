"""Per-row settings of input samples: t0, prompt and negative prompt, checked before batching.

A sample's `{key}.json` may set them (`{key}.txt` is the prompt otherwise) over the job's values.
A bad row is a "setting" error row before batching, so it never fails a batch. See docs/jobs.md,
"per-row settings"."""

from __future__ import annotations

import difflib
import json
import math
import re
import reprlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from pipeline.job.spec import MAX_PROMPT_CHARS
from sdedit import quoted

__all__ = ["SETTINGS", "RowSettings", "SettingError", "near_setting", "row_settings"]

SETTINGS = ("t0", "prompt", "negative_prompt")
"""The keys of `{key}.json` that are settings; pixel models read only t0."""
_ALIASES = {"strength": "t0", "to": "t0", "negprompt": "negative_prompt",
            "negative": "negative_prompt"}
"""Other names of settings, spelt as `_normal` leaves them (diffusers calls t0 strength)."""
_CUTOFF = 0.88
"""difflib ratio from which a key is a misspelt setting (`promt`, `prompt_2`; not `prompt_id`)."""
_SHOW = reprlib.Repr()
_SHOW.maxstring, _SHOW.maxlong, _SHOW.maxother = 60, 24, 60


class SettingError(ValueError):
    """An unusable per-row setting; the message names member, value and what is allowed."""


@dataclass(frozen=True)
class RowSettings:
    """The settings one input sample's outputs are made with (prompts None for pixel models);
    `*_truncated` say what the text encoders did not take, None when whole or not yet known."""

    t0: float
    prompt: str | None = None
    negative_prompt: str | None = None
    prompt_truncated: str | None = None
    negative_prompt_truncated: str | None = None


def row_settings(key: str, members: Mapping[str, bytes], *, t0: float, prompt: str | None,
                 negative_prompt: str | None, conditional: bool,
                 check_t0: Callable[[float], str | None],
                 negative_prompts: bool = True, notes: list[str] | None = None) -> RowSettings:
    """The settings of sample `key` from its carried members over the job's values.

    `check_t0` says why a t0 in (0, 1] cannot be used with the job's sampler and steps, or None;
    `negative_prompts` False refuses a row's non-empty negative prompt; `notes` gets the row's
    warnings. SettingError for an unreadable json or txt, a misspelt setting or a bad value."""
    given = _json_settings(key, members, SETTINGS if conditional else ("t0",))
    if "t0" in given:
        t0 = _check_t0(key, given["t0"], check_t0)
    if not conditional:
        if notes is not None:
            notes += [f"{name} in json not used: the model takes no prompts"
                      for name in ("prompt", "negative_prompt") if given.get(name)]
        return RowSettings(t0)
    if "prompt" in given:
        prompt = _text(key, "prompt", given["prompt"])
    elif "txt" in members:
        if len(members["txt"]) > 4 * MAX_PROMPT_CHARS:  # UTF-8: at most 4 bytes a character
            raise SettingError(f"{key}.txt holds {len(members['txt']):,} bytes; allowed: a "
                               f"prompt of at most {MAX_PROMPT_CHARS:,} characters")
        try:
            prompt = _text(key, "prompt", members["txt"].decode("utf-8").strip(), f"{key}.txt")
        except UnicodeDecodeError as exc:
            raise SettingError(f"{key}.txt is not UTF-8 text ({exc}); allowed: a UTF-8 "
                               "prompt") from exc
    if "negative_prompt" in given:
        negative_prompt = _text(key, "negative_prompt", given["negative_prompt"])
        if negative_prompt and not negative_prompts:
            raise SettingError(f"negative_prompt in {key}.json is {quoted(negative_prompt)}; "
                               "the model has no classifier-free guidance; allowed: \"\" or "
                               "none")
    return RowSettings(t0, prompt or "", negative_prompt or "")


def near_setting(name: str, settings: tuple[str, ...] = SETTINGS) -> str | None:
    """The setting among `settings` that json key `name` looks like a misspelling of, or None
    (case, spaces, `-` and `_` ignored)."""
    if name in SETTINGS:
        return None
    normal = _normal(name)
    for setting in settings:
        if normal == _normal(setting):
            return setting
    if _ALIASES.get(normal) in settings:
        return _ALIASES[normal]
    close = difflib.get_close_matches(normal, [_normal(s) for s in settings], n=1,
                                      cutoff=_CUTOFF)
    return next((s for s in settings if close and _normal(s) == close[0]), None)


def _normal(name: str) -> str:
    return re.sub(r"[\s_\-]", "", name.lower())


def _json_settings(key: str, members: Mapping[str, bytes], read: tuple[str, ...]
                   ) -> dict[str, Any]:
    """The setting keys of `{key}.json` ({} without one); near-misses of `read` are refused."""
    if "json" not in members:
        return {}
    allowed = (f"allowed: a JSON object; its keys {', '.join(SETTINGS)} are settings, other "
               "keys carried metadata")
    repeated: list[str] = []

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        names = [name for name, _ in items]
        repeated[:] = sorted({n for n in names if n in SETTINGS and names.count(n) > 1})
        return dict(items)

    try:
        data = json.loads(members["json"], object_pairs_hook=pairs)
    except Exception as exc:  # any exception: untrusted bytes (RecursionError, huge numbers)
        detail = str(exc) if len(str(exc)) <= 120 else str(exc)[:117] + "..."
        raise SettingError(f"{key}.json cannot be read as JSON ({type(exc).__name__}: "
                           f"{detail}); {allowed}") from exc
    if not isinstance(data, dict):
        raise SettingError(f"{key}.json is a JSON {_json_type(data)}; {allowed}")
    if repeated:  # the hook ran last for the outermost object
        raise SettingError(f"{key}.json sets {', '.join(repeated)} more than once; allowed: "
                           "each setting once")
    for name in data:
        near = near_setting(name, read)
        if near is not None:
            raise SettingError(
                f"{_SHOW.repr(name)[1:-1]} in {key}.json is not a setting; did you mean "
                f"{near}? (allowed settings: {', '.join(read)}; other keys are carried "
                "metadata, but this one looks like a misspelt setting)")
    return {name: data[name] for name in SETTINGS if name in data}


def _json_type(value: Any) -> str:
    return {list: "list", str: "string", bool: "boolean", int: "number", float: "number",
            type(None): "null"}.get(type(value), type(value).__name__)


def _check_t0(key: str, value: Any, check: Callable[[float], str | None]) -> float:
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not number or (isinstance(value, float) and not math.isfinite(value)) or \
            not 0 < value <= 1:  # compared as int or float: a huge int never overflows
        raise SettingError(f"t0 in {key}.json is {_SHOW.repr(value)}; allowed: a number in "
                           "(0, 1]")
    problem = check(float(value))
    if problem:
        raise SettingError(f"t0 in {key}.json is {value!r}: {problem}")  # a number
    return float(value)


def _text(key: str, name: str, value: Any, where: str | None = None) -> str:
    """A prompt setting `name` of sample `key` (in `where`, default "{name} in {key}.json")."""
    where = where or f"{name} in {key}.json"
    if not isinstance(value, str):
        raise SettingError(f"{where} is {_SHOW.repr(value)} ({type(value).__name__}); "
                           "allowed: a string")
    if len(value) > MAX_PROMPT_CHARS:
        raise SettingError(f"{where} is {quoted(value)}: longer than {MAX_PROMPT_CHARS:,} "
                           f"characters; allowed: a prompt of at most {MAX_PROMPT_CHARS:,} "
                           "characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise SettingError(f"{where} is not valid Unicode ({exc.reason} at character "
                           f"{exc.start}); allowed: a string of valid Unicode") from exc
    return value
