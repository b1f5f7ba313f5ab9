"""The chaos round: two rounds of the digits config on a two-node Ray cluster on loopback, run and
models on a moto S3 server, undisturbed and then under chaos, compared byte for byte.

    python benchmarks/chaos_round.py [--seeds 0 1] [--every 20] [--samples-per-prompt 16]

Pretrains the digits task briefly and publishes it to S3 (once). Per seed, on a fresh rig:
submits `python pipelines/pgraft_round.py --config configs/digits.yaml` (two rounds) and lets it
finish undisturbed; moves that run aside; submits the same command again while a seeded chaos
loop (cluster/chaos.py) SIGKILLs a random generate, reward or evaluation actor or a train rank
every ~`--every` s, and the job driver is killed once (when round 0's reward stage has written
its first part), after which the same command is submitted again. Prints the kills survived,
the wall-time overhead over the undisturbed run, and what differs (nothing, when it passes):
shards, reward tables, accepted rows and the weights of both rounds. `--out` writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cluster import loopback  # noqa: E402
from cluster.chaos import ChaosMonkey, compare_runs, count_samples, move_run, run_with_chaos  # noqa: E402
from cluster.local_s3 import TEST_CREDENTIALS, start_moto  # noqa: E402
from pgraft import contract  # noqa: E402
from pgraft.storage import open_storage  # noqa: E402
from s3_task import publish_digits_task  # noqa: E402

PIN = "{gpu_node: 1}"


def entrypoint(run_uri: str, task_dir: str, args) -> list[str]:
    sets = [f"run.uri={run_uri}", f"task.dir={task_dir}", "task.pretrain=false", "run.rounds=2",
            "model.device=auto", f"generate.samples_per_prompt={args.samples_per_prompt}",
            f"generate.samples_per_shard={args.samples_per_shard}", f"generate.resources={PIN}",
            f"reward.resources={PIN}", f"train.resources_per_worker={PIN}", "train.epochs=null",
            f"train.steps={args.train_steps}", f"train.checkpoint_every={args.checkpoint_every}",
            f"train.eval_samples_per_prompt={args.eval_samples}",
            # Enough restarts for a kill every few tens of seconds through the whole run; a killed
            # driver's lease is taken over after lease_ttl_s.
            "cluster.max_restarts=1000", "train.max_failures=1000", f"storage.lease_ttl_s={args.lease_ttl}",
            "storage.lease_wait_s=600", "cluster.placement_timeout_s=120"]
    return (["python", "pipelines/pgraft_round.py", "--quiet", "--config", "configs/digits.yaml"]
            + [x for s in sets for x in ("--set", s)])


def one_seed(seed: int, bucket: str, task_dir: str, args) -> dict:
    run_uri = f"s3://{bucket}/run-{seed}"
    root = open_storage(f"s3://{bucket}")
    chaos_store = open_storage(run_uri)
    reward_started = lambda: bool(chaos_store.list(contract.rewards_prefix(0, "digits_alignment")))  # noqa: E731
    with loopback.running(num_cpus=2, resource_count=8, timeout=90) as rig:
        calm = run_with_chaos(rig, entrypoint(run_uri, task_dir, args), str(REPO), timeout=7200)
        if calm.returncode != 0:
            raise SystemExit(f"the undisturbed run failed:\n{calm.log[-4000:]}")
        move_run(root, f"run-{seed}/", f"calm-{seed}/")
        monkey = ChaosMonkey(rig, seed=seed, every_s=args.every)
        chaos = run_with_chaos(rig, entrypoint(run_uri, task_dir, args), str(REPO), monkey,
                               kill_driver_when=reward_started, timeout=7200)
    differs = compare_runs(open_storage(f"s3://{bucket}/calm-{seed}"), chaos_store)
    samples, distinct = count_samples(chaos_store)
    return {"seed": seed, "passed": chaos.returncode == 0 and not differs and samples == distinct,
            "returncode": chaos.returncode, "calm_s": calm.seconds, "chaos_s": chaos.seconds,
            "overhead": round(chaos.seconds / calm.seconds, 3), "submissions": chaos.submissions,
            "driver_kills_s": chaos.driver_kills, "worker_kills": chaos.worker_kills,
            "kills_by_role": {role: sum(1 for _, r, _ in chaos.worker_kills if r == role)
                              for role in ("generate", "reward", "evaluate", "train")},
            "samples": samples, "distinct_samples": distinct, "differs": differs,
            "log_tail": chaos.log[-2000:] if chaos.returncode else ""}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--every", type=float, default=20.0, help="seconds between kills (±50 %%)")
    parser.add_argument("--samples-per-prompt", type=int, default=16)
    parser.add_argument("--samples-per-shard", type=int, default=16)
    parser.add_argument("--train-steps", type=int, default=60)
    parser.add_argument("--checkpoint-every", type=int, default=20)
    parser.add_argument("--eval-samples", type=int, default=8)
    parser.add_argument("--pretrain-steps", type=int, default=300)
    parser.add_argument("--lease-ttl", type=float, default=20.0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    os.environ.update(TEST_CREDENTIALS)
    moto, endpoint = start_moto()
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    results = []
    try:
        bucket = publish_digits_task(endpoint, "chaos", args.pretrain_steps, classifier_epochs=10)
        for seed in args.seeds:
            result = one_seed(seed, bucket, f"s3://{bucket}/task", args)
            results.append(result)
            print(f"seed {seed}: {'PASS' if result['passed'] else 'FAIL'}; {len(result['worker_kills'])} worker kills "
                  f"{result['kills_by_role']} + driver killed at {result['driver_kills_s']} s ({result['submissions']} "
                  f"submissions); {result['chaos_s']:.0f} s vs {result['calm_s']:.0f} s undisturbed = "
                  f"×{result['overhead']:.2f}; samples {result['samples']} ({result['distinct_samples']} distinct); "
                  f"differs: {result['differs'] or 'nothing'}", flush=True)
    finally:
        moto.terminate()
    if args.out:
        args.out.write_text(json.dumps({"args": vars(args) | {"out": str(args.out)}, "results": results}, indent=1))


if __name__ == "__main__":
    main()
