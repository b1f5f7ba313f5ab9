"""Object-store outages ridden out: generate, reward and train on S3 (moto) behind a fault proxy
that takes the store away for `--outage` s (every connection cut, new ones too) in the middle of
each stage; then a longer outage than `storage.outage_s`, which stops the stage with one line.

    python benchmarks/outage.py [--outage 40] [--samples-per-prompt 16]

Per stage it prints the wall time undisturbed and with the outage (the same work on two
run URIs, on one local Ray), whether the stage finished without a rerun, and whether every
committed shard / reward part still matches its commit record.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cluster.fault_proxy import FaultProxy  # noqa: E402
from cluster.local_s3 import TEST_CREDENTIALS, start_moto  # noqa: E402
from pgraft import contract  # noqa: E402
from pgraft.commits import list_committed, whole  # noqa: E402
from pgraft.config import load_config  # noqa: E402
from pgraft.storage import StorageUnreachable, open_storage  # noqa: E402
from pgraft.tables import scored_parts  # noqa: E402
from s3_task import publish_digits_task  # noqa: E402


def take_away_when(condition, proxy: FaultProxy, seconds: float) -> dict:
    fired: dict = {}

    def watch():
        while "at" not in fired:
            if condition():
                proxy.outage(seconds, mode="cut")
                fired["at"] = time.monotonic()
            time.sleep(0.05)

    threading.Thread(target=watch, daemon=True).start()
    return fired


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--outage", type=float, default=40.0)
    parser.add_argument("--outage-s", type=float, default=120.0, help="storage.outage_s")
    parser.add_argument("--samples-per-prompt", type=int, default=16)
    parser.add_argument("--train-steps", type=int, default=40)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    os.environ.update(TEST_CREDENTIALS)
    moto, moto_endpoint = start_moto()
    host, port = moto_endpoint.rsplit("//", 1)[1].split(":")
    proxy = FaultProxy(host, int(port))
    os.environ["AWS_ENDPOINT_URL"] = proxy.endpoint  # before Ray starts: its workers go through the proxy
    import ray

    from stages.filter import run_filter
    from stages.generate import run_generate
    from stages.reward import run_reward
    from stages.train import run_train

    results = {}
    try:
        bucket = publish_digits_task(moto_endpoint, "outage", ddpm_steps=200, classifier_epochs=5)
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)

        def config(run: str, *extra: str):
            return load_config(str(REPO / "configs/digits.yaml"), [
                f"run.uri=s3://{bucket}/{run}", f"task.dir=s3://{bucket}/task", "task.pretrain=false",
                f"generate.samples_per_prompt={args.samples_per_prompt}", "generate.samples_per_shard=16",
                "train.epochs=null", f"train.steps={args.train_steps}", "train.checkpoint_every=10",
                f"storage.outage_s={args.outage_s}", *extra])

        def look(run: str):
            store = open_storage(f"s3://{bucket}/{run}")
            store.endpoint = moto_endpoint  # past the proxy: the benchmark's own view during the outage
            return store

        stages = [("generate", run_generate, lambda s: len(s.list(contract.generate_prefix(0))) >= 2),
                  ("reward", run_reward, lambda s: bool(s.list(contract.rewards_prefix(0, "digits_alignment")))),
                  ("filter", run_filter, None),
                  ("train", run_train, lambda s: any("/checkpoints/step" in k for k in s.list("round-000/train")))]
        for name, stage, when in stages:
            row = {}
            for run in ("calm", "outage"):
                cfg = config(run)
                fired = take_away_when(lambda: when(look(run)), proxy, args.outage) if run == "outage" and when else {}
                start = time.monotonic()
                stage(cfg, progress=False)
                row[f"{run}_s"] = round(time.monotonic() - start, 1)
                if fired:
                    row["outage_began_after_s"] = round(fired["at"] - start, 1)
                    row["ridden_out_s"] = args.outage
            results[name] = row
            print(f"{name:<9} undisturbed {row['calm_s']:>6.1f} s   with a {args.outage:g} s outage "
                  f"{row['outage_s']:>6.1f} s" + (f" (store away from {row['outage_began_after_s']} s into the stage)"
                                                   if "outage_began_after_s" in row else ""), flush=True)
        store = look("outage")
        committed = list_committed(store, 0)
        shards_whole = all(whole(store, contract.shard_key(0, sid), r.bytes, r.sha256) for sid, r in committed.items())
        parts, torn = scored_parts(store, 0, "digits_alignment")
        results["whole"] = {"shards": len(committed), "shards_match_records": shards_whole, "parts": len(parts),
                            "torn_parts": len(torn),
                            "model": store.exists(f"{contract.model_prefix(0, config('outage').train_output()[1])}/"
                                                  f"{contract.COMPOSITE_CARD}")}
        print(f"committed: {len(committed)} shards, all match their records: {shards_whole}; {len(parts)} reward parts, "
              f"{len(torn)} torn; model exported: {results['whole']['model']}")
        # Longer than storage.outage_s: the stage stops with one line saying for how long.
        cfg = config("long", "storage.outage_s=15", "run.seed=7")
        proxy.set_mode("refuse")
        start = time.monotonic()
        try:
            run_generate(cfg, progress=False)
            results["longer"] = {"stopped": False}
        except StorageUnreachable as exc:
            results["longer"] = {"stopped": True, "after_s": round(time.monotonic() - start, 1), "message": str(exc)}
        proxy.set_mode("pass")
        print(f"store away for longer than storage.outage_s=15: {results['longer']}")
    finally:
        proxy.close()
        moto.terminate()
    if args.out:
        args.out.write_text(json.dumps({"args": vars(args) | {"out": str(args.out)}, "results": results}, indent=1))


if __name__ == "__main__":
    main()
