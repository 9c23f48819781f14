"""Pinned outputs kept as arrays (tests/data/pins/GROUP/NAME.npz) and compared within a tolerance.

Why arrays and not digests: float32 results differ in their last bits from one CPU to another
(torch picks its vectorised kernels, oneDNN and MKL their code paths, by the CPU it runs on), so
a sha256 of output bytes pinned on one machine fails on the next. A pin here holds the arrays
themselves; a test states how far a result may move (`assert_close` for floats,
`assert_levels` for 8-bit outputs), a bound well above what other kernels give and well below
what a real change of the computation gives (the pinned tests show both).

To write the pins again (after a legitimate change of outputs, said in its commit):

    SDEDIT_REWRITE_PINS=1 python -m pytest -p no:cacheprovider \
        tests/sdedit/test_pinned_engine.py tests/pipeline/driver/test_pinned_outputs.py

Each pinned test then writes its file and is skipped (nothing was compared).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest

PINS = Path(__file__).resolve().parents[1] / "data" / "pins"
REWRITE_ENV = "SDEDIT_REWRITE_PINS"


def pin_path(group: str, name: str) -> Path:
    """Where pin `name` of `group` is stored."""
    return PINS / group / f"{name}.npz"


def load_pin(group: str, name: str) -> dict[str, np.ndarray]:
    """The arrays of a pin (a missing pin fails the test, naming how to write it)."""
    path = pin_path(group, name)
    if not path.exists():
        pytest.fail(f"no pinned arrays at {path}; write them with {REWRITE_ENV}=1 (tests/support/"
                    "pins.py)")
    with np.load(path) as data:
        return {key: data[key] for key in data.files}


def _rewrite(group: str, name: str, found: Mapping[str, np.ndarray]) -> None:
    """With SDEDIT_REWRITE_PINS set: store `found` as the pin and skip the comparison."""
    if os.environ.get(REWRITE_ENV):
        path = pin_path(group, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(path, **{k: np.ascontiguousarray(v) for k, v in found.items()})
        pytest.skip(f"{REWRITE_ENV} set: wrote {path.relative_to(PINS.parents[2])}")


def _same_keys(pinned: Mapping[str, np.ndarray], found: Mapping[str, np.ndarray]) -> None:
    assert sorted(found) == sorted(pinned), "the outputs are not the pinned ones"
    for key, array in found.items():
        assert array.shape == pinned[key].shape and array.dtype == pinned[key].dtype, \
            (key, array.shape, array.dtype, pinned[key].shape, pinned[key].dtype)


def max_abs_diff(pinned: Mapping[str, np.ndarray], found: Mapping[str, np.ndarray]) -> float:
    """The largest |found - pinned| over all arrays (float64; arrays of equal shapes)."""
    return max(float(np.max(np.abs(found[k].astype(np.float64) - pinned[k].astype(np.float64))))
               for k in pinned)


def assert_close(group: str, name: str, found: Mapping[str, np.ndarray], atol: float) -> None:
    """Every float array of `found` within `atol` (absolute) of the pinned one, element-wise."""
    _rewrite(group, name, found)
    pinned = load_pin(group, name)
    _same_keys(pinned, found)
    worst = max_abs_diff(pinned, found)
    assert worst <= atol, f"{group}/{name}: max |output - pinned| = {worst:.3g} > {atol:g}"


def assert_levels(group: str, name: str, found: Mapping[str, np.ndarray], max_level: int,
                  max_fraction: float) -> None:
    """8-bit outputs: every value within `max_level` levels of the pinned one, and at most
    `max_fraction` of all values differ at all (a float that lands near a rounding boundary
    may round the other way on another CPU; a real change moves many values)."""
    _rewrite(group, name, found)
    pinned = load_pin(group, name)
    _same_keys(pinned, found)
    worst = int(max_abs_diff(pinned, found))
    differing = sum(int(np.count_nonzero(found[k] != pinned[k])) for k in pinned)
    total = sum(pinned[k].size for k in pinned)
    assert worst <= max_level, f"{group}/{name}: a value moved {worst} levels (> {max_level})"
    assert differing <= max_fraction * total, \
        f"{group}/{name}: {differing} of {total} values differ (> {max_fraction:.2%})"


def compare_dirs(a: Path, b: Path) -> list[str]:
    """One line per pin present in both pin folders: its max |b - a| and how many values differ
    (how far other CPU kernels move the outputs; see the module docstring)."""
    lines = []
    for path in sorted(a.glob("*/*.npz")):
        other = b / path.relative_to(a)
        if not other.exists():
            continue
        with np.load(path) as x, np.load(other) as y:
            first = {k: x[k] for k in x.files}
            second = {k: y[k] for k in y.files}
        differing = sum(int(np.count_nonzero(first[k] != second[k])) for k in first)
        total = sum(v.size for v in first.values())
        lines.append(f"{path.relative_to(a)}: max |diff| {max_abs_diff(first, second):.3g}, "
                     f"{differing} of {total} values differ")
    return lines


if __name__ == "__main__":
    import sys

    if len(sys.argv) != 3:
        sys.exit("usage: python -m tests.support.pins PINS_DIR OTHER_PINS_DIR")
    print("\n".join(compare_dirs(Path(sys.argv[1]), Path(sys.argv[2]))))
