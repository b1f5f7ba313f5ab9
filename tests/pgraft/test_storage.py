"""Storage round trips on local disk and on a real S3 server (moto, over HTTP on loopback)."""

from __future__ import annotations

import os

import pytest

from pgraft.storage import LocalStorage, S3Storage, StorageError, open_storage


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


def test_unreachable_endpoint(s3_endpoint, monkeypatch):
    from conftest import free_port

    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    with pytest.raises(StorageError, match="cannot reach S3 endpoint http://127.0.0.1"):
        open_storage("s3://bucket/run").check_writable()


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
