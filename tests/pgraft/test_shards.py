"""Shard round trip (bit-exact latents, intact json/png), commit semantics, torn shards, no pickle."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
import torch

from pgraft import contract
from pgraft.contract import SampleMeta
from pgraft.shards import DECODED, Sample, ShardError, commit_shard, iter_tar_samples, list_committed, read_shard, write_shard
from pgraft.storage import open_storage


def make_samples(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    samples = []
    for i in range(n):
        meta = SampleMeta(key=contract.sample_key(0, i), prompt="a handwritten digit 0", prompt_id=0, sample_idx=i,
                          seed=100 + i, round=0, model="m", model_kind="class_unet", scheduler="DDIMScheduler",
                          num_inference_steps=20, guidance_scale=0.7, captured_steps={"x_5": 700},
                          timesteps=[950.0, 900.0])
        latents = {"x_T": torch.randn(1, 8, 8, generator=g), "x_5": torch.randn(1, 8, 8, generator=g),
                   "x_0": torch.randn(1, 8, 8, generator=g)}
        image = np.random.default_rng(i).integers(0, 256, (8, 8), dtype=np.uint8)
        samples.append(Sample(meta, latents, image))
    return samples


@pytest.mark.parametrize("where", ["local", pytest.param("s3", marks=pytest.mark.s3)])
def test_round_trip_is_exact(where, tmp_path, request):
    uri = str(tmp_path / "run") if where == "local" else request.getfixturevalue("s3_uri")
    store = open_storage(uri)
    samples = make_samples()
    record = write_shard(samples, tmp_path / "shard-000000.tar", 0)
    commit_shard(store, tmp_path / "shard-000000.tar", record, 0, 0)
    back = read_shard(store, 0, 0, list_committed(store, 0)[0])
    assert [s.key for s in back] == record.keys == [s.key for s in samples]
    for a, b in zip(samples, back):
        assert a.meta == b.meta
        assert np.array_equal(a.decoded, b.decoded) and b.kind == "image"
        assert list(a.latents) == list(b.latents)
        for name in a.latents:
            assert torch.equal(a.latents[name], b.latents[name])  # bit-exact


def test_tar_bytes_are_reproducible(tmp_path):
    r1 = write_shard(make_samples(), tmp_path / "a.tar", 0)
    r2 = write_shard(make_samples(), tmp_path / "b.tar", 0)
    assert r1.sha256 == r2.sha256 and (tmp_path / "a.tar").read_bytes() == (tmp_path / "b.tar").read_bytes()


def test_members_are_data_only(tmp_path):
    write_shard(make_samples(), tmp_path / "s.tar", 0)
    with tarfile.open(tmp_path / "s.tar") as tar:
        names = tar.getnames()
    assert {n.split(".", 1)[1] for n in names} == {"latents.safetensors", "png", "json"}


def test_pickle_member_is_refused():
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        payload = b"\x80\x04K\x01."  # a pickle: never to be loaded
        info = tarfile.TarInfo("p000000_s00000.pyd")
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    with pytest.raises(ShardError, match="not sample data"):
        list(iter_tar_samples(buf.getvalue()))


def test_uncommitted_tar_is_not_listed(tmp_path):
    store = open_storage(str(tmp_path / "run"))
    record = write_shard(make_samples(), tmp_path / "t.tar", 0)
    store.put_file(tmp_path / "t.tar", contract.shard_key(0, 0))  # tar uploaded, record not yet written
    assert list_committed(store, 0) == {}
    commit_shard(store, tmp_path / "t.tar", record, 0, 0)
    assert list(list_committed(store, 0)) == [0]
    store.delete(contract.shard_key(0, 0))  # a record whose tar vanished does not count either
    assert list_committed(store, 0) == {}


def test_torn_shard_is_caught(tmp_path):
    store = open_storage(str(tmp_path / "run"))
    record = write_shard(make_samples(), tmp_path / "t.tar", 0)
    commit_shard(store, tmp_path / "t.tar", record, 0, 0)
    path = store.local_path(contract.shard_key(0, 0))
    with open(path, "r+b") as f:
        f.truncate(record.bytes // 2)
    with pytest.raises(ShardError, match="torn or was replaced: rerun generate \\(the rerun moves it aside"):
        read_shard(store, 0, 0, record)


def test_molecule_samples_are_json_strings_with_an_optional_view(tmp_path):
    samples = make_samples(2)
    samples[0] = Sample(samples[0].meta, samples[0].latents, "C(O)C", "smiles", np.zeros((4, 4, 3), np.uint8))
    samples[1] = Sample(samples[1].meta, samples[1].latents, "c1ccccc1", "smiles")
    write_shard(samples, tmp_path / "s.tar", 0)
    with tarfile.open(tmp_path / "s.tar") as tar:
        names = tar.getnames()
        assert json.loads(tar.extractfile(f"{samples[0].key}.smiles.json").read()) == {"smiles": "C(O)C"}
    assert f"{samples[0].key}.png" in names and f"{samples[1].key}.png" not in names  # the view is optional
    back = list(iter_tar_samples((tmp_path / "s.tar").read_bytes(), wanted=DECODED))
    assert [(s.decoded, s.kind) for s in back] == [("C(O)C", "smiles"), ("c1ccccc1", "smiles")]
    assert back[0].view.shape == (4, 4, 3) and back[1].view is None and back[0].latents == {}


def test_a_corrupt_record_names_the_shard_and_key(tmp_path):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in (("p0000-s000000.smiles.json", b'{"smiles": 3}'), ("p0000-s000000.json", b"{}")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(ShardError, match=r"shard-000007\.tar: record p0000-s000000, member \.smiles\.json is corrupt"):
        list(iter_tar_samples(buf.getvalue(), "s3://b/run/shard-000007.tar", wanted=DECODED))
