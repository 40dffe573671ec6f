"""OUTPUT/lease: one job at a time writes an OUTPUT.

The lease is one small JSON object: who holds it, a random token, when it was taken, the last
heartbeat and when it expires. A job takes it before planning, renews it from a background thread
every `ttl / 4` seconds, and at its end writes the consolidated index and then *releases* the
lease: the object stays, marked released and naming the index generation it leaves behind. So a
reader that finds a released lease whose generation matches the index knows the index is
current without listing `_commits/` (see `pipeline.index`).

A second job finds a live lease (not released, not expired) and is refused with `LeaseHeld`,
which names the holder; `force=True` (``--force`` on the command line) takes it over. A crashed
job stops renewing, so its lease expires by itself after `ttl` seconds.

Object stores offer no portable compare-and-swap, so taking the lease is write-then-confirm: the
new lease is written, and read back after `settle` seconds; of two jobs that race, the one whose
write landed last keeps it and the other is refused. A renewal that finds another token (the lease
was taken over) marks this lease `lost` and stops renewing; the job then stops scheduling work.
"""

from __future__ import annotations

import getpass
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any

from . import storage
from .jsonutil import parse_object
from .layout import lease_url

__all__ = ["DEFAULT_TTL", "LeaseError", "LeaseHeld", "LeaseRecord", "Lease", "read_lease"]

log = logging.getLogger(__name__)

#: Seconds a lease lives without a heartbeat: a crashed job blocks the OUTPUT at most this long.
DEFAULT_TTL = 120.0
#: Seconds between writing the lease and reading it back to confirm no other job wrote after us.
DEFAULT_SETTLE = 0.5


class LeaseError(RuntimeError):
    """The lease object is unreadable or could not be written; the message names the OUTPUT."""


class LeaseHeld(LeaseError):
    """Another job holds a live lease on the OUTPUT; the message names the holder."""


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).replace(microsecond=0).isoformat()


@dataclass
class LeaseRecord:
    """Contents of OUTPUT/lease. Times are Unix seconds (`*_at` twins in ISO 8601 for people)."""

    holder: str
    token: str
    acquired: float
    heartbeat: float
    ttl: float
    released: bool = False
    #: The index generation the job left behind when it released the lease (None: no index).
    generation: str | None = None

    @property
    def expires(self) -> float:
        return self.heartbeat + self.ttl

    def live(self, now: float | None = None) -> bool:
        """Held by a running job: not released and renewed within the last `ttl` seconds."""
        return not self.released and self.expires > (time.time() if now is None else now)

    def describe(self, now: float | None = None) -> str:
        now = time.time() if now is None else now
        return (f"{self.holder} (taken {_iso(self.acquired)}, last heartbeat {now - self.heartbeat:.0f} s ago, "
                f"expires {_iso(self.expires)})")

    def to_json(self) -> bytes:
        data = asdict(self)
        data.update(acquired_at=_iso(self.acquired), heartbeat_at=_iso(self.heartbeat),
                    expires_at=_iso(self.expires))
        return (json.dumps(data, indent=1, sort_keys=True) + "\n").encode()

    @classmethod
    def from_json(cls, text: str | bytes, root: str) -> LeaseRecord:
        data = parse_object(text, f"lease of {storage.redact(root)}", LeaseError)
        try:
            return cls(holder=str(data["holder"]), token=str(data["token"]), acquired=float(data["acquired"]),
                       heartbeat=float(data["heartbeat"]), ttl=float(data["ttl"]),
                       released=bool(data.get("released", False)), generation=data.get("generation"))
        except (KeyError, TypeError, ValueError) as e:
            raise LeaseError(f"lease of {storage.redact(root)} is incomplete: {e!r}") from e


def read_lease(root: str, storage_options: Mapping[str, Any] | None = None) -> LeaseRecord | None:
    """The lease of OUTPUT `root`, or None when it has none (an output written before leases)."""
    try:
        text = storage.read_bytes(lease_url(root), storage_options)
    except FileNotFoundError:
        return None
    return LeaseRecord.from_json(text, root)


def default_holder() -> str:
    """user@host pid N: enough to find the job that holds a lease."""
    try:
        user = getpass.getuser()
    except Exception:  # no user name in some containers
        user = "?"
    return f"{user}@{socket.gethostname()} pid {os.getpid()}"


class Lease:
    """The lease of one OUTPUT, as held by this process.

    `acquire()` takes it (raising `LeaseHeld` when another job holds it and `force` is off),
    `start_heartbeat()` keeps it alive, `release(generation)` hands it back naming the index
    generation written (None when no index was written: readers then list `_commits/`).
    `previous` is the lease found when acquiring (None when there was none).
    """

    def __init__(
        self,
        root: str,
        storage_options: Mapping[str, Any] | None = None,
        *,
        holder: str | None = None,
        ttl: float = DEFAULT_TTL,
        settle: float = DEFAULT_SETTLE,
    ):
        self.root = root
        self.storage_options = dict(storage_options or {})
        self.holder = holder or default_holder()
        self.ttl = float(ttl)
        self.settle = float(settle)
        self.token = uuid.uuid4().hex
        self.previous: LeaseRecord | None = None
        self.held = False
        self.lost = False
        self._acquired = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _record(self, **changes: Any) -> LeaseRecord:
        now = time.time()
        fields = dict(holder=self.holder, token=self.token, acquired=self._acquired or now, heartbeat=now, ttl=self.ttl)
        fields.update(changes)
        return LeaseRecord(**fields)

    def _write(self, record: LeaseRecord) -> None:
        try:
            storage.put_bytes(lease_url(self.root), record.to_json(), self.storage_options)
        except OSError as e:
            raise LeaseError(f"could not write the lease of {storage.redact(self.root)}: {e}") from e

    def acquire(self, *, force: bool = False) -> Lease:
        """Take the lease. Raises `LeaseHeld` naming the holder when another job holds it."""
        current = read_lease(self.root, self.storage_options)
        if current is not None and current.live() and current.token != self.token:
            if not force:
                raise LeaseHeld(
                    f"{storage.redact(self.root)} is being written by another job: {current.describe()}; "
                    "wait for it to finish or for its lease to expire, or pass --force to take it over"
                )
            log.warning("taking over the lease of %s from %s (--force)", storage.redact(self.root), current.describe())
        self.previous = current
        self._acquired = time.time()
        self._write(self._record())
        if self.settle > 0:
            time.sleep(self.settle)
        confirmed = read_lease(self.root, self.storage_options)
        if confirmed is None or confirmed.token != self.token:
            holder = confirmed.describe() if confirmed is not None else "a job that removed it"
            raise LeaseHeld(f"{storage.redact(self.root)}: another job took the lease at the same time: {holder}")
        self.held = True
        return self

    def renew(self) -> bool:
        """Push the expiry forward. Returns False (and sets `lost`) when another job took the lease."""
        if not self.held or self.lost:
            return False
        current = read_lease(self.root, self.storage_options)
        if current is None or current.token != self.token:
            self.lost = True
            who = current.describe() if current is not None else "nobody (the lease was removed)"
            log.error("lost the lease of %s: now held by %s", storage.redact(self.root), who)
            return False
        self._write(self._record())
        return True

    def start_heartbeat(self, interval: float | None = None) -> None:
        """Renew the lease from a daemon thread every `interval` seconds (default `ttl / 4`)."""
        period = interval if interval is not None else self.ttl / 4

        def beat() -> None:
            while not self._stop.wait(period):
                try:
                    if not self.renew():
                        return
                except (LeaseError, OSError) as e:
                    # One failed renewal is not fatal: the lease lives `ttl`, several beats long.
                    log.warning("could not renew the lease of %s: %s", storage.redact(self.root), e)

        self._stop.clear()
        self._thread = threading.Thread(target=beat, name="lease-heartbeat", daemon=True)
        self._thread.start()

    def stop_heartbeat(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def release(self, generation: str | None = None) -> None:
        """Hand the lease back, naming the index generation this job wrote (None: none written)."""
        self.stop_heartbeat()
        if not self.held:
            return
        self.held = False
        if self.lost:
            return
        current = read_lease(self.root, self.storage_options)
        if current is None or current.token != self.token:
            log.error("the lease of %s was taken over; not releasing it", storage.redact(self.root))
            return
        self._write(self._record(released=True, generation=generation))
