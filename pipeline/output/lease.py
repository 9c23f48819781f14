"""One writer per output: `OUT/lease.json` names the run writing there.

A run takes the lease before it writes anything, renews it while it runs and removes it at its
end; a second run is refused, and a stopped run's lease is taken over with a warning. See
docs/outputs.md, "one writer per output"."""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import getpass
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from pipeline.errors import OutputBusyError, StorageError
from pipeline.output.leasestore import ConflictError, store_for
from pipeline.redaction import redact_url
from pipeline.storage import describe_error, machine_id, process_alive, url_fs, with_retries

logger = logging.getLogger(__name__)

__all__ = ["HEARTBEAT_S", "LEASE_TIMEOUT_S", "Holder", "Lease", "LeaseState"]

LEASE_TIMEOUT_S = 300.0
"""A lease whose last heartbeat is older than this, in seconds, is taken over."""
HEARTBEAT_S = 30.0
"""Seconds between two renewals of a held lease."""
LEASE_VERSION = 1
"""The shape of lease.json this code writes."""


@dataclass(frozen=True)
class Holder:
    """A run holding a lease: who, where, since when, and its last heartbeat (UNIX seconds)."""

    token: str
    holder: str
    host: str
    pid: int
    machine: str
    job: str
    started_at: float
    heartbeat_at: float

    def to_json(self) -> bytes:
        data = {"lease_version": LEASE_VERSION, **dataclasses.asdict(self),
                "started": _iso(self.started_at), "heartbeat": _iso(self.heartbeat_at)}
        return json.dumps(data, indent=1).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Holder | None:
        """The holder a lease file names, or None when it is not one."""
        try:
            raw = json.loads(data)
            values = {f.name: raw[f.name] for f in dataclasses.fields(cls)}
        except (ValueError, TypeError, KeyError):
            return None
        types = {"pid": int, "started_at": (int, float), "heartbeat_at": (int, float)}
        if not all(isinstance(v, types.get(k, str)) and not isinstance(v, bool)
                   for k, v in values.items()):
            return None
        return cls(**values)

    def describe(self, now: float) -> str:
        """"alice@host (pid 12, job quickstart) since 2026-... UTC, last heartbeat 4 s ago"."""
        return (f"{self.holder} (pid {self.pid}, job {self.job or '?'}) since "
                f"{_iso(self.started_at)}, last heartbeat {_age(now - self.heartbeat_at)} ago")


@dataclass(frozen=True)
class LeaseState:
    """A lease as found: its holder (None when unreadable), and why it is stale (None: live)."""

    holder: Holder | None
    stale: str | None
    now: float

    def describe(self) -> str:
        who = self.holder.describe(self.now) if self.holder else "a lease file that cannot be read"
        return who if self.stale is None else f"{who}; stale: {self.stale}"


class Lease:
    """The lease of the output at `where` (its file at `url`) for a run of `job`; `clock` gives
    UNIX seconds (tests pass their own)."""

    def __init__(self, url: str, where: str, options: Mapping[str, Any] | None = None, *,
                 job: str = "", timeout_s: float = LEASE_TIMEOUT_S,
                 heartbeat_s: float = HEARTBEAT_S,
                 clock: Callable[[], float] = time.time) -> None:
        self.url, self.where, self.job = url, redact_url(where), job
        self.timeout_s, self.heartbeat_s, self.clock = timeout_s, heartbeat_s, clock
        fs, path = url_fs(url, options)
        self.store = store_for(fs, path)
        self.mine: Holder | None = None
        self.tag: Any = None
        self.lost: str | None = None
        """Why the lease was lost while held (another run took it over), else None."""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # reading
    def state(self) -> LeaseState | None:
        """The lease as it is now (None: no lease); StorageError when it cannot be read."""
        content, _ = self._call("read", self.store.read)
        return None if content is None else self._judge(content)

    def _judge(self, content: bytes) -> LeaseState:
        now = self.clock()
        holder = Holder.from_json(content)
        if holder is None:
            stale: str | None = "its lease file cannot be read"
        elif process_alive(holder.machine, holder.pid) is False:
            stale = f"its process {holder.pid} on {holder.host} has ended"
        elif now - holder.heartbeat_at > self.timeout_s:
            stale = f"no heartbeat within the {self.timeout_s:.0f} s timeout"
        else:
            stale = None
        return LeaseState(holder, stale, now)

    # holding
    def acquire(self) -> None:
        """Take the lease, or take over a stale one with a warning.

        Raises:
            OutputBusyError: another run holds it (naming the run and its heartbeat's age).
            StorageError: the store failed (naming the lease file)."""
        now = self.clock()
        user = _user()
        self.mine = Holder(uuid.uuid4().hex, f"{user}@{socket.gethostname()}",
                           socket.gethostname(), os.getpid(), machine_id(), self.job, now, now)
        for _ in range(3):
            content, tag = self._call("read", self.store.read)
            if content is not None and getattr(Holder.from_json(content), "token",
                                               None) == self.mine.token:
                break  # a write of this run landed, though its answer was lost
            if content is not None:
                state = self._judge(content)
                if state.stale is None:
                    raise OutputBusyError(self._busy(state))
            try:
                self.tag = self._call("write", functools.partial(
                    self.store.write, self.mine.to_json(), tag))
            except ConflictError:
                continue  # another run wrote it since: judge again
            if content is not None:
                logger.warning("output %s: took over the lease of %s", self.where,
                               state.describe())
            break
        else:
            raise OutputBusyError(f"output {self.where}: its lease changed three times while "
                                  "this run tried to take it; another run is starting there")
        content, self.tag = self._call("read back", self.store.read)
        holder = Holder.from_json(content) if content is not None else None
        if holder is None or holder.token != self.mine.token:
            state = self._judge(content) if content is not None else None
            self.mine = None
            raise OutputBusyError(self._busy(state) if state else
                                  f"output {self.where}: its lease vanished as it was taken")

    def renew(self) -> None:
        """Write a new heartbeat; sets `lost` when another run holds the lease now."""
        assert self.mine is not None
        mine = dataclasses.replace(self.mine, heartbeat_at=self.clock())
        try:
            self.tag = self.store.write(mine.to_json(), self.tag)
            self.mine = mine
        except ConflictError:
            content, tag = self.store.read()
            holder = Holder.from_json(content) if content is not None else None
            if holder is not None and holder.token == self.mine.token:
                self.tag = tag  # an earlier write landed though its answer was lost
                return self.renew()
            self.lost = (f"output {self.where}: this run lost its lease: "
                         + (f"{holder.describe(self.clock())} took it over" if holder else
                            "its lease file was removed or damaged")
                         + f" (no heartbeat of this run for over {self.timeout_s:.0f} s?)")
            logger.error("%s", self.lost)
        return None

    def release(self) -> None:
        """Stop the heartbeat and remove the lease if it is still this run's (best effort: a
        lease left behind goes stale and is taken over)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self.mine is None or self.lost is not None:
            return
        try:
            content, tag = self.store.read()
            holder = Holder.from_json(content) if content is not None else None
            if holder is not None and holder.token == self.mine.token:
                self.store.delete(tag)
        except Exception as exc:
            logger.warning("output %s: cannot remove its lease %s (the next run takes it over "
                           "once stale): %s", self.where, redact_url(self.url),
                           describe_error(exc))
        self.mine = None

    def __enter__(self) -> Lease:
        self.acquire()
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name="sdedit-lease", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s) and self.lost is None:
            try:
                self.renew()
            except Exception as exc:  # a blip of the store: the next beat tries again
                logger.warning("output %s: cannot renew its lease (next try in %.0f s): %s",
                               self.where, self.heartbeat_s, describe_error(exc))

    def _busy(self, state: LeaseState) -> str:
        return (f"output {self.where} is being written by another run: {state.describe()}. "
                "Two runs on one output would compute the same shards; wait for that run to "
                "end, or use another output.path. A lease whose heartbeat is older than "
                f"{self.timeout_s:.0f} s is taken over ({redact_url(self.url)})")

    def _call(self, what: str, fn: Callable[[], Any]) -> Any:
        """`fn()` with transient errors retried; other failures a StorageError naming the lease
        (a failed condition, ConflictError, passes)."""
        try:
            return with_retries(fn, what=f"{what} the lease", url=self.url)
        except (ConflictError, OutputBusyError, StorageError):
            raise  # StorageError: "read the lease URL: failed after 5 attempts: ..."
        except Exception as exc:
            raise StorageError(f"cannot {what} the lease {redact_url(self.url)}: "
                               f"{describe_error(exc)}") from exc


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no login name (a container without a passwd entry)
        return f"uid{os.getuid()}"


def _iso(seconds: float) -> str:
    return dt.datetime.fromtimestamp(seconds, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _age(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
