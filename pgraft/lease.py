"""One writer per stage output: a lease object in the run's storage (docs/DESIGN.md §7e).

A stage's driver creates `leases/round-NNN/<stage>.json` with a conditional put (S3's
If-None-Match: *; an exclusive hard link locally) before it writes anything, renews it every
third of `storage.lease_ttl_s` with a compare-and-swap on the object's version (S3's If-Match;
an flock'd compare locally), and deletes it when the stage ends. A second driver of the same
stage output finds the lease taken and waits, up to `storage.lease_wait_s`, then stops with
one line naming the holder. A lease that nobody renews (its driver was killed) is taken over:
at once when its holder ran on the waiter's host and its process is gone (a resubmitted job's
driver runs on the same head node), when the waiter has seen it unchanged for `lease_ttl_s`,
or when its last renewal is more than two TTLs old by the waiter's clock (a margin for clock
skew between nodes).

Outages: every storage call rides out an unreachable store (pgraft.storage); a waiter does not
count time it spent blocked in a storage call as time the holder failed to renew.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Callable

from pgraft.errors import PgraftError
from pgraft.storage import Storage, StorageError


class LeaseHeld(PgraftError):
    """Another live driver is writing this stage output."""


@dataclass
class Holder:
    """What a lease says about its driver."""

    token: str  # unique per acquisition: tells a lease of ours from another's
    host: str
    pid: int
    job: str  # the Ray job id, when the driver runs under `ray job submit`
    what: str  # e.g. "generate round 0"
    started: float  # wall-clock seconds
    renewed: float  # wall-clock seconds of the last renewal
    beats: int = 0

    @classmethod
    def mine(cls, what: str) -> Holder:
        now = time.time()
        return cls(uuid.uuid4().hex, socket.gethostname(), os.getpid(), os.environ.get("RAY_JOB_ID", ""), what, now, now)

    def describe(self) -> str:
        job = f", Ray job {self.job}" if self.job else ""
        return f"pid {self.pid} on {self.host}{job}, started {time.strftime('%H:%M:%S', time.localtime(self.started))}"

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Holder | None:
        try:
            return cls(**json.loads(data))
        except (ValueError, TypeError):
            return None  # unreadable: treated as a lease nobody renews


def _pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host (a reused pid reads as alive: the TTL
    then decides)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


class Lease:
    """`with Lease(storage, key, what, ttl_s, wait_s):` hold the lease for the block."""

    def __init__(self, storage: Storage, key: str, what: str, ttl_s: float = 60.0, wait_s: float = 180.0,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep):
        self.storage, self.key, self.what = storage, key, what
        self.ttl_s, self.wait_s = ttl_s, wait_s
        self.clock, self.sleep = clock, sleep
        self.holder = Holder.mine(what)
        self.version: str | None = None
        self.took_over: Holder | None = None  # the stale holder this lease replaced, if any
        self.lost: str | None = None  # why the lease was lost while held, if it was
        self._stop = threading.Event()
        self._beating: threading.Thread | None = None

    @property
    def where(self) -> str:
        return self.storage.url(self.key)

    def acquire(self) -> Lease:
        start = self.clock()
        seen, seen_since = None, start
        while True:
            if self._try_create():
                return self
            before = self.clock()
            version = self.storage.version_of(self.key)
            raw = self._read_if_present() if version is not None else None
            now = self.clock()
            if version is None or raw is None:
                continue  # released between our put and our look (or our two looks): try again at once
            current = Holder.from_json(raw)
            if current is not None and current.token == self.holder.token:
                self.version = version  # our own create, retried after a cut connection
                return self
            if version != seen or now - before > max(1.0, self.ttl_s / 6):
                # A renewal, or a look that itself stalled (an outage): the holder gets a full TTL again.
                seen, seen_since = version, now
            if self._stale(current, now - seen_since) and self.storage.put_if_unchanged(self.key, self._body(), version):
                self.version, self.took_over = self.storage.version_of(self.key), current
                gone = current.describe() if current else "an unreadable lease"
                print(f"lease: took over {self.where} from {gone}: not renewed for over {self.ttl_s:g} s "
                      "(storage.lease_ttl_s), its driver is gone", file=sys.stderr, flush=True)
                return self
            if now - start >= self.wait_s:
                holder = current.describe() if current else "an unreadable lease"
                renewed = f", renewed {max(0.0, time.time() - current.renewed):.0f} s ago" if current else ""
                raise LeaseHeld(f"{self.what} is being written by another driver ({holder}{renewed}; lease "
                                f"{self.where}); waited {now - start:.0f} s (storage.lease_wait_s); rerun when it "
                                f"is done, or after {self.ttl_s:g} s without renewal its lease is taken over")
            self.sleep(min(2.0, max(0.05, self.ttl_s / 12)))

    def _read_if_present(self) -> bytes | None:
        """The lease's bytes, or None when its holder released it since we saw its version."""
        try:
            return self.storage.get_bytes(self.key)
        except StorageError:
            if self.storage.exists(self.key):
                raise  # there, yet unreadable: a storage fault, not a release
            return None

    def _try_create(self) -> bool:
        if self.storage.put_if_absent(self.key, self._body()):
            self.version = self.storage.version_of(self.key)
            return True
        return False

    def _stale(self, current: Holder | None, unchanged_s: float) -> bool:
        if current is None or unchanged_s >= self.ttl_s:
            return True
        if current.host == self.holder.host and not _pid_alive(current.pid):
            return True  # its driver ran on this host and is gone (a resubmitted job's driver lands on the same head)
        return time.time() - current.renewed > 2 * self.ttl_s  # by the wall clock, with a TTL of margin for skew

    def _body(self) -> bytes:
        self.holder.renewed = time.time()
        return self.holder.to_json()

    def renew(self) -> bool:
        """One renewal; False (and `lost` says why) when another driver has taken the lease."""
        self.holder.beats += 1
        if not self.storage.put_if_unchanged(self.key, self._body(), self.version):
            self.lost = f"{self.where} was taken over by another driver (this one did not renew it in time)"
            return False
        self.version = self.storage.version_of(self.key)
        return True

    def _beat(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                if not self.renew():
                    print(f"lease: warning: {self.lost}; its writes may now interleave with this stage's",
                          file=sys.stderr, flush=True)
                    return
            except PgraftError as exc:  # storage gone for longer than storage.outage_s
                print(f"lease: warning: cannot renew {self.where}: {exc}", file=sys.stderr, flush=True)

    def release(self) -> None:
        self._stop.set()
        if self._beating is not None:
            self._beating.join(timeout=max(5.0, self.ttl_s))
        if self.lost is None and self.storage.version_of(self.key) == self.version:
            self.storage.delete(self.key)  # ours still: nobody took it over in the meantime

    def __enter__(self) -> Lease:
        self.acquire()
        self._beating = threading.Thread(target=self._beat, name="pgraft-lease", daemon=True)
        self._beating.start()
        return self

    def __exit__(self, exc_type, *_) -> None:
        if exc_type is None:
            self.release()
            return
        try:  # the stage failed: its error is the one to show, not a second one from releasing
            self.release()
        except PgraftError as exc:
            print(f"lease: warning: could not release {self.where} ({exc}); the next driver takes it over after "
                  f"{self.ttl_s:g} s", file=sys.stderr, flush=True)
