"""All reads and writes of run data go through here: one interface, a dispatch table of schemes.

`open_storage(uri)` returns a store rooted at `uri`; keys are '/'-separated paths below it.
Local paths and file:// URIs write atomically (temp file + rename); s3:// goes through boto3
with the endpoint from the standard AWS_ENDPOINT_URL. An object store can stall or drop
connections for a while (docs/DESIGN.md §7d): every S3 call that fails on the connection, or
with a 5xx answer, is retried whole, with exponential backoff and full jitter, until storage
has been unreachable for `outage_s` seconds (`storage.outage_s` of the config, applied to the
process by `set_outage_s`); only then does it fail, with one line saying for how long storage
was unreachable. Errors are StorageError with one line naming the URI, never a secret.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import BinaryIO, Callable
from urllib.parse import urlparse

from pgraft.errors import PgraftError


class StorageError(PgraftError):
    """Storage is unreachable, missing, refuses us, or lacks a key; the message says which."""


class StorageUnreachable(StorageError):
    """Storage did not answer for longer than the outage budget (`storage.outage_s`)."""


# How long one storage call keeps retrying an unreachable store before it fails (seconds).
# Processes that load a config take its `storage.outage_s` (pgraft.config applies it);
# PGRAFT_STORAGE_OUTAGE_S sets it for a process that loads none.
DEFAULT_OUTAGE_S = 120.0
_outage_s = float(os.environ.get("PGRAFT_STORAGE_OUTAGE_S", DEFAULT_OUTAGE_S))


def set_outage_s(seconds: float) -> None:
    """How long storage calls of this process ride out an unreachable store."""
    global _outage_s
    _outage_s = float(seconds)


def outage_s() -> float:
    return _outage_s


def backoff_delays(base: float = 0.25, cap: float = 8.0, rng: random.Random | None = None):
    """Seconds to wait before each retry: exponential backoff with full jitter (uniform in
    [0, min(cap, base·2^n)]), so that many workers hit by one outage do not retry in step."""
    rng = rng or random.Random()
    attempt = 0
    while True:
        yield rng.uniform(0.0, min(cap, base * 2 ** attempt))
        attempt += 1


def ride_out(call: Callable, is_transient: Callable[[BaseException], bool], what: str,
             budget_s: float | None = None, clock: Callable[[], float] = time.monotonic,
             sleep: Callable[[float], None] = time.sleep, delays=None):
    """`call()`, retried while it fails with a transient error, until the store has been
    unreachable for `budget_s` seconds (the process's `outage_s()` by default): then
    StorageUnreachable names `what`, the time and the last error. Other errors pass through."""
    budget = outage_s() if budget_s is None else budget_s
    first_failure, delays, warned = None, delays or backoff_delays(), False
    while True:
        try:
            return call()
        except Exception as exc:  # noqa: BLE001 - the predicate decides
            if not is_transient(exc):
                raise
            now = clock()
            first_failure = now if first_failure is None else first_failure
            waited = now - first_failure
            if waited >= budget:
                raise StorageUnreachable(
                    f"storage unreachable for {waited:.0f} s ({what}: {_error_name(exc)}); gave up after "
                    f"storage.outage_s={budget:g}; rerun the stage when storage answers again (committed work is kept)"
                ) from None
            if not warned:  # one line per call that rides out an outage, not one per retry
                print(f"storage: {what} unreachable ({_error_name(exc)}); retrying for up to {budget:g} s",
                      file=sys.stderr, flush=True)
                warned = True
            sleep(min(next(delays), max(0.0, budget - waited)))


def _error_name(exc: BaseException) -> str:
    from_boto = getattr(exc, "response", None)
    code = from_boto.get("Error", {}).get("Code") if isinstance(from_boto, dict) else None
    return f"{exc.__class__.__name__} {code}" if code else exc.__class__.__name__


class Storage:
    """Interface every scheme implements. Keys are relative, '/'-separated."""

    uri: str

    def put_file(self, local_path: str | os.PathLike, key: str) -> None:
        raise NotImplementedError

    def put_bytes(self, key: str, data: bytes) -> None:
        raise NotImplementedError

    def get_bytes(self, key: str) -> bytes:
        raise NotImplementedError

    def open_read(self, key: str) -> BinaryIO:
        """A streaming binary reader; the caller closes it."""
        raise NotImplementedError

    def digest(self, key: str) -> tuple[int, str]:
        """(size, sha256 hex) of an object, streamed: what a commit record is checked against."""
        with self.open_read(key) as stream:
            return stream_digest(stream)

    def move(self, key: str, new_key: str) -> None:
        """Move an object to another key (torn data is moved aside, not deleted)."""
        self.put_bytes(new_key, self.get_bytes(key))
        self.delete(key)

    def put_if_absent(self, key: str, data: bytes) -> bool:
        """Create `key` only if no object is there: True if this call created it."""
        raise NotImplementedError

    def put_if_unchanged(self, key: str, data: bytes, version: str) -> bool:
        """Replace `key` only if its version tag is still `version` (see `version_of`): True if replaced."""
        raise NotImplementedError

    def version_of(self, key: str) -> str | None:
        """The object's version tag (ETag on S3, content digest locally), None if absent."""
        raise NotImplementedError

    def exists(self, key: str) -> bool:
        raise NotImplementedError

    def list(self, prefix: str = "") -> list[str]:
        """Keys under `prefix` (a folder-like prefix), sorted."""
        raise NotImplementedError

    def delete(self, key: str) -> None:
        raise NotImplementedError

    def manifest(self, prefix: str = "") -> list[tuple[str, int, str]]:
        """(key relative to `prefix`, size, version tag) of every object under `prefix`,
        sorted: what a content-keyed cache hashes. The tag is the ETag on S3, mtime locally."""
        raise NotImplementedError

    def local_path(self, key: str) -> str | None:
        """A local filesystem path for `key`, or None for remote stores."""
        return None

    def url(self, key: str) -> str:
        return join_uri(self.uri, key)

    def upload_folder(self, folder: str | os.PathLike, prefix: str) -> None:
        """Every file under a local folder to `prefix/<relative path>`."""
        folder = Path(folder)
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                self.put_file(path, join_key(prefix, path.relative_to(folder).as_posix()))

    def download_prefix(self, prefix: str, folder: str | os.PathLike) -> None:
        """Every object under `prefix` to a local folder, streamed to disk."""
        strip = len(prefix.rstrip("/")) + 1 if prefix.strip("/") else 0
        root = Path(folder).resolve()
        for key in self.list(prefix):
            target = (root / key[strip:].lstrip("/")).resolve()
            if root not in target.parents:  # a key like "../x" must never write outside the folder
                raise StorageError(f"{self.url(key)}: key leaves the target folder; refusing to download it")
            target.parent.mkdir(parents=True, exist_ok=True)
            self.download(key, target)

    def download(self, key: str, target: Path) -> None:
        """One object to a local file."""
        with self.open_read(key) as src, open(target, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)

    def arrow_location(self, key: str):
        """(pyarrow filesystem or None, path) for readers such as Ray Data and pyarrow.parquet."""
        return None, self.local_path(key)

    def check_writable(self) -> None:
        """Fail early, before any work is done, if the root cannot be written."""
        probe = ".pgraft-write-probe"
        self.put_bytes(probe, b"ok")
        self.delete(probe)


def stream_digest(stream: BinaryIO) -> tuple[int, str]:
    """(size, sha256 hex) of a binary stream, read in 1 MiB chunks."""
    sha, size = hashlib.sha256(), 0
    for chunk in iter(lambda: stream.read(1 << 20), b""):
        sha.update(chunk)
        size += len(chunk)
    return size, sha.hexdigest()


def without_credentials(url: str) -> str:
    """`url` as it may be shown: an endpoint such as http://key:secret@host:9000 carries
    credentials in its user part, which no message or record repeats."""
    parsed = urlparse(url)
    if parsed.username is None and parsed.password is None:
        return url
    return parsed._replace(netloc=parsed.netloc.rpartition("@")[2]).geturl()


def join_key(prefix: str, name: str) -> str:
    """`prefix/name` for keys, with no leading slash when the prefix is empty (the root)."""
    return f"{prefix.strip('/')}/{name}" if prefix.strip("/") else name


def join_uri(base: str, key: str) -> str:
    if not key:
        return base
    return base.rstrip("/") + "/" + key.lstrip("/")


class LocalStorage(Storage):
    def __init__(self, root: str):
        self.root = Path(root).expanduser().absolute()
        self.uri = str(self.root)

    def _path(self, key: str) -> Path:
        return self.root / key if key else self.root

    def _atomic_write(self, key: str, writer: Callable[[BinaryIO], None]) -> None:
        target = self._path(key)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        except OSError as exc:
            raise StorageError(f"cannot write {target}: {exc.strerror or exc}") from None
        try:
            with os.fdopen(fd, "wb") as f:
                writer(f)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def put_file(self, local_path, key):
        def copy(f):
            with open(local_path, "rb") as src:
                shutil.copyfileobj(src, f, length=1 << 20)

        self._atomic_write(key, copy)

    def put_bytes(self, key, data):
        self._atomic_write(key, lambda f: f.write(data))

    def get_bytes(self, key):
        with self.open_read(key) as f:
            return f.read()

    def open_read(self, key):
        try:
            return open(self._path(key), "rb")
        except FileNotFoundError:
            raise StorageError(f"{self.url(key)} does not exist") from None

    def exists(self, key):
        return self._path(key).is_file()

    def list(self, prefix=""):
        base = self._path(prefix)
        if not base.is_dir():
            return []
        keys = []
        for dirpath, _, files in os.walk(base):
            for name in files:
                if name.startswith(".") and name.endswith((".tmp", ".lock")):
                    continue  # an interrupted atomic write or a conditional write's lock file, never a real object
                rel = Path(dirpath, name).relative_to(self.root)
                keys.append(rel.as_posix())
        return sorted(keys)

    def delete(self, key):
        self._path(key).unlink(missing_ok=True)

    def manifest(self, prefix=""):
        strip = len(prefix.rstrip("/")) + 1 if prefix.strip("/") else 0
        out = []
        for key in self.list(prefix):
            stat = self._path(key).stat()
            out.append((key[strip:], stat.st_size, str(stat.st_mtime_ns)))
        return out

    def local_path(self, key):
        return str(self._path(key))

    def move(self, key, new_key):
        target = self._path(new_key)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self._path(key), target)

    # Conditional writes. Creation is atomic (a hard link fails where a file exists); a replace
    # compares and swaps under an flock of a sidecar file: atomic between processes of one host
    # (and on file systems whose flock is shared, such as most NFS v4 mounts).
    def put_if_absent(self, key, data):
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.link(tmp, target)
            return True
        except FileExistsError:
            return False
        finally:
            Path(tmp).unlink(missing_ok=True)

    def put_if_unchanged(self, key, data, version):
        import fcntl

        target = self._path(key)
        with open(target.parent / f".{target.name}.lock", "a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if self.version_of(key) != version:
                return False
            self.put_bytes(key, data)
            return True

    def version_of(self, key):
        try:
            return hashlib.sha256(self._path(key).read_bytes()).hexdigest()
        except FileNotFoundError:
            return None


# S3 -------------------------------------------------------------------------------------

_CREDENTIAL_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "ExpiredToken",
                     "InvalidClientTokenId", "InvalidToken", "UnrecognizedClientException"}
# Multipart above this size: large shards upload in parallel parts and retry per part.
MULTIPART_THRESHOLD = 64 * 1024 * 1024


class S3Storage(Storage):
    def __init__(self, uri: str):
        parsed = urlparse(uri)
        self.bucket = parsed.netloc
        self.prefix = parsed.path.strip("/")
        if not self.bucket:
            raise StorageError(f"{uri!r} has no bucket; expected s3://bucket/prefix")
        self.uri = f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"
        self.endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        self._client = None

    @property
    def client(self):
        # Created lazily so the store pickles cleanly into Ray actors; from a session of its own
        # because boto3's default session is not thread-safe (generate actors upload from two
        # threads). A race creates two clients, and either one serves.
        if self._client is None:
            import boto3
            from botocore.config import Config as BotoConfig

            attempts = int(os.environ.get("PGRAFT_S3_MAX_ATTEMPTS", "5"))
            self._client = boto3.session.Session().client(
                "s3",
                endpoint_url=self.endpoint,
                config=BotoConfig(
                    retries={"max_attempts": attempts, "mode": "standard"},  # bounded, exponential backoff
                    connect_timeout=float(os.environ.get("PGRAFT_S3_CONNECT_TIMEOUT", "10")),
                    read_timeout=60,
                ),
            )
        return self._client

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_client"] = None
        return state

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _where(self) -> str:
        return f" at endpoint {without_credentials(self.endpoint)}" if self.endpoint else ""

    def _translate(self, exc: Exception, key: str) -> StorageError:
        """Map boto errors to one line; credentials are named by variable, never by value."""
        from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

        target = self.url(key)
        if isinstance(exc, ClientError):
            code = exc.response.get("Error", {}).get("Code", "")
            if code == "NoSuchBucket":
                return StorageError(f"S3 bucket {self.bucket!r} does not exist{self._where()}; create it or fix run.uri")
            if code in _CREDENTIAL_CODES or code in {"403", "Forbidden"}:
                return StorageError(
                    f"S3 refused the credentials for {target}{self._where()} ({code}); "
                    "check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_PROFILE"
                )
            if code in {"NoSuchKey", "404", "NotFound"}:
                return StorageError(f"{target} does not exist")
            return StorageError(f"S3 error on {target}{self._where()}: {code}")
        if isinstance(exc, EndpointConnectionError):
            shown = without_credentials(self.endpoint) if self.endpoint else "(AWS default)"
            return StorageError(f"cannot reach S3 endpoint {shown} for {target}")
        if isinstance(exc, NoCredentialsError):
            return StorageError(f"no S3 credentials found for {target}; set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY")
        return StorageError(f"S3 error on {target}{self._where()}: {exc.__class__.__name__}")

    def _call(self, key: str, fn: Callable):
        """`fn()`, riding out an unreachable store (`ride_out`), with boto's errors as one line."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return ride_out(fn, _transient, f"{self.url(key)}{self._where()}")
        except (ClientError, BotoCoreError) as exc:
            raise self._translate(exc, key) from None
        except StorageError:
            raise
        except Exception as exc:  # s3transfer wraps client errors
            cause = _boto_cause(exc)
            if cause is not None:
                raise self._translate(cause, key) from None
            raise

    def put_file(self, local_path, key):
        from boto3.s3.transfer import TransferConfig

        cfg = TransferConfig(multipart_threshold=MULTIPART_THRESHOLD, multipart_chunksize=MULTIPART_THRESHOLD // 4)
        self._call(key, lambda: self.client.upload_file(str(local_path), self.bucket, self._key(key), Config=cfg))

    def put_bytes(self, key, data):
        self._call(key, lambda: self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data))

    def get_bytes(self, key):
        # The body is read inside the retried call: a connection cut mid-body is fetched again.
        return self._call(key, lambda: self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read())

    def open_read(self, key):
        response = self._call(key, lambda: self.client.get_object(Bucket=self.bucket, Key=self._key(key)))
        return response["Body"]

    def digest(self, key):
        # Fetched and hashed inside one retried call: a body cut mid-stream is hashed again from the start.
        return self._call(key, lambda: stream_digest(self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"]))

    def download(self, key, target):
        # Retried whole: s3transfer writes a temp file and renames it, so a cut leaves nothing half-written.
        self._call(key, lambda: self.client.download_file(self.bucket, self._key(key), str(target)))

    def exists(self, key):
        return self._call(key, lambda: self._head(key) is not None)

    def _head(self, key):
        from botocore.exceptions import ClientError

        try:
            return self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in {"404", "NoSuchKey", "NotFound"}:
                return None
            raise

    def list(self, prefix=""):
        full = self._key(prefix).rstrip("/")
        full = f"{full}/" if full else ""
        strip = len(self.prefix) + 1 if self.prefix else 0

        def run():
            keys = []
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full):
                keys.extend(obj["Key"][strip:] for obj in page.get("Contents", []))
            return sorted(keys)

        return self._call(prefix, run)

    def delete(self, key):
        self._call(key, lambda: self.client.delete_object(Bucket=self.bucket, Key=self._key(key)))

    def move(self, key, new_key):
        self._call(key, lambda: self.client.copy_object(Bucket=self.bucket, Key=self._key(new_key),
                                                        CopySource={"Bucket": self.bucket, "Key": self._key(key)}))
        self.delete(key)

    # Conditional writes (S3's If-None-Match / If-Match on PUT, on AWS since 2024; moto has them).
    # A PUT retried after a cut may find its own first attempt: callers compare the content.
    def put_if_absent(self, key, data):
        return self._conditional(key, lambda: self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data,
                                                                     IfNoneMatch="*"))

    def put_if_unchanged(self, key, data, version):
        return self._conditional(key, lambda: self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data,
                                                                     IfMatch=version))

    def _conditional(self, key, put) -> bool:
        from botocore.exceptions import ClientError

        def attempt():
            try:
                put()
                return True
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") in {"PreconditionFailed", "412", "ConditionalRequestConflict",
                                                                 "NoSuchKey", "404"}:
                    return False
                raise

        return self._call(key, attempt)

    def version_of(self, key):
        head = self._call(key, lambda: self._head(key))
        return head["ETag"] if head is not None else None

    def manifest(self, prefix=""):
        full = self._key(prefix).rstrip("/")
        full = f"{full}/" if full else ""

        def run():
            out = []
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full):
                out.extend((obj["Key"][len(full):], int(obj["Size"]), obj["ETag"].strip('"'))
                           for obj in page.get("Contents", []))
            return sorted(out)

        return self._call(prefix, run)

    def arrow_location(self, key: str):
        return self.arrow_filesystem(), f"{self.bucket}/{self._key(key)}"

    def arrow_filesystem(self):
        """pyarrow's S3 filesystem with the same endpoint, for Parquet readers."""
        from pyarrow import fs

        kwargs = {}
        if self.endpoint:
            parsed = urlparse(self.endpoint)
            kwargs = {"endpoint_override": parsed.netloc, "scheme": parsed.scheme or "https"}
        # pgraft's own reads go through boto3 (ride_out); pyarrow's filesystem, for users' readers,
        # retries with its own strategy, given about one attempt per 5 s of the outage budget.
        retry = fs.AwsStandardS3RetryStrategy(max_attempts=max(3, int(outage_s() // 5)))
        return fs.S3FileSystem(region=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"), retry_strategy=retry, **kwargs)


# Server answers worth waiting out: the store is overloaded or restarting, not refusing us.
_TRANSIENT_CODES = {"500", "502", "503", "504", "InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout",
                    "RequestTimeTooSkewed"}


def _boto_cause(exc: BaseException):
    """The botocore error behind `exc` (s3transfer wraps them), or None."""
    from botocore.exceptions import BotoCoreError, ClientError

    for candidate in (exc, exc.__cause__, exc.__context__):
        if isinstance(candidate, (ClientError, BotoCoreError)):
            return candidate
    return None


def _transient(exc: BaseException) -> bool:
    """Whether an S3 call's failure means "not reachable now": a connection refused, reset,
    closed mid-body or timed out, or a 5xx answer."""
    from botocore.exceptions import ClientError, ConnectionError, HTTPClientError, IncompleteReadError

    try:
        from botocore.exceptions import ResponseStreamingError
    except ImportError:  # older botocore
        ResponseStreamingError = HTTPClientError
    cause = _boto_cause(exc)
    if isinstance(cause, ClientError):
        return str(cause.response.get("Error", {}).get("Code", "")) in _TRANSIENT_CODES
    if isinstance(cause, (ConnectionError, HTTPClientError, IncompleteReadError, ResponseStreamingError)):
        return True
    # A body read cut mid-stream surfaces from urllib3 as ProtocolError / IncompleteRead.
    return exc.__class__.__name__ in {"ProtocolError", "IncompleteRead", "ReadTimeoutError", "ConnectionResetError"}


def _local(uri: str) -> Storage:
    return LocalStorage(urlparse(uri).path if uri.startswith("file://") else uri)


# Scheme dispatch table: add a scheme by adding a constructor here.
SCHEMES: dict[str, Callable[[str], Storage]] = {"": _local, "file": _local, "s3": S3Storage}


def open_storage(uri: str) -> Storage:
    scheme = urlparse(uri).scheme if "://" in uri else ""
    try:
        factory = SCHEMES[scheme]
    except KeyError:
        raise StorageError(f"unsupported storage scheme {scheme!r} in {uri!r}; supported: {sorted(s for s in SCHEMES if s)} or a local path") from None
    return factory(uri)


class staged_folder:
    """`with staged_folder(storage, prefix) as folder:` write a folder locally; on success it is
    uploaded (remote storage) or moved into place (local), so a reader never sees half of it."""

    def __init__(self, storage: Storage, prefix: str):
        self.storage, self.prefix = storage, prefix
        self.local = storage.local_path(prefix)
        base = Path(self.local).parent if self.local else None
        if base is not None:
            base.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=".model-", dir=base))

    def __enter__(self) -> Path:
        return self.tmp

    def __exit__(self, exc_type, *_):
        if exc_type is None:
            if self.local:
                shutil.rmtree(self.local, ignore_errors=True)
                os.replace(self.tmp, self.local)
            else:
                self.storage.upload_folder(self.tmp, self.prefix)
        shutil.rmtree(self.tmp, ignore_errors=True)
        return False
