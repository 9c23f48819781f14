"""What a killed driver's local Ray leaves behind, and how the next run ends it.

A SIGKILLed driver's local Ray leaves two agents waiting on the dead GCS. Each run records the
local Ray it starts; a later run ends, by pid, the processes holding files in the session folder
of a record whose driver is gone. See docs/cluster.md, "a driver that was killed"."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import tempfile
import time
from pathlib import Path

logger = logging.getLogger(__name__)

__all__ = ["forget", "reap", "record", "state_dir"]


def state_dir() -> Path:
    """Where runs record their local Ray: TMPDIR/sdedit-batch-UID/local-ray."""
    return Path(tempfile.gettempdir()) / f"sdedit-batch-{os.getuid()}" / "local-ray"


def _start_time(pid: int) -> int | None:
    """The start time of process `pid` (clock ticks since boot), or None if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2:].split()
    return None if fields[0] == "Z" else int(fields[19])


def record(session_dir: str, directory: Path | None = None) -> Path | None:
    """Note that this process (the driver) started the local Ray of `session_dir`."""
    folder = directory or state_dir()
    entry = {"pid": os.getpid(), "start": _start_time(os.getpid()), "session_dir": session_dir}
    try:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{os.getpid()}.json"
        path.write_text(json.dumps(entry))
    except OSError as exc:  # hygiene only: never fails a run
        logger.debug("cannot record the local Ray in %s: %s", folder, exc)
        return None
    return path


def forget(path: Path | None) -> None:
    """This run's local Ray was shut down normally: drop its record."""
    if path is not None:
        with contextlib.suppress(OSError):
            path.unlink()


def holders(session_dir: str) -> list[int]:
    """Live processes of this user (not this one) holding a file open under `session_dir`."""
    prefix = session_dir.rstrip("/") + "/"
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            if os.stat(f"/proc/{name}").st_uid != os.getuid():
                continue
            fds = os.listdir(f"/proc/{name}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{name}/fd/{fd}")
            except OSError:
                continue
            if target.startswith(prefix) and _start_time(int(name)) is not None:
                found.append(int(name))
                break
    return found


def reap(directory: Path | None = None, grace: float = 2.0) -> list[int]:
    """End the processes left by earlier runs whose driver was killed; returns their pids."""
    folder = directory or state_dir()
    try:
        entries = sorted(folder.glob("*.json"))
    except OSError:
        return []
    ended: list[int] = []
    for path in entries:
        try:
            entry = json.loads(path.read_text())
            pid, start, session = int(entry["pid"]), entry["start"], str(entry["session_dir"])
        except (OSError, ValueError, KeyError, TypeError):
            forget(path)
            continue
        if start is not None and _start_time(pid) == start:
            continue  # that driver still runs
        left = holders(session)
        if left:
            logger.warning("ending %d Ray process(es) left by an earlier run whose driver was "
                           "killed (pids %s, session %s)", len(left),
                           ", ".join(map(str, left)), session)
            _terminate(left, grace)
            ended += left
        forget(path)
    return ended


def _terminate(pids: list[int], grace: float) -> None:
    """SIGTERM, up to `grace` seconds, then SIGKILL what is left."""
    starts = {pid: _start_time(pid) for pid in pids}
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        alive = [p for p in pids if starts[p] is not None and _start_time(p) == starts[p]]
        for pid in alive:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while alive and time.monotonic() < deadline:
            time.sleep(0.1)
            alive = [p for p in alive if _start_time(p) == starts[p]]
        if not alive:
            return
