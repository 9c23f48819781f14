"""Check that a local weights file is whole from its header alone, without loading a tensor, so
that a file cut short by a download or copy is refused before any actor loads it.
"""

from __future__ import annotations

import json
import math
import struct
import zipfile
from pathlib import Path
from typing import Any

from sdedit.sources import ModelSourceError

__all__ = ["SAFETENSORS_DTYPE_BYTES", "check_weights_file"]

SAFETENSORS_MAX_HEADER = 100_000_000
"""The largest header the safetensors library reads (its `MAX_HEADER_SIZE`)."""
SAFETENSORS_DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8, "C64": 8,
}
"""Bytes per element of the safetensors dtypes; other (sub-byte) dtypes get a range check only."""
_LEGACY_TORCH = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"
"""The first bytes of a `torch.save` checkpoint of PyTorch < 1.6 (pickle 2, torch's magic)."""


def check_weights_file(path: Path, source: str) -> None:
    """Check that weights file `path` is complete: a safetensors header whose tensors' byte
    ranges tile the file exactly, or a PyTorch zip whose directory lists a data.pkl (a pre-1.6
    pickle only by its first bytes). Nothing is unpickled; ModelSourceError names what is wrong."""
    if path.suffix == ".safetensors":
        _check_safetensors(path, source)
    else:
        _check_torch(path, source)


def _refuse(source: str, path: Path, problem: str) -> ModelSourceError:
    return ModelSourceError(f"model source {source!r}: weights file {path} {problem}; "
                            "download or copy it again")


def _check_safetensors(path: Path, source: str) -> None:
    size = path.stat().st_size
    with path.open("rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise _refuse(source, path, f"has {size} bytes, fewer than the 8 of a safetensors "
                                        "header length")
        (length,) = struct.unpack("<Q", head)
        if length > SAFETENSORS_MAX_HEADER:
            raise _refuse(source, path, f"is not a safetensors file: its header length is "
                                        f"{length:,} bytes (at most {SAFETENSORS_MAX_HEADER:,})")
        if 8 + length > size:
            raise _refuse(source, path, f"is truncated: {size:,} bytes, but its header alone "
                                        f"takes {8 + length:,}")
        raw = handle.read(length)
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise _refuse(source, path, f"has a header that is not valid JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise _refuse(source, path, "has a header that is not a JSON object")
    tensors = sorted(((name, info) for name, info in header.items() if name != "__metadata__"),
                     key=lambda item: _offsets(item[1], item[0], path, source))
    end = 0
    for name, info in tensors:
        begin, stop = _offsets(info, name, path, source)
        if begin != end:
            raise _refuse(source, path, f"has a gap or overlap at tensor {name!r} (its bytes "
                                        f"start at {begin:,}, the tensor before ends at {end:,})")
        expected = _nbytes(info)
        if expected is not None and stop - begin != expected:
            raise _refuse(source, path, f"has tensor {name!r} of {stop - begin:,} bytes; its "
                                        f"shape and dtype need {expected:,}")
        end = stop
    data = size - 8 - length
    if end != data:
        state = "is truncated" if end > data else "has extra bytes"
        raise _refuse(source, path, f"{state}: its header describes {end:,} bytes of tensors "
                                    f"after the header, the file holds {data:,}")


def _offsets(info: Any, name: str, path: Path, source: str) -> tuple[int, int]:
    """The (begin, end) data offsets of one tensor entry of a safetensors header."""
    offsets = info.get("data_offsets") if isinstance(info, dict) else None
    if not (isinstance(offsets, list) and len(offsets) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in offsets)
            and offsets[0] <= offsets[1]):
        raise _refuse(source, path, f"has a header entry {name!r} without valid data_offsets "
                                    f"(found {offsets!r})")
    return offsets[0], offsets[1]


def _nbytes(info: dict[str, Any]) -> int | None:
    """Bytes a tensor's shape and dtype take, or None for a dtype of unknown size."""
    width = SAFETENSORS_DTYPE_BYTES.get(str(info.get("dtype")))
    shape = info.get("shape")
    if width is None or not isinstance(shape, list) or \
            not all(isinstance(n, int) and n >= 0 for n in shape):
        return None
    return math.prod(shape) * width


def _check_torch(path: Path, source: str) -> None:
    with path.open("rb") as handle:
        head = handle.read(len(_LEGACY_TORCH))
    if head.startswith(b"PK"):
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except (zipfile.BadZipFile, OSError, ValueError) as exc:
            raise _refuse(source, path, f"is a zip archive whose directory cannot be read, "
                                        f"likely truncated ({exc})") from exc
        if not any(name == "data.pkl" or name.endswith("/data.pkl") for name in names):
            raise _refuse(source, path, "is a zip archive without data.pkl: not a PyTorch "
                                        "checkpoint")
        return
    if head == _LEGACY_TORCH:
        return
    raise _refuse(source, path, "is neither a safetensors file nor a PyTorch checkpoint (a "
                                "zip archive, or the pickle of PyTorch < 1.6)")
