"""Does dedup GRS keep a molecule generator from collapsing? And GRAFT against P-GRAFT on molecules.

    python benchmarks/molecules_dedup.py --models DIR [--seeds 0 1 2] [--rounds 3] [--samples-per-prompt 512]
        [--eval-samples 256] [--threshold 0.5] [--out benchmarks/results/molecules_dedup]

DIR holds `pgraft pretrain molecules --out DIR` (the base `ddpm/`). Part 1, per seed (run.seed
and train.seed): four round pipelines of configs/molecules.yaml, `--rounds` rounds each, at the
same generated budget (`--samples-per-prompt` molecules a round): best-of-8 and a fixed QED
threshold, each with and without dedup on the canonical SMILES. Per round:
  - reward gain: mean QED of fresh samples (the evaluate stage's seeds, never trained on) of the
    round's fine-tuned sampler minus the base's;
  - uniqueness (distinct ÷ valid), novelty and internal diversity of those fresh samples, and
    their Fréchet ChemNet Distance to the held-out split;
  - accepted: rows accepted, and distinct molecules among them.
Part 2, per seed: on round 0 of the best-of-8 + dedup run, the same accepted set trained as
GRAFT (x_0) and as P-GRAFT at two noise levels, each evaluated on the same fresh seeds.
Writes <out>.json, <out>.md (mean ± s.e. over seeds) and <out>.png.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pgraft.config import load_config  # noqa: E402
from pgraft.metrics import mean_and_stderr  # noqa: E402

VARIANTS = {  # label -> filter overrides
    "best-of-8": ["filter.method=best_of_n", "filter.n=8", "filter.dedup=false"],
    "best-of-8 + dedup": ["filter.method=best_of_n", "filter.n=8", "filter.dedup=true"],
    "threshold": ["filter.method=threshold", "filter.dedup=false"],
    "threshold + dedup": ["filter.method=threshold", "filter.dedup=true"],
}
METRICS = ("reward_gain", "uniqueness", "novelty", "internal_diversity", "fcd", "accepted", "accepted_distinct")
TITLES = {"reward_gain": "QED gain of fresh samples", "uniqueness": "uniqueness of fresh samples",
          "novelty": "novelty of fresh samples", "internal_diversity": "internal diversity (IntDiv)",
          "fcd": "FCD to held-out", "accepted": "rows accepted", "accepted_distinct": "distinct molecules accepted"}


def base_config(args, seed: int, run_uri: str, extra: list[str]):
    return load_config("configs/molecules.yaml", [
        f"run.uri={run_uri}", f"run.seed={seed}", f"train.seed={seed}", f"task.dir={args.models}", "task.pretrain=false",
        f"generate.samples_per_prompt={args.samples_per_prompt}", f"train.eval_samples_per_prompt={args.eval_samples}",
        f"filter.threshold={args.threshold}", f"train.epochs={args.epochs}",
        *([f"train.lr={args.lr}"] if args.lr is not None else []), *extra,
    ])


def accepted_molecules(cfg, rnd: int) -> tuple[int, int]:
    """(rows accepted, distinct canonical SMILES among them) of round `rnd`'s selection."""
    from pgraft.storage import open_storage
    from pgraft.tables import list_reward_parts, read_accepted, read_reward_table

    store = open_storage(cfg.run.uri)
    keys = set(read_accepted(store, rnd, cfg.filter.selection_name())["key"].to_pylist())
    parts = list_reward_parts(store, rnd, cfg.reward.table_name())
    table = read_reward_table(store, [parts[k] for k in sorted(parts)], columns=["key", "sample_hash"]).table
    hashes = {k: h for k, h in zip(table["key"].to_pylist(), table["sample_hash"].to_pylist()) if k in keys}
    return len(keys), len(set(hashes.values()))


def figures(variant: dict, base: dict) -> dict:
    tm = variant["task_metrics"]
    return {"reward": variant["reward_mean"], "reward_gain": variant["reward_mean"] - base["reward_mean"],
            "uniqueness": tm["uniqueness"], "novelty": tm["novelty"], "internal_diversity": tm["internal_diversity"],
            "fcd": variant["frechet_distance"], "distinct_fresh": tm["distinct"]}


def run_variant(args, seed: int, label: str, root: Path) -> dict:
    from pipelines.pgraft_round import run_round_pipeline

    cfg = base_config(args, seed, str(root / f"seed{seed}" / label.replace(" ", "").replace("+", "-")),
                      [f"run.rounds={args.rounds}", *VARIANTS[label]])
    t0 = time.perf_counter()
    run_round_pipeline(cfg, progress=False)
    rounds = []
    for rnd in range(args.rounds):
        summary = json.loads(Path(cfg.run.uri, f"round-{rnd:03d}/eval/summary.json").read_text())["variants"]
        base = summary["base"]
        row = figures(summary["finetuned"], base)
        row["accepted"], row["accepted_distinct"] = accepted_molecules(
            cfg.model_copy(update={"run": cfg.run.model_copy(update={"round": rnd})}), rnd)
        rounds.append(row)
        print(f"seed {seed} {label} round {rnd}: QED {base['reward_mean']:.3f}→{row['reward']:.3f}, uniqueness "
              f"{row['uniqueness']:.3f}, IntDiv {row['internal_diversity']:.3f}, FCD {row['fcd']:.2f}, accepted "
              f"{row['accepted']} ({row['accepted_distinct']} distinct)", flush=True)
    return {"rounds": rounds, "base": figures(base, base), "seconds": time.perf_counter() - t0, "run": cfg.run.uri}


def graft_vs_pgraft(args, seed: int, run_uri: str) -> dict:
    """Round 0 of the dedup run: its accepted set trained at x_0 and at each --levels step."""
    from stages.evaluate import evaluate_variant
    from stages.train import run_train

    out = {}
    base = json.loads(Path(run_uri, "round-000/eval/summary.json").read_text())["variants"]["base"]
    for k in [20, *args.levels]:
        cfg = base_config(args, seed, run_uri, VARIANTS["best-of-8 + dedup"] + [f"train.t_step={k}"])
        trained = run_train(cfg, progress=False)
        summary = evaluate_variant(cfg, f"t{k}", trained.model_dir, progress=False)
        out[str(k)] = {"t_level": 0.0 if trained.t_level is None else trained.t_level, **figures(summary, base)}
        print(f"seed {seed} best-of-8 + dedup, t_step {k}: QED gain {out[str(k)]['reward_gain']:+.3f}, uniqueness "
              f"{out[str(k)]['uniqueness']:.3f}, FCD {out[str(k)]['fcd']:.2f}", flush=True)
    return out


def aggregate(runs: dict, args) -> dict:
    seeds = list(runs)
    agg = {"variants": {}, "levels": {}}
    for label in args.variants:
        agg["variants"][label] = [{m: mean_and_stderr([runs[s]["variants"][label]["rounds"][r][m] for s in seeds])
                                   for m in METRICS} for r in range(args.rounds)]
    agg["base"] = {m: mean_and_stderr([runs[s]["variants"][args.variants[0]]["base"][m] for s in seeds])
                   for m in ("reward", "uniqueness", "novelty", "internal_diversity", "fcd")}
    for k in runs[seeds[0]]["levels"]:
        level = [runs[s]["levels"][k] for s in seeds]
        agg["levels"][k] = {"t_level": level[0]["t_level"], **{
            m: mean_and_stderr([v[m] for v in level]) for m in ("reward_gain", "uniqueness", "internal_diversity", "fcd")}}
    return agg


def _pm(pair, digits=3) -> str:
    mean, se = pair
    return f"{mean:.{digits}f} ± {se:.{digits}f}" if math.isfinite(se) else f"{mean:.{digits}f}"


def table(results: dict) -> str:
    agg, a = results["aggregate"], results["args"]
    b = agg["base"]
    lines = [f"Molecules (QED reward), {len(results['seeds'])} seeds, {a['rounds']} rounds, {a['samples_per_prompt']} "
             f"generated molecules a round, {a['eval_samples']} fresh evaluation molecules per round, {a['epochs']} "
             f"epochs over the accepted set at lr {a.get('lr') or 'of configs/molecules.yaml'}; threshold τ = "
             f"{a['threshold']}. Mean ± s.e. over seeds.", "",
             f"Base: QED {_pm(b['reward'])}, uniqueness {_pm(b['uniqueness'])}, novelty {_pm(b['novelty'])}, "
             f"IntDiv {_pm(b['internal_diversity'])}, FCD {_pm(b['fcd'], 2)}.", "",
             "| selection | round | QED gain | uniqueness | novelty | IntDiv | FCD | accepted | distinct accepted |",
             "|---|---|---|---|---|---|---|---|---|"]
    for label, rounds in agg["variants"].items():
        for r, row in enumerate(rounds):
            lines.append(f"| {label} | {r} | {_pm(row['reward_gain'])} | {_pm(row['uniqueness'])} | {_pm(row['novelty'])} | "
                         f"{_pm(row['internal_diversity'])} | {_pm(row['fcd'], 2)} | {_pm(row['accepted'], 1)} | "
                         f"{_pm(row['accepted_distinct'], 1)} |")
    if not agg["levels"]:
        return "\n".join(lines) + "\n"
    lines += ["", "GRAFT against P-GRAFT, round 0 of best-of-8 + dedup (the same accepted set, the same fresh seeds):", "",
              "| trained on | QED gain | uniqueness | IntDiv | FCD |", "|---|---|---|---|---|"]
    for k, level in sorted(agg["levels"].items(), key=lambda kv: kv[1]["t_level"]):
        where = "x_0 (GRAFT, t = 0)" if level["t_level"] == 0 else f"x_{k} (P-GRAFT, t = {level['t_level']:g})"
        lines.append(f"| {where} | {_pm(level['reward_gain'])} | {_pm(level['uniqueness'])} | "
                     f"{_pm(level['internal_diversity'])} | {_pm(level['fcd'], 2)} |")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = ("reward_gain", "uniqueness", "internal_diversity", "fcd", "accepted_distinct")
    fig, axes = plt.subplots(1, len(shown), figsize=(4 * len(shown), 3.4))
    for (label, rounds), marker in zip(results["aggregate"]["variants"].items(), "osv^"):
        x = np.arange(len(rounds))
        for ax, metric in zip(axes, shown):
            mean = np.array([r[metric][0] for r in rounds])
            se = np.nan_to_num(np.array([r[metric][1] for r in rounds]))
            ax.errorbar(x, mean, yerr=se, marker=marker, capsize=3, label=label)
            ax.set_title(TITLES[metric], fontsize=10)
            ax.set_xlabel("round")
            ax.set_xticks(x)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", required=True, help="the folder of `pgraft pretrain molecules --out`")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--samples-per-prompt", type=int, default=512)
    parser.add_argument("--eval-samples", type=int, default=256)
    parser.add_argument("--epochs", type=float, default=40)
    parser.add_argument("--threshold", type=float, default=0.5, help="QED threshold of the threshold selections")
    parser.add_argument("--lr", type=float, default=None, help="train.lr (default: the config's)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS),
                        help="the selections of part 1")
    parser.add_argument("--levels", type=int, nargs="*", default=[10, 15],
                        help="P-GRAFT t_steps of part 2 (none: skip part 2)")
    parser.add_argument("--work", default=None, help="where the runs go (default: a temporary folder)")
    parser.add_argument("--out", default="benchmarks/results/molecules_dedup")
    args = parser.parse_args()
    import tempfile

    import ray

    work = Path(args.work or tempfile.mkdtemp(prefix="pgraft-molecules-study-"))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    runs, start = {}, time.perf_counter()
    for seed in args.seeds:
        variants = {label: run_variant(args, seed, label, work) for label in args.variants}
        levels = graft_vs_pgraft(args, seed, variants["best-of-8 + dedup"]["run"]) if args.levels else {}
        runs[seed] = {"variants": variants, "levels": levels}
    results = {"seeds": args.seeds, "args": {k: v for k, v in vars(args).items() if k not in ("work", "out")},
               "runs": {str(s): r for s, r in runs.items()}, "aggregate": aggregate(runs, args),
               "seconds": time.perf_counter() - start}
    from study_output import write_study

    write_study(results, Path(args.out), table, plot)
    print(f"in {results['seconds'] / 60:.1f} min")


if __name__ == "__main__":
    main()
