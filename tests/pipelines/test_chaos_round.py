"""The test-sized chaos round (benchmarks/chaos_round.py is the full one, two rounds): one round of a tiny
digits config by `ray job submit` on the two-node loopback rig, run and models on the moto S3
server. First undisturbed; then again on another run.uri while a seeded chaos loop SIGKILLs a
generate, reward or evaluation actor or a train rank every ~8 s (6 at most), and the job driver is killed
once (during the reward stage) and the same command submitted again. The round finishes; every
sample exists once; shards, reward tables, accepted rows, the evaluation and the weights are
byte-identical to the undisturbed run's."""

from __future__ import annotations

import uuid
from pathlib import Path

import boto3

from cluster import loopback
from cluster.chaos import ChaosMonkey, compare_runs, count_samples, move_run, run_with_chaos
from pgraft import contract
from pgraft.storage import open_storage

REPO = Path(__file__).resolve().parents[2]
PIN = "{gpu_node: 1}"


def entrypoint(run: str, bucket: str) -> list[str]:
    sets = [
        f"run.uri={run}", "task.pretrain=false", f"model.path=s3://{bucket}/models/ddpm",
        f"reward.model_path=s3://{bucket}/models/classifier", "model.num_inference_steps=6", "model.device=auto",
        "generate.prompts=[a handwritten digit 1, a handwritten digit 2]", "generate.samples_per_prompt=8",
        "generate.samples_per_shard=2", "generate.capture_steps=[3]", f"generate.resources={PIN}",
        f"reward.resources={PIN}", f"train.resources_per_worker={PIN}", "filter.n=4", "train.t_step=3",
        "train.epochs=null", "train.steps=30", "train.batch_size=4", "train.checkpoint_every=10",
        "train.eval_samples_per_prompt=4",
        # Chaos settings: restarts enough for a kill every few seconds; a killed driver's lease
        # goes stale after 5 s, so the resubmitted driver takes over soon.
        "cluster.max_restarts=100", "train.max_failures=100", "storage.lease_ttl_s=5", "storage.lease_wait_s=120",
        "cluster.placement_timeout_s=60",
    ]
    return ["python", "pipelines/pgraft_round.py", "--quiet"] + [x for s in sets for x in ("--set", s)]


def test_two_rounds_survive_killed_workers_and_a_killed_driver_byte_identical(tiny_digits, classifier_dir,
                                                                              s3_endpoint):
    bucket = f"pgraft-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=bucket)
    open_storage(f"s3://{bucket}/models/ddpm").upload_folder(tiny_digits, "")
    open_storage(f"s3://{bucket}/models/classifier").upload_folder(classifier_dir, "")
    # Both runs use one run.uri (samples record locations): the undisturbed one moves aside after.
    run_uri = f"s3://{bucket}/run"
    chaos_store = open_storage(run_uri)
    reward_started = lambda: bool(chaos_store.list(contract.rewards_prefix(0, "digits_alignment")))  # noqa: E731

    with loopback.running(num_cpus=2, resource_count=8) as rig:
        calm = run_with_chaos(rig, entrypoint(run_uri, bucket), str(REPO))
        assert calm.returncode == 0, calm.log[-3000:]
        assert move_run(open_storage(f"s3://{bucket}"), "run/", "calm/") > 0
        monkey = ChaosMonkey(rig, seed=3, every_s=8, max_kills=6)
        chaos = run_with_chaos(rig, entrypoint(run_uri, bucket), str(REPO), monkey, kill_driver_when=reward_started)
    assert chaos.returncode == 0, chaos.log[-4000:]
    assert len(chaos.driver_kills) == 1 and chaos.submissions == 2
    assert chaos.worker_kills, "the chaos loop killed nothing"

    calm_store = open_storage(f"s3://{bucket}/calm")
    assert compare_runs(calm_store, chaos_store) == {}
    assert count_samples(chaos_store) == (16, 16)  # each exactly once
    assert chaos_store.exists(f"{contract.model_prefix(0, 'best_of_n-4-t3')}/{contract.COMPOSITE_CARD}")
    print(f"chaos round: {len(chaos.worker_kills)} worker kills {chaos.worker_kills}, driver killed at "
          f"{chaos.driver_kills} s; {chaos.seconds:.0f} s against {calm.seconds:.0f} s undisturbed")
