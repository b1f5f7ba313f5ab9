"""Storage round trips on local disk and on a real S3 server (moto, over HTTP on loopback)."""

from __future__ import annotations

import os
import re

import pytest

from pgraft.storage import (LocalStorage, S3Storage, StorageError, StorageUnreachable, backoff_delays, open_storage,
                            outage_s, ride_out, set_outage_s)


def _round_trip(store, tmp_path):
    big = os.urandom(3 * 1024 * 1024)
    src = tmp_path / "blob.bin"
    src.write_bytes(big)
    store.put_file(src, "a/b/blob.bin")
    store.put_bytes("a/c.json", b'{"x": 1}')
    store.put_bytes("z.txt", b"z")
    assert store.get_bytes("a/b/blob.bin") == big
    with store.open_read("a/c.json") as f:
        assert f.read() == b'{"x": 1}'
    assert store.exists("a/c.json") and not store.exists("a/missing")
    assert store.list("a") == ["a/b/blob.bin", "a/c.json"]
    assert store.list("") == ["a/b/blob.bin", "a/c.json", "z.txt"]
    assert store.list("nothing-here") == []
    store.delete("a/c.json")
    assert store.list("a") == ["a/b/blob.bin"]
    with pytest.raises(StorageError, match="does not exist"):
        store.get_bytes("a/missing")


def test_local_round_trip(tmp_path):
    store = open_storage(str(tmp_path / "run"))
    assert isinstance(store, LocalStorage)
    _round_trip(store, tmp_path)
    assert open_storage(f"file://{tmp_path}/run").get_bytes("z.txt") == b"z"


def test_s3_round_trip(s3_uri, tmp_path):
    store = open_storage(s3_uri)
    assert isinstance(store, S3Storage)
    _round_trip(store, tmp_path)


def test_s3_multipart_upload(s3_uri, tmp_path, monkeypatch):
    import pgraft.storage as storage_module

    monkeypatch.setattr(storage_module, "MULTIPART_THRESHOLD", 5 * 1024 * 1024)  # S3's minimum part size
    data = os.urandom(11 * 1024 * 1024)
    (tmp_path / "big").write_bytes(data)
    store = open_storage(s3_uri)
    store.put_file(tmp_path / "big", "big.bin")
    head = store.client.head_object(Bucket=store.bucket, Key=store._key("big.bin"))
    assert head["ETag"].strip('"').endswith("-3")  # three parts of ≥ 5 MiB + rest
    assert store.get_bytes("big.bin") == data


def test_interrupted_local_write_leaves_no_object(tmp_path):
    store = open_storage(str(tmp_path))

    class Boom(Exception):
        pass

    def explode(f):
        f.write(b"half")
        raise Boom

    with pytest.raises(Boom):
        store._atomic_write("k.bin", explode)
    assert store.list("") == [] and not store.exists("k.bin")


def test_missing_bucket_is_named(s3_endpoint):
    with pytest.raises(StorageError, match="bucket 'no-such-bucket-x' does not exist"):
        open_storage("s3://no-such-bucket-x/run").check_writable()


def test_unreachable_endpoint(s3_endpoint, monkeypatch, short_outage):
    from conftest import free_port

    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    with pytest.raises(StorageUnreachable, match=r"storage unreachable for \d+ s \(s3://bucket/run/.pgraft-write-probe "
                                                 r"at endpoint http://127.0.0.1:\d+: EndpointConnectionError\); gave "
                                                 r"up after storage.outage_s=1"):
        open_storage("s3://bucket/run").check_writable()


@pytest.fixture
def short_outage():
    """Storage calls of this test ride out 1 s of outage, then give up (the default is 120 s)."""
    before = outage_s()
    set_outage_s(1.0)
    yield
    set_outage_s(before)


class Flaky:
    """A call that fails with a transient error `failures` times, then answers."""

    def __init__(self, failures: int):
        self.failures, self.calls = failures, 0

    def __call__(self):
        self.calls += 1
        if self.calls <= self.failures:
            raise ConnectionResetError("reset by peer")
        return "answer"


def test_ride_out_retries_transient_errors_with_jittered_backoff_until_the_budget():
    import random

    clock = [0.0]
    slept = []

    def sleep(s):
        slept.append(s)
        clock[0] += s

    transient = lambda exc: isinstance(exc, ConnectionResetError)  # noqa: E731
    flaky = Flaky(4)
    assert ride_out(flaky, transient, "s3://b/k", budget_s=60, clock=lambda: clock[0], sleep=sleep,
                    delays=backoff_delays(rng=random.Random(0))) == "answer"
    assert flaky.calls == 5 and len(slept) == 4
    # Full jitter: each wait lies in [0, min(8, 0.25·2^n)].
    assert all(0 <= s <= min(8.0, 0.25 * 2 ** n) for n, s in enumerate(slept))
    # Never up: the call gives up once the store has been unreachable for the budget, naming it.
    clock[0] = 0.0
    with pytest.raises(StorageUnreachable, match=r"storage unreachable for 30 s \(s3://b/k: ConnectionResetError\)"):
        ride_out(Flaky(10 ** 9), transient, "s3://b/k", budget_s=30, clock=lambda: clock[0], sleep=sleep)
    # Errors that are not about reaching the store pass through at once.
    with pytest.raises(KeyError):
        ride_out(lambda: {}["x"], transient, "s3://b/k", budget_s=30, clock=lambda: clock[0], sleep=sleep)


def proxied(uri: str, proxy) -> S3Storage:
    store = open_storage(uri)
    store.endpoint = proxy.endpoint
    return store


def test_s3_calls_ride_out_an_outage_and_a_cut_mid_body(s3_uri, s3_endpoint):
    """Through the fault proxy: a put whose connection is cut mid-body, and calls made while
    the store refuses connections, finish once it is back; the object is whole."""
    import threading
    from urllib.parse import urlparse

    from cluster.fault_proxy import FaultProxy

    target = urlparse(s3_endpoint)
    data = os.urandom(300_000)
    with FaultProxy(target.hostname, target.port) as proxy:
        store = proxied(s3_uri, proxy)
        store.put_bytes("warm", b"x")  # the client exists before the faults start
        proxy.set_mode("cut", cut_after=50_000)  # every request's body is cut after 50 kB
        threading.Timer(1.5, lambda: proxy.set_mode("pass")).start()
        store.put_bytes("whole", data)
        assert proxy.cut >= 1
        proxy.outage(1.5, mode="refuse")
        assert store.get_bytes("whole") == data
        assert store.digest("whole")[0] == len(data)
        assert store.list("") == ["warm", "whole"]


def test_a_longer_outage_stops_with_one_line_saying_how_long(s3_uri, s3_endpoint, short_outage):
    from urllib.parse import urlparse

    from cluster.fault_proxy import FaultProxy

    target = urlparse(s3_endpoint)
    with FaultProxy(target.hostname, target.port) as proxy:
        store = proxied(s3_uri, proxy)
        proxy.set_mode("refuse")
        with pytest.raises(StorageUnreachable) as caught:
            store.put_bytes("k", b"x")
    assert re.match(rf"storage unreachable for \d+ s \({s3_uri}/k at endpoint {proxy.endpoint}: \w+", str(caught.value))
    assert "\n" not in str(caught.value)


def test_conditional_puts_local_and_s3(tmp_path, s3_uri):
    for store in (LocalStorage(str(tmp_path)), open_storage(s3_uri)):
        assert store.put_if_absent("lease", b"one") is True
        assert store.put_if_absent("lease", b"two") is False
        version = store.version_of("lease")
        assert store.put_if_unchanged("lease", b"three", version) is True
        assert store.put_if_unchanged("lease", b"four", version) is False  # the version moved on
        assert store.get_bytes("lease") == b"three"
        assert store.version_of("missing") is None
        store.move("lease", "aside/lease")
        assert not store.exists("lease") and store.get_bytes("aside/lease") == b"three"


def test_rejected_credentials_never_print_the_secret(s3_endpoint, monkeypatch):
    """A second moto server that authenticates requests: our made-up key is refused."""
    from conftest import start_moto

    proc, endpoint = start_moto({"INITIAL_NO_AUTH_ACTION_COUNT": "0"})
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "super-secret-do-not-print")
        with pytest.raises(StorageError) as info:
            open_storage("s3://bucket/run").check_writable()
        message = str(info.value)
        assert "refused the credentials" in message and "AWS_SECRET_ACCESS_KEY" in message
        assert "super-secret-do-not-print" not in message and "\n" not in message
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_unknown_scheme():
    with pytest.raises(StorageError, match="unsupported storage scheme 'gs'"):
        open_storage("gs://bucket/x")


def test_unwritable_local_root(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(StorageError, match="cannot write"):
        open_storage(str(blocker / "run")).check_writable()


def test_download_never_writes_outside_the_target_folder(s3_uri, tmp_path):
    store = open_storage(s3_uri)
    store.put_bytes("model/config.json", b"{}")
    store.put_bytes("model/../../escape.txt", b"x")  # a legal S3 key that names a parent folder
    with pytest.raises(StorageError, match="key leaves the target folder"):
        store.download_prefix("model", tmp_path / "dst" / "model")
    assert not (tmp_path / "escape.txt").exists() and not (tmp_path / "dst" / "escape.txt").exists()


def test_upload_to_the_root_makes_relative_keys(s3_uri, tmp_path):
    (tmp_path / "src" / "sub").mkdir(parents=True)
    (tmp_path / "src" / "sub" / "a.bin").write_bytes(b"a")
    store = open_storage(f"{s3_uri}/models/m")
    store.upload_folder(tmp_path / "src", "")
    assert store.list("") == ["sub/a.bin"]
    store.download_prefix("", tmp_path / "back")
    assert (tmp_path / "back" / "sub" / "a.bin").read_bytes() == b"a"
