"""A whole round ÷ the bare work it contains, at the default config and at 4× the samples, one run.

    python benchmarks/round_overhead.py [--models models/digits] [--scales 1 4] [--rounds 1] [--repo CHECKOUT]
    python benchmarks/round_overhead.py --room 8 --scales 1 --rounds 2     # kept pools, with and without room

Per scale s it times, as a whole process, `python pipelines/pgraft_round.py --config
configs/digits.yaml` with generate.samples_per_prompt = 128·s (train.epochs scales the steps with
what the filter keeps) against the bare work the round contains, timed in this process on the
same models, batch sizes, samplers and CPUs:
  * bare sampling of every generated sample: the diffusers pipeline called directly
    (benchmarks/generate_overhead.py's `bare_pipeline`), no captures, shards or Ray;
  * bare training of the same steps: plain torch AdamW on the same UNet, batch and P-GRAFT
    targets (benchmarks/train_throughput.py's `bare_loop`, on the round's own accepted latents);
  * bare sampling of the evaluation: the base and the fine-tuned variant's samples, both with
    the base pipeline (same architecture, same cost per sample).
It prints the ratio and where the rest goes: each stage's wall time from the round's
pipeline.json beside the bare seconds it contains. With --rounds 2 the second round's figures
show what the run reuses: its evaluation samples only the fine-tuned variant (the base's figures
are round 0's), and its bare work counts only what it samples.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from generate_overhead import bare_pipeline  # noqa: E402
from train_throughput import bare_loop  # noqa: E402

from pgraft.config import load_config  # noqa: E402


# The CPUs each pool gets by default on 2 CPUs, pinned, so that a cluster with more room runs the
# same threads per actor (and the same float order) and the pools can stay up beside each other.
PINNED = ("generate.cpus_per_worker=1", "reward.cpus_per_worker=2", "train.cpus_per_worker=2")


def run_round(models: str, run: Path, scale: int, rounds: int, repo: Path = REPO, rig=None,
              sets: tuple[str, ...] = ()) -> tuple[float, list[dict]]:
    """Whole-process seconds of the round pipeline of the checkout `repo`, and each round's
    pipeline.json; on a local Ray the process starts, or on the loopback cluster `rig`."""
    command = [sys.executable, "pipelines/pgraft_round.py", "--config", "configs/digits.yaml", "--quiet",
               "--set", f"run.uri={run}", "--set", f"task.dir={models}", "--set", "task.pretrain=false",
               "--set", f"run.rounds={rounds}",
               "--set", f"generate.samples_per_prompt={128 * scale}"]
    command += [arg for item in sets for arg in ("--set", item)]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a local Ray, started by the process
    if rig is not None:
        env = rig.client_env(env)
    env["PYTHONPATH"] = str(repo)  # the checkout's own code first, whatever the editable install points at
    start = time.perf_counter()
    subprocess.run(command, cwd=repo, env=env, check=True, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - start
    records = []
    for r in range(rounds):
        record = json.loads((run / f"round-{r:03d}" / "pipeline.json").read_text())
        evaluation = run / f"round-{r:03d}" / "eval" / "summary.json"
        variants = json.loads(evaluation.read_text())["variants"] if evaluation.exists() else {}
        # A variant reused from an earlier round (the base, after round 0) was not sampled in this one.
        record["variants_sampled"] = sum("reused_from_round" not in v for v in variants.values())
        records.append(record)
    return seconds, records


def bare_seconds(models: str, run: Path, scale: int) -> dict[str, float]:
    """Seconds of the bare work in round 0 of `run`: sampling, training, evaluation sampling."""
    from pgraft.models.adapters import load_adapter
    from pgraft.storage import open_storage
    from stages.train import load_accepted

    cfg = load_config("configs/digits.yaml", [f"run.uri={run}", f"task.dir={models}",
                                              f"generate.samples_per_prompt={128 * scale}", "model.device=cpu"])
    model, steps, guidance = cfg.model.path, cfg.model.num_inference_steps, cfg.model.guidance_scale
    batch = cfg.generate.batch_size
    generated = len(cfg.generate.prompts) * cfg.generate.samples_per_prompt
    evaluated = 2 * len(cfg.generate.prompts) * cfg.train.eval_samples_per_prompt
    bare_pipeline(model, batch, batch, steps, guidance, "cpu")  # warm-up
    sampling_rate = bare_pipeline(model, generated, batch, steps, guidance, "cpu")
    selection, name = cfg.train_output()
    summary = json.loads((run / "round-000" / "train" / name / "summary.json").read_text())
    data = load_accepted(open_storage(cfg.run.uri), cfg, selection)
    labels = load_adapter(cfg.model).class_ids(data.prompts)
    visited = torch.tensor(data.model_timesteps).long()
    warmup = min(10, summary["steps"] - 1)
    train_rate = bare_loop(model, data.latents, labels, visited, data.t_level, summary["steps"], cfg.train.batch_size,
                           cfg.train.lr, warmup=warmup)
    return {"generate": generated / sampling_rate, "train": summary["steps"] * cfg.train.batch_size / train_rate,
            "evaluate": evaluated / sampling_rate, "generated": generated, "steps": summary["steps"],
            "evaluated": evaluated}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="models/digits", help="the digits task's models (pgraft pretrain digits)")
    parser.add_argument("--scales", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--room", type=int, default=None, metavar="CPUS",
                        help="instead: run the rounds on a loopback cluster (cluster/loopback.py) whose worker node "
                             "offers 2 CPUs, then CPUS logical CPUs, with each pool's CPUs pinned to the 2-CPU "
                             "shares; with room, pools and the train group stay up across stages and rounds")
    parser.add_argument("--repo", type=Path, default=REPO,
                        help="time the round of another checkout (e.g. a git worktree of an earlier commit); "
                             "the bare work is always timed with this one")
    args = parser.parse_args()
    models = str(Path(args.models).absolute())
    if not (Path(models) / "summary.json").exists():
        sys.exit(f"no digits models at {models}: run `pgraft pretrain digits --out {args.models}` first")
    print(f"{torch.get_num_threads()} CPU threads; whole process of {args.repo}/pipelines/pgraft_round.py "
          "vs bare work in this process")
    if args.room:
        return compare_room(models, args.scales[0], args.rounds, args.room, args.repo.absolute())
    for scale in args.scales:
        with tempfile.TemporaryDirectory() as tmp:
            run = Path(tmp) / "run"
            whole, records = run_round(models, run, scale, args.rounds, args.repo.absolute())
            bare = bare_seconds(models, run, scale)
        per_variant = bare["evaluate"] / 2  # bare_seconds times both variants' evaluation samples
        rounds_bare = sum(bare["generate"] + bare["train"] + per_variant * record["variants_sampled"] for record in records)
        print(f"\n{scale}× samples: {bare['generated']} generated, {bare['steps']} train steps, {bare['evaluated']} "
              f"evaluation samples in a round that samples both variants, {args.rounds} round(s)")
        print(f"  whole process {whole:7.1f} s   bare work {rounds_bare:6.1f} s   ratio {whole / rounds_bare:.2f}")
        staged = 0.0
        for record in records:
            for stage, figures in record["stages"].items():
                contained = per_variant * record["variants_sampled"] if stage == "evaluate" else bare.get(stage, 0.0)
                staged += figures["seconds"]
                print(f"  round {record['round']} {stage:<9} {figures['seconds']:7.1f} s  (bare {contained:6.1f} s)")
        print(f"  outside the stages (start-up, pretraining check, Ray, tables): {whole - staged:6.1f} s")


def compare_room(models: str, scale: int, rounds: int, room: int, repo: Path) -> None:
    """The same rounds on a loopback worker node of 2 CPUs (each pool takes them all: nothing can stay
    up) and of `room` logical CPUs (the pools fit beside each other and stay up), pools pinned alike."""
    from cluster import loopback

    print(f"\n{scale}× samples, {rounds} round(s), on a loopback cluster; CPUs per actor pinned: {', '.join(PINNED)}")
    figures = {}
    for cpus in (2, room):
        with tempfile.TemporaryDirectory() as tmp, loopback.running(num_cpus=cpus) as rig:
            run = Path(tmp) / "run"
            whole, records = run_round(models, run, scale, rounds, repo, rig=rig, sets=PINNED)
            if cpus == 2:
                bare = bare_seconds(models, run, scale)
        per_variant = bare["evaluate"] / 2
        rounds_bare = sum(bare["generate"] + bare["train"] + per_variant * r["variants_sampled"] for r in records)
        print(f"  worker node of {cpus} CPUs: whole process {whole:7.1f} s   bare work {rounds_bare:6.1f} s   "
              f"ratio {whole / rounds_bare:.2f}")
        for record in records:
            stages = "  ".join(f"{stage} {f['seconds']:5.1f}" for stage, f in record["stages"].items())
            print(f"    round {record['round']}: {stages}")
        figures[cpus] = [record.get("eval") for record in records]
    print("  same evaluation figures on both (bytes of the same work):", figures[2] == figures[room])


if __name__ == "__main__":
    main()
