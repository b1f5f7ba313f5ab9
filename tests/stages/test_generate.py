"""Generate stage on a real local Ray (2 actors), local folders and a real S3 server."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import cluster
from pgraft import contract
from pipelines.cli import main as cli_main
from pgraft.config import ConfigError, load_config
from pgraft.models.adapters import ModelError
from pgraft.shards import list_committed, read_shard
from pgraft.storage import StorageError, open_storage
from stages import generate
from stages.generate import ActorClock, GenerateError, device_idle_fraction, plan_units, run_generate

REPO = Path(__file__).resolve().parents[2]


def small_config(model_path, uri, *extra):
    return load_config(None, [
        f"run.uri={uri}", f"model.path={model_path}", "model.num_inference_steps=10", "model.device=cpu",
        "generate.prompts=[a handwritten digit 1, a handwritten digit 2, a handwritten digit 3]",
        "generate.samples_per_prompt=6", "generate.samples_per_shard=4", "generate.batch_size=3",
        "generate.capture_steps=[2, 5, 8]", "generate.num_workers=2", *extra,
    ])


def shard_bytes(store, rnd=0):
    return {sid: store.get_bytes(contract.shard_key(rnd, sid)) for sid in list_committed(store, rnd)}


def test_plan_units_cover_every_sample_once():
    units = plan_units(3, 6, 4)
    items = [item for u in units for item in u.items]
    assert [u.shard_id for u in units] == [0, 1, 2, 3, 4]
    assert sorted(items) == [(p, s) for p in range(3) for s in range(6)] and len(set(items)) == 18


def test_device_idle_fraction_per_actor_averaged():
    busy, half = ActorClock(), ActorClock()
    for clock, units in ((busy, [(0.0, 4.0, 5.0), (4.0, 5.0, 10.0)]), (half, [(0.0, 2.0, 4.0), (4.0, 3.0, 10.0)])):
        for device_start, device_seconds, committed_at in units:
            clock.add({"device_start": device_start, "device_seconds": device_seconds, "committed_at": committed_at})
    assert (busy.idle_fraction, half.idle_fraction) == (pytest.approx(0.1), pytest.approx(0.5))
    assert device_idle_fraction([busy, half]) == pytest.approx(0.3) and device_idle_fraction([]) == 0.0


def test_generate_writes_committed_shards_on_two_actors(ray_local, tiny_digits, tmp_path):
    cfg = small_config(tiny_digits, tmp_path / "run")
    summary = run_generate(cfg, progress=False)
    assert (summary.units, summary.written, summary.skipped, summary.workers) == (5, 5, 0, 2)
    assert summary.samples_written == 18
    store = open_storage(cfg.run.uri)
    committed = list_committed(store, 0)
    assert sorted(committed) == [0, 1, 2, 3, 4]
    samples = [s for sid, rec in committed.items() for s in read_shard(store, 0, sid, rec)]
    assert sorted(s.key for s in samples) == sorted(contract.sample_key(p, i) for p in range(3) for i in range(6))
    first = samples[0]
    assert list(first.latents) == ["x_T", "x_2", "x_5", "x_8", "x_0"]
    assert first.meta.captured_steps == {"x_2": 700, "x_5": 400, "x_8": 100}  # DDIM leading, 10 of 1000
    assert first.meta.seed == contract.sample_seed(0, 0, first.meta.prompt_id, first.meta.sample_idx)
    assert first.meta.prompt == f"a handwritten digit {first.meta.prompt_id + 1}"
    assert first.decoded.shape == (8, 8)
    assert store.exists(contract.CONFIG_KEY)
    assert "round 0" in summary.render() and "x_5 (t=400)" in summary.render()
    assert summary.bytes_written == sum(rec.bytes for rec in committed.values()) > 0
    assert summary.device_seconds > 0 and 0 <= summary.device_idle_fraction <= 1
    assert "kB per sample" in summary.render() and "idle" in summary.render() and "idle" not in summary.headline()


def test_same_config_same_bytes_other_seed_differs(ray_local, tiny_digits, tmp_path, monkeypatch):
    a = small_config(tiny_digits, tmp_path / "a")
    b = small_config(tiny_digits, tmp_path / "b")
    c = small_config(tiny_digits, tmp_path / "c", "run.seed=1")
    # One worker with two threads instead of two with one: the same samples up to float
    # summation order (bit equality holds for equal threads per worker).
    d = small_config(tiny_digits, tmp_path / "d", "generate.num_workers=1")
    with cluster.keep_warm():  # a runs on the pool c used: its actors rebuild their worker for a's run
        for cfg in (c, a):
            run_generate(cfg, progress=False)  # two units in flight per actor: rollouts overlap shard writing
    run_generate(d, progress=False)
    monkeypatch.setattr(generate, "CALLS_PER_ACTOR", 1)
    run_generate(b, progress=False)  # one unit at a time per actor, as before the overlap, on a pool of its own
    assert shard_bytes(open_storage(a.run.uri)) == shard_bytes(open_storage(b.run.uri))

    def latents(cfg):
        store = open_storage(cfg.run.uri)
        return [s.latents for sid in sorted(list_committed(store, 0)) for s in read_shard(store, 0, sid)]

    for la, lc, ld in zip(latents(a), latents(c), latents(d)):
        assert not torch.equal(la["x_T"], lc["x_T"]) and not torch.allclose(la["x_0"], lc["x_0"], atol=1e-2)
        assert torch.equal(la["x_T"], ld["x_T"])
        for name in la:
            torch.testing.assert_close(la[name], ld[name], rtol=0, atol=1e-4)


def test_resume_redoes_only_the_uncommitted_unit(ray_local, warm_pools, tiny_digits, tmp_path):
    # Every rerun runs on the first run's actor (warm_pools): a kept actor writes the same bytes too.
    cfg = small_config(tiny_digits, tmp_path / "run", "generate.num_workers=1")
    run_generate(cfg, progress=False)
    store = open_storage(cfg.run.uri)
    before = shard_bytes(store)
    mtimes = {sid: os.stat(store.local_path(contract.shard_key(0, sid))).st_mtime_ns for sid in before}
    store.delete(contract.commit_key(0, 3))  # as if the worker died between tar and record

    summary = run_generate(cfg, progress=False)
    assert (summary.written, summary.skipped) == (1, 4)
    assert shard_bytes(store) == before
    for sid, mtime in mtimes.items():
        now = os.stat(store.local_path(contract.shard_key(0, sid))).st_mtime_ns
        assert (now != mtime) == (sid == 3), f"shard {sid}"

    again = run_generate(cfg, progress=False)  # nothing left to do: no Ray work, nothing rewritten
    assert (again.written, again.skipped, again.workers) == (0, 5, 0)

    # A torn shard (a node died mid-write on a store without atomic puts; a replaced object):
    # the rerun moves it and its record aside under torn/ and writes it again, byte-identical.
    torn_path = store.local_path(contract.shard_key(0, 1))
    with open(torn_path, "r+b") as f:
        f.truncate(os.path.getsize(torn_path) // 2)
    redone = run_generate(cfg, progress=False)
    assert (redone.written, redone.skipped, redone.torn) == (1, 4, 1)
    assert "1 torn ones redone" in redone.headline()
    assert shard_bytes(store) == before
    aside = store.list(contract.TORN_DIR)
    assert sorted(k.rsplit(".", 1)[0] for k in aside) == [f"torn/{contract.commit_key(0, 1)}", f"torn/{contract.shard_key(0, 1)}"]


def test_generate_to_s3(ray_local, warm_pools, tiny_digits, s3_uri, tmp_path):
    cfg = small_config(tiny_digits, s3_uri)
    summary = run_generate(cfg, progress=False)
    assert summary.written == 5
    store = open_storage(s3_uri)
    assert sorted(list_committed(store, 0)) == [0, 1, 2, 3, 4]
    local = small_config(tiny_digits, tmp_path / "local")
    run_generate(local, progress=False)  # on the S3 run's actors (warm_pools)
    assert shard_bytes(store) == shard_bytes(open_storage(local.run.uri))  # same samples wherever they land


def test_changed_config_is_refused(ray_local, tiny_digits, tmp_path):
    run_generate(small_config(tiny_digits, tmp_path / "run"), progress=False)
    with pytest.raises(GenerateError, match="started with generate.samples_per_prompt=6, this config has 7"):
        run_generate(small_config(tiny_digits, tmp_path / "run", "generate.samples_per_prompt=7"), progress=False)


@pytest.mark.parametrize("case", ["missing_model", "step_out_of_range", "prompts_file_missing", "prompts_file_empty",
                                  "unwritable_uri"])
def test_bad_input_is_one_line_and_leaves_nothing_committed(case, tiny_digits, tmp_path, capsys):
    uri = tmp_path / "run"
    extra = {
        "missing_model": [f"model.path={tmp_path / 'no-model'}"],
        "step_out_of_range": ["generate.capture_steps=[3, 10]"],
        "prompts_file_missing": [f"generate.prompts={tmp_path / 'prompts.txt'}"],
        "prompts_file_empty": [f"generate.prompts={tmp_path / 'empty.txt'}"],
        "unwritable_uri": [f"run.uri={tmp_path / 'blocker' / 'run'}"],
    }[case]
    (tmp_path / "empty.txt").write_text("\n  \n")
    (tmp_path / "blocker").write_text("a file where a folder should be")
    expected = {
        "missing_model": (ModelError, "model.path .*no-model' does not exist"),
        "step_out_of_range": (ModelError, r"capture_steps: \[10\] out of range; step indices must lie in 1..9"),
        "prompts_file_missing": (ConfigError, "prompts file .* does not exist"),
        "prompts_file_empty": (ConfigError, "prompts file .* is empty"),
        "unwritable_uri": (StorageError, "cannot write"),
    }[case]
    cfg = small_config(tiny_digits, uri, *extra)
    with pytest.raises(expected[0], match=expected[1]):
        run_generate(cfg, progress=False)
    assert list_committed(open_storage(str(uri)), 0) == {}

    args = ["generate", "--quiet", "--set", f"run.uri={uri}", "--set", f"model.path={tiny_digits}"]
    for item in extra + ["model.num_inference_steps=10"]:
        args += ["--set", item]
    assert cli_main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("pgraft generate: error:") and "\n" not in err


def test_bad_s3_endpoint_and_missing_bucket(tiny_digits, s3_endpoint, monkeypatch):
    from conftest import free_port

    with pytest.raises(StorageError, match="bucket 'pgraft-missing' does not exist"):
        run_generate(small_config(tiny_digits, "s3://pgraft-missing/run"), progress=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    with pytest.raises(StorageError, match=r"storage unreachable for \d+ s \(s3://bucket/run/\S+ at endpoint "
                                           r"http://127.0.0.1:\d+: EndpointConnectionError\); gave up after "
                                           r"storage.outage_s=1;"):
        run_generate(small_config(tiny_digits, "s3://bucket/run", "storage.outage_s=1"), progress=False)


@pytest.mark.cluster
@pytest.mark.ray
def test_cli_against_ray_start_head_cluster(tiny_digits, tmp_path):
    """`ray start --head` (and a worker node) in their own processes, token auth on; the CLI
    joins through RAY_ADDRESS, and its actors run on the worker node."""
    from cluster import loopback

    with loopback.running(num_cpus=2, timeout=90) as rig:
        args = [sys.executable, "-m", "stages.generate", "--quiet", "--set", f"run.uri={tmp_path / 'run'}",
                "--set", f"model.path={tiny_digits}", "--set", "model.num_inference_steps=10",
                "--set", "generate.samples_per_prompt=2", "--set", "generate.capture_steps=[5]"]
        out = subprocess.run(args, cwd=REPO, env=rig.client_env(dict(os.environ)), capture_output=True, text=True,
                             timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        assert "1 planned, 0 already committed, 1 written now" in out.stdout  # 20 samples, 128 per shard


def test_cuda_without_gpus_is_refused(ray_local, tiny_digits, tmp_path):
    from cluster import WorkerError

    # Declared, so an autoscaler could add a GPU node; none comes, and the wait ends with one line.
    with pytest.raises(WorkerError, match=r"GenerateWorker actors: 2 × \{'CPU': 1, 'GPU': 1\} could not be placed "
                                          r"within 2 s: no node offers GPU ≥ 1"):
        run_generate(small_config(tiny_digits, tmp_path / "run", "model.device=cuda", "cluster.placement_timeout_s=2"),
                     progress=False)
    assert list_committed(open_storage(str(tmp_path / "run")), 0) == {}


def test_killed_actor_is_restarted_and_the_shards_equal_an_uninterrupted_run(ray_local, tiny_digits, tmp_path):
    from helpers import KillWhen

    more = ("generate.samples_per_prompt=12",)  # 9 units over 2 actors
    run_generate(small_config(tiny_digits, tmp_path / "ref", *more), progress=False)
    cfg = small_config(tiny_digits, tmp_path / "run", *more)
    store = open_storage(cfg.run.uri)
    killer = KillWhen(lambda: len(store.list(contract.generate_prefix(0))) >= 2, "ray::GenerateWorker")
    summary = run_generate(cfg, progress=False)
    assert killer.join() is not None, "no generate actor was killed"
    assert summary.written == 9 and summary.samples_written == 36
    assert shard_bytes(store) == shard_bytes(open_storage(str(tmp_path / "ref")))
    keys = [k for rec in list_committed(store, 0).values() for k in rec.keys]
    assert len(keys) == len(set(keys)) == 36  # every sample exactly once
