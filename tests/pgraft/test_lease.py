"""One writer per stage output: the lease, on a local folder and on the moto S3 server."""

from __future__ import annotations

import os
import threading
import time

import pytest

from pgraft.lease import Holder, Lease, LeaseHeld
from pgraft.storage import LocalStorage, open_storage


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.s3)])
def store(request, tmp_path):
    if request.param == "local":
        return LocalStorage(str(tmp_path))
    return open_storage(request.getfixturevalue("s3_uri"))


def test_a_second_driver_stops_with_one_line_naming_the_holder_then_gets_it_once_released(store):
    first = Lease(store, "leases/round-000/generate.json", "generate round 0", ttl_s=30, wait_s=0)
    with first:
        second = Lease(store, "leases/round-000/generate.json", "generate round 0", ttl_s=30, wait_s=0)
        with pytest.raises(LeaseHeld) as held:
            second.acquire()
        message = str(held.value)
        assert message.startswith(f"generate round 0 is being written by another driver (pid {os.getpid()} on ")
        assert store.url("leases/round-000/generate.json") in message and "\n" not in message
    assert not store.exists("leases/round-000/generate.json")  # released
    with second:
        assert Holder.from_json(store.get_bytes("leases/round-000/generate.json")).token == second.holder.token


def test_a_lease_nobody_renews_is_taken_over_after_the_ttl_and_its_old_holder_learns_it(store):
    # Timed from before the dead holder's acquire: its renewal time is stamped before its write, and
    # under load that write alone can take most of a TTL, after which the wall-clock rule may apply.
    start = time.monotonic()
    dead = Lease(store, "lease.json", "reward round 0", ttl_s=0.6).acquire()  # acquired, never renewed: a killed driver
    with Lease(store, "lease.json", "reward round 0", ttl_s=0.6, wait_s=30) as taker:
        assert 0.6 <= time.monotonic() - start < 10
        assert taker.took_over.token == dead.holder.token
        assert dead.renew() is False and "taken over by another driver" in dead.lost


def test_a_renewed_lease_is_waited_for_and_two_drivers_never_overlap(store):
    """Two drivers race for one output: each holds it in turn (the renewals keep the waiting one
    from taking over a live holder), their spans never overlap."""
    spans, errors = [], []

    def driver():
        try:
            with Lease(store, "lease.json", "filter round 0", ttl_s=2.0, wait_s=30) as lease:
                begin = time.monotonic()
                # Held through more than a TTL of renewals (one each TTL/3): only they keep the lease.
                deadline = begin + 60
                while lease.holder.beats < 4 and time.monotonic() < deadline:
                    time.sleep(0.01)
                assert lease.holder.beats >= 4 and time.monotonic() - begin > 2.0
                spans.append((begin, time.monotonic()))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=driver) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(spans) == 2
    (a0, a1), (b0, b1) = sorted(spans)
    assert a1 <= b0, spans


def test_the_waiter_does_not_count_its_own_stalled_calls_against_the_holder():
    """A look at the lease that took longer than a sixth of the TTL (an outage) restarts the
    holder's allowance: only time seen by calls that answered promptly counts."""
    clock = [0.0]

    class SlowStore(LocalStorage):
        def get_bytes(self, key):
            clock[0] += 5.0  # every look stalls for 5 s (> TTL / 6)
            return super().get_bytes(key)

    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        store = SlowStore(folder)
        Lease(store, "lease.json", "train round 0", ttl_s=6).acquire()  # never renewed
        waiter = Lease(store, "lease.json", "train round 0", ttl_s=6, wait_s=20, clock=lambda: clock[0],
                       sleep=lambda s: clock.__setitem__(0, clock[0] + s))
        with pytest.raises(LeaseHeld):
            waiter.acquire()  # 20 s of stalled looks: never long enough unchanged to take over


def test_a_lease_whose_driver_on_this_host_is_gone_is_taken_over_at_once(tmp_path):
    import subprocess
    import sys

    store = LocalStorage(str(tmp_path))
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = Lease(store, "lease.json", "generate round 0", ttl_s=600)
    dead.holder.pid = int(gone.stdout)  # a driver of this host that has exited
    dead.acquire()
    start = time.monotonic()
    with Lease(store, "lease.json", "generate round 0", ttl_s=600, wait_s=30) as taker:
        assert taker.took_over.pid == int(gone.stdout) and time.monotonic() - start < 5


def test_a_lease_released_between_the_waiters_two_looks_is_taken_not_an_error(tmp_path):
    """The holder releases after the waiter saw the lease's version and before it read it (a race
    the suite met under load on S3): the waiter takes the free lease instead of failing."""

    class ReleasedOnRead(LocalStorage):
        def get_bytes(self, key):
            if key == "lease.json" and not released:
                released.append(True)
                holder.release()  # between version_of and get_bytes
            return super().get_bytes(key)

    released: list = []
    store = ReleasedOnRead(str(tmp_path))
    holder = Lease(store, "lease.json", "filter round 0", ttl_s=60.0, wait_s=5).acquire()
    waiter = Lease(store, "lease.json", "filter round 0", ttl_s=60.0, wait_s=5).acquire()
    assert released and waiter.took_over is None and store.exists("lease.json")
    waiter.release()
