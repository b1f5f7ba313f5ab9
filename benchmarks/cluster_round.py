"""One round on a two-node Ray cluster on loopback, the run on local storage vs on S3 (moto).

    python benchmarks/cluster_round.py [--samples-per-prompt 32] [--train-steps 50]

Starts a moto S3 server and a loopback cluster (a CPU-less head, a worker node with 2 CPUs
and a `gpu_node` resource), publishes a briefly pretrained digits task to each storage, and
submits the README's `ray job submit --working-dir . -- python pipelines/pgraft_round.py`
twice: run.uri and task.dir on a local folder (every node on this machine mounts it), then on
S3 (`--order` swaps them). Prints the wall time of each stage (from round-000/pipeline.json), the job's total, the
bytes the run wrote to storage and the bytes the worker node fetched into its model cache.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cluster import loopback  # noqa: E402
from cluster.local_s3 import start_moto  # noqa: E402
from pgraft.storage import open_storage  # noqa: E402

PIN = "{gpu_node: 1}"


def run_once(rig, run_uri: str, task_dir: str, args, cache: Path) -> dict:
    sets = [f"run.uri={run_uri}", f"task.dir={task_dir}", "task.pretrain=false", "model.device=auto",
            f"generate.samples_per_prompt={args.samples_per_prompt}", "generate.capture_steps=[15]",
            f"generate.resources={PIN}", f"reward.resources={PIN}", f"train.resources_per_worker={PIN}",
            "train.t_step=15", "train.epochs=null", f"train.steps={args.train_steps}", "train.checkpoint_every=25",
            f"train.eval_samples_per_prompt={args.eval_samples}", "cluster.placement_timeout_s=120"]
    entry = ["python", "pipelines/pgraft_round.py", "--quiet", "--config", "configs/digits.yaml"]
    entry += [a for s in sets for a in ("--set", s)]
    start = time.perf_counter()
    done = loopback.submit_job(rig, entry, working_dir=str(REPO), timeout=1800)
    total = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"job failed:\n{done.stdout[-3000:]}\n{done.stderr[-2000:]}")
    store = open_storage(run_uri)
    record = json.loads(store.get_bytes("round-000/pipeline.json"))
    written = sum(size for _, size, _ in store.manifest(""))
    log = cache / "models" / "fetch.log"
    fetched = sum(json.loads(line)["bytes"] for line in log.read_text().splitlines()) if log.exists() else 0
    return {"stages": {k: v["seconds"] for k, v in record["stages"].items()}, "job_seconds": total,
            "bytes_written": written, "bytes_fetched": fetched, "eval": record.get("eval", {})}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--samples-per-prompt", type=int, default=32)
    parser.add_argument("--train-steps", type=int, default=50)
    parser.add_argument("--eval-samples", type=int, default=20)
    parser.add_argument("--pretrain-steps", type=int, default=200)
    parser.add_argument("--order", default="local,s3", help="which storage runs first (the first job on a fresh "
                        "cluster pays one-off start-up costs; run both orders to see them)")
    args = parser.parse_args()

    from pgraft.tasks.digits import pretrain_digits

    moto, endpoint = start_moto()
    aws = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench-secret", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": endpoint}
    os.environ.update(aws)
    results = {}
    try:
        with tempfile.TemporaryDirectory(prefix="pgraft-bench-") as tmp:
            tmp = Path(tmp)
            pretrain_digits(tmp / "task", seed=0, ddpm_steps=args.pretrain_steps, flow_steps=0, classifier_epochs=10,
                            eval_samples_per_digit=0, progress=False)
            import boto3

            bucket = f"bench-{uuid.uuid4().hex[:8]}"
            boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
            open_storage(f"s3://{bucket}/task").upload_folder(tmp / "task", "")
            locations = {"local": (str(tmp / "run"), str(tmp / "task")),
                         "s3": (f"s3://{bucket}/run", f"s3://{bucket}/task")}
            for name in args.order.split(","):
                run_uri, task_dir = locations[name]
                cache = tmp / f"cache-{name}"
                with loopback.running(num_cpus=2, resource_count=8, env=aws, worker_env={"PGRAFT_CACHE_DIR": str(cache)},
                                      timeout=90) as rig:
                    results[name] = run_once(rig, run_uri, task_dir, args, cache)
    finally:
        moto.terminate()
    stages = list(results[next(iter(results))]["stages"])
    print(f"one round on a 2-node loopback cluster (head 0 CPUs, worker 2 CPUs); {args.samples_per_prompt} samples "
          f"per prompt × 10 prompts, {args.train_steps} train steps, {args.eval_samples} eval samples per prompt")
    print(f"{'':<12}" + "".join(f"{s:>10}" for s in stages) + f"{'job':>10}{'written':>12}{'fetched':>12}")
    for name, r in results.items():
        print(f"{name:<12}" + "".join(f"{r['stages'][s]:>9.1f}s" for s in stages) + f"{r['job_seconds']:>9.1f}s"
              f"{r['bytes_written'] / 1e6:>10.1f}MB{r['bytes_fetched'] / 1e6:>10.1f}MB")
    print("S3 ÷ local wall time per stage: " + ", ".join(
        f"{s} {results['s3']['stages'][s] / results['local']['stages'][s]:.2f}" for s in stages))


if __name__ == "__main__":
    main()
