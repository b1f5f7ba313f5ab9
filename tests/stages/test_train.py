"""Train stage on its Ray actor group: DeepSpeed on CPU/gloo, export and composite loading, two workers,
a killed train worker and a killed driver both resume to the same weights as an uninterrupted
run, LoRA, and one-line errors for bad input."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from cluster import WorkerError
from helpers import KillWhen, stage_config
from pgraft import contract
from pgraft.models.adapters import load_adapter
from stages.filter import run_filter
from stages.generate import run_generate
from stages.reward import run_reward
from stages.train import TrainError, global_batch, run_train
from stages.train.launch import steps_for_epochs

REPO = Path(__file__).resolve().parents[2]
TRAIN = ("train.selection=bo4", "train.t_step=3", "train.batch_size=8", "train.lr=1e-3")
# Long enough that a kill lands between the first checkpoint and the end.
LONG = ("train.steps=150", "train.checkpoint_every=25", "train.keep_checkpoints=10")


@pytest.fixture(scope="module")
def selected_run(tmp_path_factory, tiny_digits, classifier_dir, s3_endpoint, _ray_session_shutdown):
    from conftest import ensure_local_ray

    ensure_local_ray()
    root = tmp_path_factory.mktemp("train") / "run"
    cfg = stage_config(tiny_digits, root, classifier_dir, "filter.name=bo4", "filter.n=4")
    run_generate(cfg, progress=False)
    run_reward(cfg, progress=False)
    run_filter(cfg, progress=False)
    return root


@pytest.fixture
def run_dir(selected_run, tmp_path):
    shutil.copytree(selected_run, tmp_path / "run")
    return tmp_path / "run"


@pytest.fixture(scope="module")
def straight_weights(selected_run, tiny_digits, classifier_dir, tmp_path_factory):
    """The reference: LONG training that nobody interrupts."""
    root = tmp_path_factory.mktemp("straight") / "run"
    shutil.copytree(selected_run, root)
    run_train(stage_config(tiny_digits, root, classifier_dir, *TRAIN, *LONG, "train.name=long"), progress=False)
    return unet_weights(root, "long")


def unet_weights(run_dir, name):
    return load_file(Path(run_dir) / "round-000/train" / name / "model/unet/diffusion_pytorch_model.safetensors")


def checkpoint_registered(run_dir, name, step):
    """The group has registered the checkpoint (its record in storage names it): only then does a
    restart resume from it (one still being written when a worker dies is lost)."""
    snapshot = Path(run_dir) / f"round-000/train/{name}/checkpoints/registered.json"

    def registered() -> bool:
        try:
            return f"step{step:07d}" in snapshot.read_text()
        except OSError:
            return False

    return registered


def test_global_batches_are_seeded_epoch_permutations():
    first = global_batch(10, 4, 0, 0).tolist() + global_batch(10, 4, 1, 0).tolist() + global_batch(10, 4, 2, 0).tolist()
    assert sorted(first[:10]) == list(range(10))  # one epoch covers every sample once
    assert global_batch(10, 4, 1, 0).tolist() == global_batch(10, 4, 1, 0).tolist()
    assert global_batch(10, 4, 1, 0).tolist() != global_batch(10, 4, 1, 1).tolist()


def test_epochs_set_the_steps_from_the_accepted_count():
    assert steps_for_epochs(40, 160, 64) == 100  # 40 passes over 160 latents in batches of 64
    assert steps_for_epochs(2, 4, 4) == 2 and steps_for_epochs(1.5, 10, 4) == 4  # a partial batch counts
    assert steps_for_epochs(0.01, 4, 64) == 1  # never zero steps


@pytest.mark.deepspeed
def test_train_exports_a_model_the_generate_stage_samples_from(run_dir, tiny_digits, classifier_dir):
    cfg = stage_config(tiny_digits, run_dir, classifier_dir, *TRAIN, "train.steps=4", "train.checkpoint_every=2")
    summary = run_train(cfg, progress=False)
    assert (summary.samples, summary.steps, summary.processes, summary.t_level) == (18, 4, 1, 332.0)
    # DDIM `leading`, 6 of 1000 steps, visits 830, 664, 498, 332, 166, 0: x_3 is at t = 332 and
    # training draws s only from the three timesteps the sampler visits before it.
    assert summary.timesteps_trained == [830.0, 664.0, 498.0]
    folder = run_dir / "round-000/train/bo4-t3"
    card = json.loads((folder / "model/composite.json").read_text())
    assert card["switch_step"] == 3 and card["finetuned"] == "full"
    # Both checkpoints are in the run's storage, each holding DeepSpeed's files, and registered.
    steps = sorted(p.name for p in (folder / "checkpoints").iterdir() if p.name.startswith("step"))
    assert steps == ["step0000002", "step0000004"]
    record = json.loads((folder / "checkpoints/registered.json").read_text())["checkpoints"]
    assert [(c["tag"], c["step"]) for c in record] == [("step0000002", 2), ("step0000004", 4)]
    assert (folder / "checkpoints/step0000004/latest").read_text().strip() == "step0000004"
    assert json.loads((folder / "summary.json").read_text())["final_loss"] == pytest.approx(summary.final_loss)
    assert len(summary.nodes) == 1

    tuned = unet_weights(run_dir, "bo4-t3")
    base = load_file(Path(tiny_digits) / "unet/diffusion_pytorch_model.safetensors")
    assert any(not torch.equal(tuned[k], base[k]) for k in base)

    round1 = stage_config(tiny_digits, run_dir, classifier_dir, "run.round=1", f"model.finetuned={folder / 'model'}")
    assert run_generate(round1, progress=False).written == 9
    again = run_train(cfg, progress=False)  # trained and exported: a rerun returns the summary, trains nothing
    assert again.seconds == summary.seconds


@pytest.mark.deepspeed
def test_a_kept_train_group_trains_the_weights_of_a_fresh_one(run_dir, tiny_digits, classifier_dir):
    import cluster
    from cluster import executor

    ranks = []
    with cluster.keep_warm():  # the second training runs on the first one's rank, kept
        for name in ("fresh", "kept"):
            run_train(stage_config(tiny_digits, run_dir, classifier_dir, *TRAIN, "train.steps=3", f"train.name={name}"),
                      progress=False)
            [(key, pool)] = executor._WARM.items()
            assert key[0].__name__ == "TrainRank" and not pool.closed
            ranks.append(pool.actors)
    assert ranks[0] == ranks[1]  # the same actors: the group was not restarted in between
    fresh, kept = unet_weights(run_dir, "fresh"), unet_weights(run_dir, "kept")
    assert all(torch.equal(fresh[k], kept[k]) for k in fresh)


@pytest.mark.deepspeed
def test_killed_train_worker_resumes_to_the_same_weights(run_dir, tiny_digits, classifier_dir, straight_weights):
    cfg = stage_config(tiny_digits, run_dir, classifier_dir, *TRAIN, *LONG, "train.name=long")
    killer = KillWhen(checkpoint_registered(run_dir, "long", 25), "ray::TrainRank")
    summary = run_train(cfg, progress=False)
    assert killer.join() is not None, "no train worker was killed"
    assert summary.resumed_from >= 25  # the group restarted from a registered checkpoint
    tuned = unet_weights(run_dir, "long")
    assert all(torch.equal(straight_weights[k], tuned[k]) for k in tuned)


@pytest.mark.deepspeed
def test_killed_driver_rerun_resumes_to_the_same_weights(run_dir, tiny_digits, classifier_dir, straight_weights):
    args = [f"run.uri={run_dir}", f"model.path={tiny_digits}", "model.num_inference_steps=6", "model.device=cpu",
            *TRAIN, *LONG, "train.name=long"]
    cmd = [sys.executable, "-m", "stages.train", "--quiet"] + [a for item in args for a in ("--set", item)]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own local Ray, which dies with it
    driver = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    deadline = time.time() + 300
    while not checkpoint_registered(run_dir, "long", 50)() and time.time() < deadline and driver.poll() is None:
        time.sleep(0.05)
    os.killpg(driver.pid, signal.SIGKILL)  # the driver and everything it started
    driver.wait()
    assert not (run_dir / "round-000/train/long/model").exists()
    # The newest registered checkpoint (step 50) is torn (half of one file): the rerun skips it,
    # with a warning, for the one before (step 25), and still ends at the same weights.
    checkpoints = run_dir / "round-000/train/long/checkpoints"
    newest = json.loads((checkpoints / "registered.json").read_text())["checkpoints"][-1]["tag"]
    states = next((checkpoints / newest / newest).glob("mp_rank_00_model_states.pt"))
    states.write_bytes(states.read_bytes()[: states.stat().st_size // 2])
    # The rerun shows its progress: the rank's step lines reach this driver's log once each (Ray
    # Train's workers, which this group replaced, printed every line twice).
    again = subprocess.run([a for a in cmd if a != "--quiet"], cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resumed at step 25" in again.stdout  # from step 25: step 50's checkpoint was skipped
    assert re.search(rf"warning: checkpoint \S+/{newest} is corrupt \(\S+ is torn \(sha256 differs\)\); skipping it "
                     "for the one before", again.stdout + again.stderr), again.stdout[-2000:] + again.stderr[-2000:]
    steps = [line for line in again.stdout.splitlines() if "train long: step " in line]
    assert steps and len(steps) == len(set(steps)), steps
    tuned = unet_weights(run_dir, "long")
    assert all(torch.equal(straight_weights[k], tuned[k]) for k in tuned)


@pytest.mark.deepspeed
def test_two_train_ranks_with_gloo_and_zero1(run_dir, tiny_digits, classifier_dir):
    cfg = stage_config(tiny_digits, run_dir, classifier_dir, *TRAIN, "train.name=ddp", "train.steps=3",
                       "train.zero_stage=1", "train.num_workers=2")
    summary = run_train(cfg, progress=False)
    assert summary.processes == 2 and summary.deepspeed["train_micro_batch_size_per_gpu"] == 4
    assert len(summary.nodes) == 2 and len(set(summary.nodes)) == 1  # one entry per rank, both on the local node
    folder = run_dir / "round-000/train/ddp"
    assert (folder / "model/unet").is_dir()
    # ZeRO-1: each rank's optimizer shard is in the merged checkpoint.
    shards = sorted(p.name for p in (folder / "checkpoints/step0000003/step0000003").iterdir() if "optim" in p.name)
    assert len(shards) == 2, shards


@pytest.mark.deepspeed
def test_lora_trains_adapters_and_the_composite_switches_them_off(run_dir, tiny_digits, classifier_dir):
    cfg = stage_config(tiny_digits, run_dir, classifier_dir, *TRAIN, "train.name=lora", "train.mode=lora",
                       "train.steps=3", "train.lr=1e-2")
    run_train(cfg, progress=False)
    weights = load_file(run_dir / "round-000/train/lora/model/lora/adapter.safetensors")
    assert weights and all("lora" in k for k in weights)
    composite = load_adapter(cfg.model.model_copy(update={"finetuned": str(run_dir / "round-000/train/lora/model")}))
    base = load_adapter(cfg.model)
    with_lora = composite.rollout(["a handwritten digit 2"], [4], [3])
    plain = base.rollout(["a handwritten digit 2"], [4], [3])
    assert not torch.allclose(with_lora.latents["x_3"], plain.latents["x_3"])  # the adapter ran for steps 0..2
    # Step by step: adapter on for steps 0..2, off from step 3 (switch_step = t_step = 3).
    from pgraft.models.adapters import initial_noise
    from pgraft.models.lora import set_lora_enabled

    net, sched = composite.denoiser, composite.pipe.scheduler
    sched.set_timesteps(6)
    x = initial_noise([4], (1, 8, 8))
    label, null = torch.tensor([2]), torch.tensor([10])
    with torch.no_grad():
        for i, t in enumerate(sched.timesteps):
            set_lora_enabled(net, i < 3)
            cond, uncond = net(x, t, class_labels=label).sample, net(x, t, class_labels=null).sample
            x = sched.step(uncond + cfg.model.guidance_scale * (cond - uncond), t, x).prev_sample
            if i + 1 == 3:
                torch.testing.assert_close(with_lora.latents["x_3"], x, rtol=0, atol=1e-5)
    torch.testing.assert_close(with_lora.latents["x_0"], x, rtol=0, atol=1e-5)


@pytest.mark.parametrize("case, extra, message", [
    ("batch not divisible", ("train.num_workers=3",), r"train.batch_size=8 is not a multiple of micro batch 2 × 3 workers"),
    ("missing selection", ("train.selection=nope",), "selection 'nope' does not exist in round 0"),
    ("step not captured", ("train.t_step=2",), r"train.t_step=2 is not a captured step; the shards hold \[3\] \(or 6 for x_0, GRAFT\)"),
    ("step out of range", ("train.t_step=7",), "train.t_step=7 is out of range 1..6"),
    ("other model", ("model.path=OTHER",), "the shards come from model .* the config names .*other"),
    ("empty selection", ("train.selection=empty",), "selection 'empty' is empty"),
])
@pytest.mark.deepspeed
def test_bad_input_is_a_one_line_error(run_dir, tiny_digits, classifier_dir, case, extra, message, tmp_path):
    from tiny_models import save_tiny_digits

    other = save_tiny_digits(tmp_path / "other")
    empty = run_dir / "round-000/filter/empty"
    empty.mkdir(parents=True)
    pq.write_table(pa.table({c: pa.array([], type=getattr(pa, t)()) for c, t in contract.ACCEPTED_COLUMNS.items()}),
                   empty / "accepted.parquet")
    (empty / "summary.json").write_text("{}")
    extra = tuple(e.replace("OTHER", str(other)) for e in extra)
    cfg = stage_config(tiny_digits, run_dir, classifier_dir, *TRAIN, *extra)
    with pytest.raises(TrainError, match=message):
        run_train(cfg, progress=False)


@pytest.mark.deepspeed
def test_more_workers_than_the_cluster_can_hold_is_one_line(run_dir, tiny_digits, classifier_dir):
    cfg = stage_config(tiny_digits, run_dir, classifier_dir, *TRAIN, "train.num_workers=4",
                       "cluster.placement_timeout_s=2")
    with pytest.raises(WorkerError, match=r"train workers: 4 × \{'CPU': 1\} could not be placed within 2 s: "
                                          r"4 × CPU 1 = 4 needed, the cluster has 2"):
        run_train(cfg, progress=False)
    assert not (run_dir / "round-000/train/bo4-t3").exists()


@pytest.mark.deepspeed
def test_other_settings_under_the_same_name_are_refused_not_mixed(run_dir, tiny_digits, classifier_dir):
    cfg = stage_config(tiny_digits, run_dir, classifier_dir, *TRAIN, "train.name=fp", "train.steps=2",
                       "train.checkpoint_every=1")
    run_train(cfg, progress=False)
    other = stage_config(tiny_digits, run_dir, classifier_dir, *TRAIN, "train.name=fp", "train.steps=2",
                         "train.checkpoint_every=1", "train.lr=5e-4")
    with pytest.raises(TrainError, match="was trained on another selection or with other train settings"):
        run_train(other, progress=False)
    # Without the summary and model, the checkpoints are what is left: the worker refuses them,
    # and its error reaches the caller as the same one line.
    shutil.rmtree(run_dir / "round-000/train/fp/model")
    (run_dir / "round-000/train/fp/summary.json").unlink()
    with pytest.raises(TrainError, match=r"checkpoints holds checkpoints of a run with other data or other "
                                         r"settings; use another train.name"):
        run_train(other.model_copy(update={"train": other.train.model_copy(update={"max_failures": 0})}),
                  progress=False)
