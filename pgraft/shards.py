"""WebDataset shards of rollouts: encode, write, commit, list, read back (docs/DESIGN.md §2).

A shard is data, never code: members are `.latents.safetensors`, the decoded sample in its
kind's member (`.png` for images, `.smiles.json` for molecules; pgraft.samples), an optional
`.png` view of a non-image sample, and `.json`; the reader refuses anything else. A shard counts once its commit record exists; the
record carries the tar's size and sha256 so readers catch torn or replaced shards.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import webdataset as wds
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from pgraft import contract
from pgraft.commits import list_committed, list_committed_at  # noqa: F401 - re-exported
from pgraft.contract import CommitRecord, SampleMeta
from pgraft.errors import PgraftError
from pgraft.samples import IMAGE, SAMPLE_EXTS, SAMPLE_KINDS, VIEW_EXT, decode_png, encode_png, kind_of_ext  # noqa: F401 - re-exported
from pgraft.storage import Storage

# Tar members per sample (the part after the key).
LATENTS_EXT = "latents.safetensors"
IMAGE_EXT = IMAGE.ext
META_EXT = "json"
ALLOWED_EXTS = (LATENTS_EXT, *SAMPLE_EXTS, META_EXT)
# What readers that need the decoded samples but not the latents ask for (reward, evaluate, report).
DECODED = (*SAMPLE_EXTS, META_EXT)
# Fixed member mtime: the same samples give byte-identical tars (resume and determinism).
TAR_MTIME = 0.0


class ShardError(PgraftError):
    """A shard is torn, replaced, or holds something that is not sample data."""


@dataclass
class Sample:
    meta: SampleMeta
    latents: dict[str, torch.Tensor]  # x_T, x_<k> ..., x_0; float32, CPU, contiguous
    # The decoded sample, of the task's sample kind (pgraft.samples): a uint8 image (HxW grey or
    # HxWx3), a SMILES string, …; None for latents without one.
    decoded: object | None
    kind: str = IMAGE.name  # the sample kind of `decoded`
    view: np.ndarray | None = None  # a uint8 image of a non-image sample, stored as `.png` for viewing only

    @property
    def key(self) -> str:
        return self.meta.key


def encode_sample(sample: Sample) -> dict[str, object]:
    tensors = {name: t.detach().to("cpu", torch.float32).contiguous() for name, t in sample.latents.items()}
    record = {"__key__": sample.key, LATENTS_EXT: save_safetensors(tensors)}
    if sample.decoded is not None:
        kind = SAMPLE_KINDS[sample.kind]
        record[kind.ext] = kind.encode(sample.decoded)
        if sample.view is not None and kind.ext != VIEW_EXT:
            record[VIEW_EXT] = encode_png(sample.view)
    record[META_EXT] = sample.meta.to_json()
    return record


def write_shard(samples: list[Sample], path: str | Path, round_idx: int) -> CommitRecord:
    """Write `samples` to a tar at `path`; return the commit record describing it."""
    path = Path(path)
    with open(path, "wb") as f:
        writer = wds.TarWriter(f, encoder=False, mtime=TAR_MTIME)
        for sample in samples:
            writer.write(encode_sample(sample))
        writer.close()
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return CommitRecord(
        shard=path.name, count=len(samples), bytes=path.stat().st_size, sha256=digest.hexdigest(),
        keys=[s.key for s in samples], round=round_idx,
    )


def commit_shard(storage: Storage, local_tar: str | Path, record: CommitRecord, round_idx: int, shard_id: int) -> None:
    """Commit a generate shard of a round (see `commit_shard_at`)."""
    commit_shard_at(storage, contract.generate_prefix(round_idx), local_tar, record, shard_id)


def commit_shard_at(storage: Storage, prefix: str, local_tar: str | Path, record: CommitRecord, shard_id: int) -> None:
    """Upload the tar, then its commit record. A crash between the two leaves an uncommitted
    tar that listing ignores and a rerun overwrites."""
    storage.put_file(local_tar, contract.shard_key_at(prefix, shard_id))
    storage.put_bytes(contract.commit_key_at(prefix, shard_id), record.to_json())


def _decode_member(key: str, ext: str, data: bytes, sample: dict, meta_cls, where: str) -> None:
    try:
        if ext == LATENTS_EXT:
            tensors = load_safetensors(data)  # safetensors stores names sorted; restore sampling order
            sample["latents"] = {name: tensors[name] for name in sorted(tensors, key=contract.latent_order)}
        elif ext == META_EXT:
            sample["meta"] = meta_cls.from_json(data)
        elif kind_of_ext(ext) is not None:
            sample.setdefault("members", {})[ext] = kind_of_ext(ext).decode(data)
        else:
            raise ShardError(f"{where}: member {key}.{ext} is not sample data (only {', '.join(ALLOWED_EXTS)} are read)")
    except ShardError:
        raise
    except Exception as exc:  # noqa: BLE001 - any decoder's failure is a corrupt record: name it
        raise ShardError(f"{where}: record {key}, member .{ext} is corrupt ({exc.__class__.__name__}: {exc}); delete "
                         "the shard's commit record and rerun the stage that wrote it") from None


def read_shard_bytes(storage: Storage, round_idx: int, shard_id: int, record: CommitRecord | None = None) -> bytes:
    """A generate shard's tar bytes, checked against its commit record when one is given."""
    return read_shard_bytes_at(storage, contract.generate_prefix(round_idx), shard_id, record, "rerun generate")


def read_shard_bytes_at(storage: Storage, prefix: str, shard_id: int, record: CommitRecord | None, rerun: str) -> bytes:
    """The bytes of the tar `shard_id` under `prefix`, checked against its commit record when
    one is given; `rerun` is the command that rewrites a bad one."""
    key = contract.shard_key_at(prefix, shard_id)
    data = storage.get_bytes(key)
    if record is not None:
        if len(data) != record.bytes or hashlib.sha256(data).hexdigest() != record.sha256:
            raise ShardError(
                f"{storage.url(key)} does not match its commit record (size {len(data)} vs {record.bytes}); "
                f"the shard is torn or was replaced: {rerun} (the rerun moves it aside and writes it again)"
            )
    return data


def iter_tar_samples(data: bytes, where: str = "shard", wanted: tuple[str, ...] = ALLOWED_EXTS,
                     meta_cls=SampleMeta) -> Iterator[Sample]:
    """Decode samples from tar bytes, grouping members by key; `.json` members as `meta_cls`."""
    current: dict = {}
    current_key = None
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for info in tar:
                if not info.isreg():
                    continue
                key, _, ext = info.name.partition(".")
                if key != current_key:
                    if current:
                        yield _finish(current_key, current, where, wanted)
                    current, current_key = {}, key
                if ext in wanted:
                    _decode_member(key, ext, tar.extractfile(info).read(), current, meta_cls, where)
                elif ext not in ALLOWED_EXTS:
                    raise ShardError(f"{where}: member {info.name} is not sample data")
    except tarfile.TarError as exc:
        raise ShardError(f"{where} is not a readable tar ({exc}); delete its commit record and rerun the stage that "
                         "wrote it") from None
    if current_key is not None:
        yield _finish(current_key, current, where, wanted)


def _finish(key, parts, where, wanted) -> Sample:
    needed = {LATENTS_EXT: "latents", META_EXT: "meta"}
    missing = [ext for ext in wanted if ext in needed and needed[ext] not in parts]
    members = parts.get("members", {})
    if any(ext in SAMPLE_EXTS for ext in wanted) and not members:
        missing.append("a decoded sample (" + ", ".join(ext for ext in wanted if ext in SAMPLE_EXTS) + ")")
    if missing:
        raise ShardError(f"{where}: sample {key} lacks {', '.join(missing)}")
    # The decoded sample is the member of a non-image kind when there is one (its .png is then a view).
    own = [ext for ext in members if ext != VIEW_EXT]
    ext = own[0] if own else (VIEW_EXT if VIEW_EXT in members else None)
    decoded = members.get(ext) if ext else None
    view = members.get(VIEW_EXT) if own else None
    meta = parts.get("meta") or SampleMeta(key=key, prompt="", prompt_id=-1, sample_idx=-1, seed=-1, round=-1,
                                           model="", model_kind="", scheduler="", num_inference_steps=0, guidance_scale=0.0)
    return Sample(meta=meta, latents=parts.get("latents", {}), decoded=decoded,
                  kind=kind_of_ext(ext).name if ext else IMAGE.name, view=view)


def read_shard(storage: Storage, round_idx: int, shard_id: int, record: CommitRecord | None = None,
               wanted: tuple[str, ...] = ALLOWED_EXTS) -> list[Sample]:
    data = read_shard_bytes(storage, round_idx, shard_id, record)
    return list(iter_tar_samples(data, storage.url(contract.shard_key(round_idx, shard_id)), wanted))
