"""GRAFT (t = 0) against P-GRAFT at each captured t on the digits task, on the same accepted samples.

    python benchmarks/digits_study.py [--seeds 0 1 2] [--capture 5 10 15] [--samples-per-prompt 128]
                                      [--epochs 50] [--eval-samples-per-prompt 50] [--out benchmarks/results/digits_study]

Per seed (run.seed), through the stages on a local Ray: one generation that captures x_k at
every --capture step (and x_0), one reward table (digits_alignment, perceptual hash), two
selections on it (best-of-8, and best-of-8 after dedup within prompt), then for each selection
one training per level: GRAFT on x_0 (t_step = num_inference_steps) and P-GRAFT on each x_k,
all with the same steps (--epochs passes over the accepted set, rounded up to whole batches).
Each trained composite and the base then draw --eval-samples-per-prompt fresh samples per
prompt (the evaluate stage's seeds, never used in training), scored by:
  - reward: the reward classifier's P(prompted digit), the quantity the selection optimised;
  - alignment: the same probability under an independent classifier (another seed), so that
    a gain that only fools the reward model shows up as a gap between the two;
  - Fréchet distance to the real digits in the reward classifier's feature space, and
    within-prompt diversity (evaluate stage);
  - implied KL of the selection (closed form, filter stage).
Writes <out>.json, <out>.md (mean ± s.e. over seeds) and <out>.png.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pgraft.config import load_config  # noqa: E402
from pgraft.metrics import mean_and_stderr  # noqa: E402

SELECTIONS = {"best-of-8": False, "best-of-8 + dedup": True}  # label → filter.dedup
METRICS = ("reward_gain", "alignment_gain", "frechet_distance", "diversity")


def evaluate(cfg, variant: str, model: str | None, independent) -> dict:
    """The evaluate stage's summary of one variant (fresh seeds), plus the independent
    classifier's alignment on the same images."""
    from pgraft.report import eval_samples
    from pgraft.storage import open_storage
    from pgraft.tasks.digits import prompt_alignment
    from stages.evaluate import evaluate_variant

    summary = evaluate_variant(cfg, variant, model, progress=False)
    images, _ = eval_samples(open_storage(cfg.run.uri), 0, variant, per_prompt=10**5)
    with torch.no_grad():
        alignment = np.concatenate([prompt_alignment(independent, np.stack(imgs), [p] * len(imgs))
                                    for p, imgs in images.items()])
    return {"reward": summary["reward_mean"], "reward_stderr": summary["reward_stderr"],
            "alignment": float(alignment.mean()), "frechet_distance": summary["frechet_distance"],
            "diversity": summary["diversity"]}


def run_seed(args, seed: int, run_uri: str, independent) -> dict:
    from pgraft.storage import open_storage
    from stages.filter import read_accepted, run_filter
    from stages.generate import run_generate
    from stages.reward import run_reward
    from stages.train import run_train

    steps_total = 20
    cfg = load_config("configs/digits.yaml", [
        f"run.uri={run_uri}", f"run.seed={seed}", f"task.dir={args.models}", "model.device=cpu",
        f"model.num_inference_steps={steps_total}", f"generate.samples_per_prompt={args.samples_per_prompt}",
        f"generate.capture_steps=[{', '.join(map(str, args.capture))}]", "reward.hash=perceptual",
        f"train.eval_samples_per_prompt={args.eval_samples_per_prompt}", f"train.seed={seed}",
    ])
    t0 = time.perf_counter()
    run_generate(cfg, progress=False)
    run_reward(cfg, progress=False)
    base = evaluate(cfg, "base", None, independent)
    out = {"base": base, "selections": {}, "generate_and_base_seconds": time.perf_counter() - t0}
    print(f"seed {seed}: base reward {base['reward']:.3f}, alignment {base['alignment']:.3f}, "
          f"FD {base['frechet_distance']:.1f}, diversity {base['diversity']:.2f}", flush=True)
    accepted_sets = {}
    for label, dedup in SELECTIONS.items():
        sel_cfg = cfg.model_copy(deep=True)
        sel_cfg.filter.dedup = dedup
        selection = run_filter(sel_cfg, progress=False)
        steps = math.ceil(args.epochs * selection.rows_accepted / cfg.train.batch_size)
        entry = {"accepted": selection.rows_accepted, "considered": selection.rows_considered, "kl": selection.kl,
                 "steps": steps, "levels": {}}
        keys = tuple(read_accepted(open_storage(run_uri), 0, selection.name)["key"].to_pylist())
        same_as = accepted_sets.get(keys)
        accepted_sets.setdefault(keys, label)
        if same_as is not None:
            # The same accepted rows (dedup removed nothing): the same training data, so its
            # trainings would repeat the earlier ones bit for bit. Their results are reused.
            entry.update(levels=out["selections"][same_as]["levels"], same_accepted_set_as=same_as)
            out["selections"][label] = entry
            print(f"seed {seed} {label}: the same {len(keys)} accepted samples as {same_as} "
                  f"({selection.rows_considered} of {selection.rows_in} rows left after dedup); results reused",
                  flush=True)
            continue
        for k in [steps_total, *sorted(args.capture, reverse=True)]:
            train_cfg = sel_cfg.model_copy(deep=True)
            train_cfg.train.t_step, train_cfg.train.steps, train_cfg.train.epochs = k, steps, None
            train_cfg.train.checkpoint_every = steps
            t1 = time.perf_counter()
            trained = run_train(train_cfg, progress=False)
            result = evaluate(train_cfg, trained.name, trained.model_dir, independent)
            level = "0 (GRAFT)" if trained.t_level is None else f"{trained.t_level:g}"
            result.update(t_level=0.0 if trained.t_level is None else trained.t_level, t_step=k,
                          reward_gain=result["reward"] - base["reward"],
                          alignment_gain=result["alignment"] - base["alignment"], seconds=time.perf_counter() - t1)
            entry["levels"][str(k)] = result
            print(f"seed {seed} {label} t={level}: reward {base['reward']:.3f}→{result['reward']:.3f}, alignment "
                  f"{base['alignment']:.3f}→{result['alignment']:.3f}, FD {result['frechet_distance']:.1f}, "
                  f"diversity {result['diversity']:.2f} ({steps} steps on {selection.rows_accepted}, "
                  f"{result['seconds']:.0f} s)", flush=True)
        out["selections"][label] = entry
    return out


def aggregate(runs: dict) -> dict:
    """mean ± s.e. over seeds of every metric, per selection and level; the base's too."""
    seeds = list(runs)
    first = runs[seeds[0]]
    out = {"base": {m: mean_and_stderr([runs[s]["base"][m] for s in seeds])
                    for m in ("reward", "alignment", "frechet_distance", "diversity")}, "selections": {}}
    for label, entry in first["selections"].items():
        sel = {"kl": entry["kl"], "accepted": mean_and_stderr([runs[s]["selections"][label]["accepted"] for s in seeds]),
               "steps": [runs[s]["selections"][label]["steps"] for s in seeds], "levels": {}}
        graft = str(max(int(k) for k in entry["levels"]))  # t_step = num_inference_steps: x_0
        for k, level in entry["levels"].items():
            per_seed = [runs[s]["selections"][label]["levels"] for s in seeds]
            sel["levels"][k] = {"t_level": level["t_level"], **{
                m: mean_and_stderr([levels[k][m] for levels in per_seed]) for m in ("reward", "alignment", *METRICS)}}
            # Paired by seed (same generation, same accepted set, same evaluation seeds): P-GRAFT − GRAFT.
            sel["levels"][k]["minus_graft"] = {
                m: mean_and_stderr([levels[k][m] - levels[graft][m] for levels in per_seed]) for m in METRICS}
        same = {runs[s]["selections"][label].get("same_accepted_set_as") for s in seeds}
        if len(same) == 1 and None not in same:
            sel["same_accepted_set_as"] = same.pop()
        out["selections"][label] = sel
    return out


def _pm(pair, digits=3) -> str:
    mean, se = pair
    return f"{mean:.{digits}f} ± {se:.{digits}f}" if math.isfinite(se) else f"{mean:.{digits}f}"


def table(results: dict) -> str:
    agg = results["aggregate"]
    b = agg["base"]
    lines = [f"Digits, {len(results['seeds'])} seeds, {results['samples_per_prompt']} samples per prompt, "
             f"{results['eval_samples_per_prompt']} fresh evaluation samples per prompt, {results['epochs']} epochs "
             "over the accepted set. Mean ± s.e. over seeds.", "",
             f"Base: reward {_pm(b['reward'])}, independent alignment {_pm(b['alignment'])}, "
             f"Fréchet distance {_pm(b['frechet_distance'], 1)}, diversity {_pm(b['diversity'], 2)}.", "",
             "| selection | implied KL | accepted | trained on | reward gain | alignment gain (independent) | "
             "Fréchet distance | diversity |", "|---|---|---|---|---|---|---|---|"]
    notes = []
    for label, sel in agg["selections"].items():
        if sel.get("same_accepted_set_as"):
            notes.append(f"{label}: accepted exactly the samples of {sel['same_accepted_set_as']} in every seed "
                         "(dedup removed nothing), so its rows repeat those results.")
            continue
        for k, level in sel["levels"].items():
            where = "x_0 (GRAFT, t = 0)" if level["t_level"] == 0 else f"x_{k} (P-GRAFT, t = {level['t_level']:g})"
            lines.append(f"| {label} | {sel['kl']:.3f} | {sel['accepted'][0]:.0f} | {where} | "
                         f"{_pm(level['reward_gain'])} | {_pm(level['alignment_gain'])} | "
                         f"{_pm(level['frechet_distance'], 1)} | {_pm(level['diversity'], 2)} |")
    lines += ["", "P-GRAFT minus GRAFT, paired by seed (same samples, same accepted set, same evaluation seeds):", "",
              "| selection | trained on | Δ reward gain | Δ alignment gain | Δ Fréchet distance | Δ diversity |",
              "|---|---|---|---|---|---|"]
    for label, sel in agg["selections"].items():
        for k, level in sel["levels"].items():
            if level["t_level"] == 0 or sel.get("same_accepted_set_as"):
                continue
            d = level["minus_graft"]
            lines.append(f"| {label} | x_{k} (t = {level['t_level']:g}) | {_pm(d['reward_gain'])} | "
                         f"{_pm(d['alignment_gain'])} | {_pm(d['frechet_distance'], 1)} | {_pm(d['diversity'], 2)} |")
    return "\n".join(lines + [""] + notes) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    agg = results["aggregate"]
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.4))
    titles = {"reward_gain": "reward gain", "alignment_gain": "alignment gain (independent classifier)",
              "frechet_distance": "Fréchet distance", "diversity": "within-prompt diversity"}
    shown = {label: sel for label, sel in agg["selections"].items() if not sel.get("same_accepted_set_as")}
    for (label, sel), marker in zip(shown.items(), ("o", "s")):
        levels = sorted(sel["levels"].values(), key=lambda v: v["t_level"])
        t = [v["t_level"] for v in levels]
        for ax, metric in zip(axes, METRICS):
            ax.errorbar(t, [v[metric][0] for v in levels], yerr=[v[metric][1] for v in levels], marker=marker,
                        capsize=3, label=label)
    for ax, metric in zip(axes, METRICS):
        if metric in ("frechet_distance", "diversity"):
            ax.axhline(agg["base"][metric][0], color="#888888", linestyle="--", label="base")
        ax.set_title(titles[metric], fontsize=10)
        ax.set_xlabel("training level t (0 = GRAFT)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="models/digits", help="the digits task's models (pgraft pretrain digits)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--capture", type=int, nargs="+", default=[5, 10, 15], help="captured steps of 20")
    parser.add_argument("--samples-per-prompt", type=int, default=128)
    parser.add_argument("--epochs", type=float, default=50, help="passes over the accepted set per training")
    parser.add_argument("--eval-samples-per-prompt", type=int, default=50)
    parser.add_argument("--run", default=None, help="run folder (default: a new temp folder)")
    parser.add_argument("--out", default="benchmarks/results/digits_study")
    parser.add_argument("--tables-only", action="store_true", help="rewrite <out>.md and .png from <out>.json")
    args = parser.parse_args()
    out = Path(args.out)
    if args.tables_only:
        results = json.loads(out.with_suffix(".json").read_text())
        results["aggregate"] = aggregate(results["runs"])
        write_results(results, out)
        return

    import ray

    from pgraft.tasks.digits import train_classifier

    if not Path(args.models, "classifier").is_dir():
        sys.exit(f"{args.models}/classifier not found: run `pgraft pretrain digits --out {args.models}` first")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    independent, accuracy = train_classifier(seed=1, epochs=30)  # never seen by the reward or the selection
    independent.eval()
    print(f"independent classifier (seed 1): held-out accuracy {accuracy:.3f}", flush=True)
    root = args.run or tempfile.mkdtemp(prefix="digits-study-")
    start = time.perf_counter()
    runs = {seed: run_seed(args, seed, f"{root}/seed-{seed}", independent) for seed in args.seeds}
    results = {"seeds": args.seeds, "capture": args.capture, "samples_per_prompt": args.samples_per_prompt,
               "epochs": args.epochs, "eval_samples_per_prompt": args.eval_samples_per_prompt,
               "independent_classifier_accuracy": accuracy, "runs": {str(s): r for s, r in runs.items()},
               "seconds": time.perf_counter() - start}
    results["aggregate"] = aggregate(runs)
    write_results(results, out)
    print(f"in {results['seconds'] / 60:.1f} min")


def write_results(results: dict, out: Path) -> None:
    from study_output import write_study

    write_study(results, out, table, plot)


if __name__ == "__main__":
    main()
