"""Hand-made input tars for the member contract: any name, type, encoding or compression."""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import tarfile
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Entry:
    """One tar member: `name` (str, or bytes written as they are), `data` for a regular file,
    or another `kind` ("symlink", "hardlink", "dir", "fifo", "chr") with `link`."""

    name: str | bytes
    data: bytes = b""
    kind: str = "file"
    link: str = ""


_KINDS = {"file": tarfile.REGTYPE, "symlink": tarfile.SYMTYPE, "hardlink": tarfile.LNKTYPE,
          "dir": tarfile.DIRTYPE, "fifo": tarfile.FIFOTYPE, "chr": tarfile.CHRTYPE}


def tar_bytes(entries: list[Entry]) -> bytes:
    """A GNU-format tar of `entries` (bytes names written unchanged, as latin-1 maps them)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT,
                      encoding="utf-8", errors="surrogateescape") as tar:
        for entry in entries:
            name = entry.name if isinstance(entry.name, str) else \
                entry.name.decode("utf-8", "surrogateescape")
            info = tarfile.TarInfo(name)
            info.type = _KINDS[entry.kind]
            info.linkname = entry.link
            info.size = len(entry.data) if entry.kind == "file" else 0
            tar.addfile(info, io.BytesIO(entry.data) if entry.kind == "file" else None)
    return buffer.getvalue()


COMPRESS = {"gzip": gzip.compress, "bzip2": bz2.compress, "xz": lzma.compress,
            "none": lambda data: data}


def write_tar(path: Path, entries: list[Entry], compression: str = "none") -> str:
    """Write `tar_bytes(entries)` compressed with `compression` (a key of COMPRESS) to `path`,
    whatever its suffix; returns the path as a string."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(COMPRESS[compression](tar_bytes(entries)))
    return str(path)
