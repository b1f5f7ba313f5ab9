"""Model references: local folders in place; storage locations fetched into a node-local
cache keyed by content, once per node however many processes ask at the same time."""

from __future__ import annotations

import json
import multiprocessing
import os
from pathlib import Path

import pytest

from pgraft.models.fetch import CACHE_ENV, FETCH_LOG, ModelError, fetch_model, is_remote, model_file_exists
from pgraft.storage import open_storage


def _fetch_in_child(ref: str, cache: str, queue) -> None:
    os.environ[CACHE_ENV] = cache
    queue.put(fetch_model(ref))


def test_local_references_are_used_in_place(tiny_digits):
    assert fetch_model(str(tiny_digits)) == str(tiny_digits)
    assert fetch_model(f"file://{tiny_digits}") == str(tiny_digits)
    assert not is_remote(str(tiny_digits)) and is_remote("s3://b/m")
    assert model_file_exists(str(tiny_digits), "pgraft_model.json")


def test_remote_model_is_fetched_once_per_node_by_concurrent_processes(tiny_digits, s3_uri, tmp_path):
    ref = f"{s3_uri}/models/ddpm"
    open_storage(ref).upload_folder(tiny_digits, "")
    cache = str(tmp_path / "node-cache")
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_fetch_in_child, args=(ref, cache, queue)) for _ in range(3)]
    for p in procs:
        p.start()
    folders = {queue.get(timeout=120) for _ in procs}
    for p in procs:
        p.join(timeout=60)
    assert len(folders) == 1  # every process got the same folder
    folder = Path(folders.pop())
    log = [json.loads(line) for line in (Path(cache) / "models" / FETCH_LOG).read_text().splitlines()]
    assert len(log) == 1 and log[0]["ref"] == ref  # one download for the three processes
    original = {p.relative_to(tiny_digits): p.read_bytes() for p in Path(tiny_digits).rglob("*") if p.is_file()}
    fetched = {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file() and p.name != ".pgraft-fetch.json"}
    assert fetched == original


def test_changed_model_gets_a_new_cache_entry(tiny_digits, s3_uri, tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    ref = f"{s3_uri}/models/ddpm"
    store = open_storage(ref)
    store.upload_folder(tiny_digits, "")
    first = fetch_model(ref)
    assert fetch_model(ref) == first  # cached
    store.put_bytes("pgraft_model.json", Path(tiny_digits, "pgraft_model.json").read_bytes() + b" ")
    second = fetch_model(ref)
    assert second != first and Path(second, "pgraft_model.json").read_bytes().endswith(b" ")


def test_missing_remote_model_is_one_line(s3_uri, tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    with pytest.raises(ModelError, match=r"model 's3://.*/nope' does not exist \(no objects under it\)"):
        fetch_model(f"{s3_uri}/nope")
    assert not model_file_exists(f"{s3_uri}/nope", "pgraft_model.json")


def test_missing_model_uri_fails_before_any_worker_starts(s3_uri):
    from pgraft.config import ModelSection
    from pgraft.models.adapters import check_model_folder

    with pytest.raises(ModelError, match=r"model.path 's3://.*/nope' does not exist"):
        check_model_folder(ModelSection(path=f"{s3_uri}/nope"))
