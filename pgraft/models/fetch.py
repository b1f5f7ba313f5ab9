"""Model references: a local folder, or a location in storage fetched once per node.

A model that stages hand each other (a base model, a task's pretrained models, a round's
fine-tuned model) is named by its storage location (`s3://…` or a local path). Workers call
`fetch_model(ref)`: local folders are used in place; remote ones are downloaded into a
node-local cache keyed by the objects' sizes and ETags, so every actor on a node shares one
download, and a model that changes in storage gets a new cache entry instead of a stale one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from urllib.parse import urlparse

from pgraft.errors import PgraftError
from pgraft.storage import join_uri, open_storage

# Environment variable naming the node-local cache root; `ray start` passes it to a node's workers.
CACHE_ENV = "PGRAFT_CACHE_DIR"
FETCH_RECORD = ".pgraft-fetch.json"  # written into each cached model: where it came from, when
FETCH_LOG = "fetch.log"  # one JSON line per download on this node, beside the cached models


class ModelError(PgraftError):
    """The configured model cannot be used; the message names the path or field."""


def cache_root() -> Path:
    """This node's cache folder (PGRAFT_CACHE_DIR, default ~/.cache/pgraft)."""
    return Path(os.environ.get(CACHE_ENV) or "~/.cache/pgraft").expanduser()


def is_remote(ref: str) -> bool:
    """True for references that name an object store rather than this node's disk."""
    return "://" in ref and urlparse(ref).scheme not in ("", "file")


def local_folder(ref: str) -> Path:
    """The local folder of a non-remote reference (a path or file:// URI)."""
    return Path(urlparse(ref).path if ref.startswith("file://") else ref).expanduser()


def model_file_exists(ref: str, relative: str) -> bool:
    """Whether the model at `ref` has the file `relative` (cheap: no download)."""
    if is_remote(ref):
        return open_storage(ref).exists(relative)
    return (local_folder(ref) / relative).is_file()


def child(ref: str, name: str) -> str:
    """The reference of a sub-folder, for paths and URIs alike (e.g. task dir → ddpm)."""
    return join_uri(ref, name) if "://" in ref else str(Path(ref) / name)


def content_digest(entries: list) -> str:
    """The cache key of a model: a hash of its objects' names, sizes and version tags."""
    return hashlib.sha256(json.dumps(entries, sort_keys=True).encode()).hexdigest()[:32]


def model_digest(ref: str) -> str:
    """The content key of the model at `ref` (local folder or storage), without downloading it."""
    return content_digest(open_storage(ref if is_remote(ref) else str(local_folder(ref))).manifest(""))


def fetch_model(ref: str) -> str:
    """A local folder holding the model at `ref`: the folder itself when local, otherwise the
    node's cached copy, downloaded once under a lock shared by every process of the node."""
    if not is_remote(ref):
        return str(local_folder(ref))
    from filelock import FileLock

    store = open_storage(ref)
    entries = store.manifest("")
    if not entries:
        raise ModelError(f"model {ref!r} does not exist (no objects under it); publish it there or fix the reference")
    digest = content_digest(entries)
    models = cache_root() / "models"
    target = models / digest
    if target.is_dir():
        return str(target)
    models.mkdir(parents=True, exist_ok=True)
    with FileLock(str(models / f"{digest}.lock")):
        if target.is_dir():  # another actor of this node fetched it while we waited
            return str(target)
        partial = models / f".{digest}.partial-{os.getpid()}"
        shutil.rmtree(partial, ignore_errors=True)
        try:
            start = time.time()
            store.download_prefix("", partial)
            record = {"ref": ref, "objects": len(entries), "bytes": sum(size for _, size, _ in entries),
                      "seconds": round(time.time() - start, 3), "pid": os.getpid()}
            (partial / FETCH_RECORD).write_text(json.dumps(record))
            os.replace(partial, target)  # the rename is the commit: a folder that exists is whole
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        with open(models / FETCH_LOG, "a") as log:
            log.write(json.dumps({"digest": digest, **record}) + "\n")
    return str(target)
