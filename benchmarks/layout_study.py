"""P-GRAFT on layouts: its gain over the base at one round, and GRAFT against P-GRAFT at two t.

    python benchmarks/layout_study.py --models DIR [--seeds 0 1 2] [--levels 10 15]
        [--out benchmarks/results/layout_study]

DIR holds `pgraft pretrain layout --out DIR` (corpus/, ddpm/, encoder/). Per seed (run.seed and
train.seed): one round of configs/layout.yaml (best-of-8, P-GRAFT at its train.t_step), whose
evaluation gives the base and the fine-tuned composite on the same fresh seeds: layout_quality,
the Fréchet distance in the layout encoder's space to the held-out pages, and the three quality
terms. Then the same accepted set is trained as GRAFT (x_0) and at every --levels step and each is
evaluated on those seeds. Writes <out>.json, <out>.md (mean ± s.e. over seeds) and <out>.png.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pgraft.config import load_config  # noqa: E402
from pgraft.metrics import mean_and_stderr  # noqa: E402

METRICS = ("reward", "frechet_distance", "overlap", "alignment", "out_of_page")


def config(args, seed: int, run_uri: str, *extra: str):
    return load_config("configs/layout.yaml", [
        f"run.uri={run_uri}", f"run.seed={seed}", f"train.seed={seed}", f"task.dir={args.models}",
        "task.pretrain=false", f"train.eval_samples_per_prompt={args.eval_samples}", *extra])


def figures(variant: dict) -> dict:
    return {"reward": variant["reward_mean"], "frechet_distance": variant["frechet_distance"], **variant["task_metrics"]}


def one_seed(args, seed: int, root: Path) -> dict:
    from pipelines.pgraft_round import run_round_pipeline
    from stages.evaluate import evaluate_variant
    from stages.train import run_train

    start = time.perf_counter()
    cfg = config(args, seed, str(root / f"seed{seed}"))
    run_round_pipeline(cfg, progress=False)
    evaluation = json.loads(Path(cfg.run.uri, "round-000/eval/summary.json").read_text())["variants"]
    trained = json.loads(Path(cfg.run.uri, f"round-000/train/{cfg.train_output()[1]}/summary.json").read_text())
    out = {"base": figures(evaluation["base"]), "levels": {str(cfg.train.t_step): figures(evaluation["finetuned"])},
           "t_levels": {str(cfg.train.t_step): trained["t_level"] or 0.0}}
    for k in [cfg.model.num_inference_steps, *args.levels]:
        if str(k) in out["levels"]:
            continue
        level = config(args, seed, cfg.run.uri, f"train.t_step={k}")
        result = run_train(level, progress=False)
        out["levels"][str(k)] = figures(evaluate_variant(level, f"t{k}", result.model_dir, progress=False))
        out["t_levels"][str(k)] = result.t_level or 0.0
    out["seconds"] = time.perf_counter() - start
    for k, fig in sorted(out["levels"].items(), key=lambda kv: -int(kv[0])):
        print(f"seed {seed} x_{k}: reward {out['base']['reward']:.4f} → {fig['reward']:.4f}, FD "
              f"{out['base']['frechet_distance']:.3f} → {fig['frechet_distance']:.3f}", flush=True)
    return out


def aggregate(runs: dict) -> dict:
    seeds = list(runs)
    base = {m: mean_and_stderr([runs[s]["base"][m] for s in seeds]) for m in METRICS}
    levels = {}
    for k in runs[seeds[0]]["levels"]:
        levels[k] = {"t_level": runs[seeds[0]]["t_levels"][k], **{
            m: mean_and_stderr([runs[s]["levels"][k][m] for s in seeds]) for m in METRICS},
            "reward_gain": mean_and_stderr([runs[s]["levels"][k]["reward"] - runs[s]["base"]["reward"] for s in seeds])}
    return {"base": base, "levels": levels}


def _pm(pair, digits=4) -> str:
    mean, se = pair
    return f"{mean:.{digits}f} ± {se:.{digits}f}" if math.isfinite(se) else f"{mean:.{digits}f}"


def table(results: dict) -> str:
    agg = results["aggregate"]
    lines = [f"Layouts (layout_quality reward), {len(results['seeds'])} seeds, one round of configs/layout.yaml, "
             f"{results['args']['eval_samples']} fresh layouts per prompt per variant. Mean ± s.e. over seeds; "
             "overlap, alignment, out-of-page: lower is better.", "",
             "| sampler | layout_quality | gain | FD (encoder) | overlap | alignment | out-of-page |",
             "|---|---|---|---|---|---|---|"]
    b = agg["base"]
    lines.append(f"| base | {_pm(b['reward'])} | | {_pm(b['frechet_distance'], 3)} | {_pm(b['overlap'])} | "
                 f"{_pm(b['alignment'])} | {_pm(b['out_of_page'])} |")
    for k, level in sorted(agg["levels"].items(), key=lambda kv: kv[1]["t_level"]):
        where = "GRAFT (x_0)" if level["t_level"] == 0 else f"P-GRAFT x_{k} (t = {level['t_level']:g})"
        lines.append(f"| {where} | {_pm(level['reward'])} | {_pm(level['reward_gain'])} | "
                     f"{_pm(level['frechet_distance'], 3)} | {_pm(level['overlap'])} | {_pm(level['alignment'])} | "
                     f"{_pm(level['out_of_page'])} |")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    agg = results["aggregate"]
    order = sorted(agg["levels"].items(), key=lambda kv: kv[1]["t_level"])
    labels = ["base"] + [("GRAFT" if v["t_level"] == 0 else f"t={v['t_level']:g}") for _, v in order]
    rows = [agg["base"]] + [v for _, v in order]
    fig, axes = plt.subplots(1, len(METRICS), figsize=(3.4 * len(METRICS), 3.2))
    for ax, metric in zip(axes, METRICS):
        ax.bar(labels, [r[metric][0] for r in rows], yerr=[0 if not math.isfinite(r[metric][1]) else r[metric][1]
                                                            for r in rows], capsize=3, color="#8899cc")
        ax.set_title(metric, fontsize=10)
        ax.tick_params(axis="x", labelsize=8, rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    from study_output import write_study

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", required=True, help="the folder of `pgraft pretrain layout --out`")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--levels", type=int, nargs="*", default=[15], help="more P-GRAFT t_steps beside the config's")
    parser.add_argument("--eval-samples", type=int, default=64)
    parser.add_argument("--work", default=None, help="where the runs go (default: a temporary folder)")
    parser.add_argument("--out", default="benchmarks/results/layout_study")
    args = parser.parse_args()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.work or tmp)
        runs = {seed: one_seed(args, seed, root) for seed in args.seeds}
    results = {"args": vars(args), "seeds": args.seeds, "runs": runs, "aggregate": aggregate(runs),
               "seconds": time.perf_counter() - start}
    write_study(results, Path(args.out), table, plot)


if __name__ == "__main__":
    main()
