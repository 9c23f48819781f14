"""Per-row settings of input samples: t0, prompt and negative prompt, checked before batching.

An input sample's `{key}.json`, when it is a JSON object, may set `t0`, `prompt` and
`negative_prompt`; a `{key}.txt` is the prompt when the json sets none. Job values
(`sdedit.t0`, `sdedit.prompt`, `sdedit.negative_prompt`) are the defaults. Prompts are read only
for text-conditioned models; for a pixel model json and txt members are simply carried over (a
json `t0` still applies: it is a setting of SDEdit itself). A bad value makes that row an error
row (error_kind "setting"), checked before batching so it never fails a batch.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["RowSettings", "SettingError", "row_settings"]


class SettingError(ValueError):
    """A per-row setting that cannot be used; the message names the member, the value and
    what is allowed."""


@dataclass(frozen=True)
class RowSettings:
    """The settings one input sample's outputs are made with (prompts None for pixel models)."""

    t0: float
    prompt: str | None = None
    negative_prompt: str | None = None


def row_settings(key: str, members: Mapping[str, bytes], *, t0: float, prompt: str | None,
                 negative_prompt: str | None, conditional: bool,
                 check_t0: Callable[[float], str | None],
                 negative_prompts: bool = True) -> RowSettings:
    """The settings of sample `key` from its carried members (extension -> bytes) over the job's.

    Args:
        t0, prompt, negative_prompt: the job's values (prompts: None = "").
        conditional: whether the model takes prompts.
        check_t0: why a t0 in (0, 1] cannot be used with the job's sampler and steps (e.g.
            fewer steps than `sdedit.steps`), or None.
        negative_prompts: whether the model uses negative prompts (Flux does not: a row's
            non-empty negative_prompt is then refused).
    Raises:
        SettingError: an unreadable json or txt member, or a value that is not allowed.
    """
    given = _json_settings(key, members)
    if "t0" in given:
        t0 = _check_t0(key, given["t0"], check_t0)
    if not conditional:
        return RowSettings(t0)
    if "prompt" in given:
        prompt = _text(key, "prompt", given["prompt"])
    elif "txt" in members:
        try:
            prompt = members["txt"].decode("utf-8").strip()
        except UnicodeDecodeError as exc:
            raise SettingError(f"{key}.txt is not UTF-8 text ({exc}); allowed: a UTF-8 "
                               "prompt") from exc
    if "negative_prompt" in given:
        negative_prompt = _text(key, "negative_prompt", given["negative_prompt"])
        if negative_prompt and not negative_prompts:
            raise SettingError(f"negative_prompt in {key}.json is {negative_prompt!r}; the "
                               "model has no classifier-free guidance; allowed: \"\" or none")
    return RowSettings(t0, prompt or "", negative_prompt or "")


def _json_settings(key: str, members: Mapping[str, bytes]) -> dict[str, Any]:
    """The settings keys of `{key}.json` when it is a JSON object ({} for another JSON value)."""
    if "json" not in members:
        return {}
    try:
        data = json.loads(members["json"])
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SettingError(f"{key}.json is not valid JSON ({exc}); allowed: a JSON object that "
                           "may set t0, prompt and negative_prompt") from exc
    if not isinstance(data, dict):
        return {}
    return {name: data[name] for name in ("t0", "prompt", "negative_prompt") if name in data}


def _check_t0(key: str, value: Any, check: Callable[[float], str | None]) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            not math.isfinite(value) or not 0 < value <= 1:
        raise SettingError(f"t0 in {key}.json is {value!r}; allowed: a number in (0, 1]")
    problem = check(float(value))
    if problem:
        raise SettingError(f"t0 in {key}.json is {value!r}: {problem}")
    return float(value)


def _text(key: str, name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise SettingError(f"{name} in {key}.json is {value!r} ({type(value).__name__}); "
                           "allowed: a string")
    return value
