"""Inverse Noise Correction study on the digits flow model, unconditional (docs/DESIGN.md §5).

    python benchmarks/inc_study.py [--steps 4 8 16 32] [--seeds 0 1 2] [--samples 1000]
                                   [--corrector-steps 1500] [--out benchmarks/results/inc_study]

For each base step count K: `pgraft invert` the train split of scikit-learn's digits (80 %)
through the K-step Euler sampler, then `pgraft train-corrector` a Gaussian corrector (closed
form, the baseline) and a flow corrector per seed, all through the stages on a local Ray.
Each variant (base, base + Gaussian, base + flow) then draws --samples unconditional images
per seed, through the same adapter the generate stage uses (model.noise_corrector set), and
is compared with the held-out test split (20 %): Fréchet distance in pixel space (64-D, model
space) and in the reward classifier's penultimate feature space. FLOPs per image are counted
by torch's FLOP counter: K forwards of the base UNet (one per step: the null condition needs
no guidance), plus the corrector's steps and its z = μ + L·u. The floor is the Fréchet
distance of the train split itself to the test split.

Writes <out>.json, <out>.md (the table) and <out>.png (distance against FLOPs per image).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pgraft.config import load_config  # noqa: E402
from pgraft.metrics import frechet_distance_of, mean_and_stderr  # noqa: E402

VARIANTS = ("base", "gaussian", "flow")


def features(images: np.ndarray, classifier) -> dict[str, np.ndarray]:
    from pgraft.tasks.digits import classifier_features, uint8_to_model_space

    return {"pixel": uint8_to_model_space(images).flatten(1).double().numpy(),
            "classifier": classifier_features(classifier, images)}


def sample_images(cfg, corrector: str | None, count: int, seed: int) -> np.ndarray:
    from pgraft.contract import sample_seed
    from pgraft.models.adapters import load_adapter

    adapter = load_adapter(cfg.model.model_copy(update={"noise_corrector": corrector}))
    seeds = [sample_seed(seed, 0, 0, i) for i in range(count)]
    out = []
    for lo in range(0, count, 500):
        out.append(adapter.rollout([""] * len(seeds[lo:lo + 500]), seeds[lo:lo + 500], []).samples)
    return np.concatenate(out)


def base_flops(cfg) -> int:
    from pgraft.models.adapters import load_adapter
    from pgraft.models.corrector import network_flops

    adapter = load_adapter(cfg.model)
    null = torch.tensor([adapter.null_class])
    per_step = network_flops(lambda x: adapter.pipe.unet(x, torch.zeros(1), class_labels=null).sample,
                             adapter.latent_shape())
    return per_step * cfg.model.num_inference_steps


def run(args) -> dict:
    from pgraft.models.corrector import load_corrector
    from pgraft.tasks.digits import load_classifier, real_images
    from stages.invert import run_invert
    from stages.train_corrector import run_train_corrector

    run_uri = args.run or tempfile.mkdtemp(prefix="inc-study-")
    classifier = load_classifier(Path(args.models) / "classifier")
    test_images, _ = real_images("test")
    train_images, _ = real_images("train")
    reference = features(test_images, classifier)
    floor = {space: frechet_distance_of(features(train_images, classifier)[space], reference[space])
             for space in reference}
    print(f"floor (train split vs test split): pixel {floor['pixel']:.3f}, classifier {floor['classifier']:.3f}",
          flush=True)
    results = {"floor": floor, "samples": args.samples, "seeds": args.seeds, "corrector_steps": args.corrector_steps,
               "channels": args.channels, "sampling_steps": args.sampling_steps, "run": run_uri, "by_steps": {}}
    for k in args.steps:
        cfg = load_config("configs/digits-inc.yaml", [
            f"run.uri={run_uri}", f"model.path={Path(args.models) / 'flow'}", f"task.dir={args.models}",
            f"model.num_inference_steps={k}", "model.device=cpu", f"invert.name=train-K{k}",
            f"invert.tolerance={args.tolerance}", f"invert.max_iterations={args.max_iterations}",
            f"corrector.steps={args.corrector_steps}", f"corrector.channels={args.channels}",
            f"corrector.sampling_steps={args.sampling_steps}", f"corrector.checkpoint_every={args.corrector_steps}",
            f"corrector.include_unconverged={str(args.include_unconverged).lower()}"])
        t0 = time.perf_counter()
        inversion = run_invert(cfg, progress=False)
        print(f"K={k}: inverted {inversion.samples} digits in {time.perf_counter() - t0:.0f} s, converged "
              f"{inversion.converged}, ‖Φ(Φ⁻¹(x)) − x‖ mean {inversion.reconstruction_error_mean:.2e}, inverse-noise "
              f"RMS {inversion.noise_rms:.3f}", flush=True)
        gaussian = run_train_corrector(cfg.model_copy(update={"corrector": cfg.corrector.model_copy(
            update={"kind": "gaussian"})}), progress=False)
        flops = {"base": base_flops(cfg)}
        flops["gaussian"] = flops["base"] + load_corrector(gaussian.model_dir).flops_per_sample()
        entry = {"inversion": {"samples": inversion.samples, "converged": inversion.converged,
                               "reconstruction_error_mean": inversion.reconstruction_error_mean,
                               "reconstruction_error_max": inversion.reconstruction_error_max,
                               "iterations_mean": inversion.iterations_mean, "noise_rms": inversion.noise_rms},
                 "fits": {"gaussian": gaussian.samples}, "flops": flops, "fd": {v: {"pixel": [], "classifier": []}
                                                                               for v in VARIANTS}}
        for seed in args.seeds:
            t0 = time.perf_counter()
            flow = run_train_corrector(cfg.model_copy(update={"corrector": cfg.corrector.model_copy(
                update={"kind": "flow", "seed": seed, "name": f"flow-K{k}-s{seed}"})}), progress=False)
            train_seconds = time.perf_counter() - t0
            if "flow" not in flops:
                corrector = load_corrector(flow.model_dir)
                flops["flow"] = flops["base"] + corrector.flops_per_sample()
                entry["flow_parameters"], entry["base_parameters"] = flow.parameters, flow.base_parameters
            for variant, corrector in (("base", None), ("gaussian", gaussian.model_dir), ("flow", flow.model_dir)):
                feats = features(sample_images(cfg, corrector, args.samples, seed), classifier)
                for space in feats:
                    entry["fd"][variant][space].append(frechet_distance_of(feats[space], reference[space]))
            line = ", ".join(f"{v} {entry['fd'][v]['pixel'][-1]:.3f}/{entry['fd'][v]['classifier'][-1]:.2f}"
                             for v in VARIANTS)
            print(f"K={k} seed {seed}: FD pixel/classifier: {line} (flow corrector trained in {train_seconds:.0f} s, "
                  f"loss {flow.final_loss:.4f})", flush=True)
        results["by_steps"][str(k)] = entry
    return results


def table(results: dict) -> str:
    seeds = len(results["seeds"])
    lines = [f"| K | variant | GFLOPs/image | FD pixel (mean ± s.e., {seeds} seeds) | FD classifier features | "
             "inversion converged | ‖Φ(Φ⁻¹(x)) − x‖ |", "|---|---|---|---|---|---|---|"]
    for k, entry in results["by_steps"].items():
        inv = entry["inversion"]
        for variant in VARIANTS:
            px = mean_and_stderr(entry["fd"][variant]["pixel"])
            cl = mean_and_stderr(entry["fd"][variant]["classifier"])
            conv = f"{inv['converged']}/{inv['samples']}" if variant == "base" else ""
            err = f"{inv['reconstruction_error_mean']:.1e}" if variant == "base" else ""
            lines.append(f"| {k} | {variant} | {entry['flops'][variant] / 1e9:.3f} | {px[0]:.3f} ± {px[1]:.3f} | "
                         f"{cl[0]:.2f} ± {cl[1]:.2f} | {conv} | {err} |")
    floor = results["floor"]
    lines.append(f"| – | real train split | – | {floor['pixel']:.3f} | {floor['classifier']:.2f} | | |")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, space in zip(axes, ("pixel", "classifier")):
        for variant, style in zip(VARIANTS, ("o-", "s--", "^-.")):
            xs, ys, es = [], [], []
            for k, entry in results["by_steps"].items():
                m, se = mean_and_stderr(entry["fd"][variant][space])
                xs.append(entry["flops"][variant] / 1e9)
                ys.append(m)
                es.append(se)
            label = {"base": "base (K Euler steps)", "gaussian": "base + Gaussian corrector",
                     "flow": "base + flow corrector"}[variant]
            ax.errorbar(xs, ys, yerr=es, fmt=style, capsize=3, label=label)
            if variant == "base":
                for x, y, k in zip(xs, ys, results["by_steps"]):
                    ax.annotate(f"K={k}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.axhline(results["floor"][space], color="grey", lw=0.8, ls=":", label="real train split")
        ax.set_xscale("log")
        ax.set_xlabel("GFLOPs per image")
        ax.set_ylabel(f"Fréchet distance to held-out digits ({space})")
        ax.legend(fontsize=8)
    fig.suptitle("Inverse Noise Correction on the digits flow model (unconditional)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[4, 8, 16, 32])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--corrector-steps", type=int, default=1500)
    parser.add_argument("--channels", default="[16,32]")
    parser.add_argument("--sampling-steps", type=int, default=4)
    parser.add_argument("--tolerance", type=float, default=1e-3)
    parser.add_argument("--max-iterations", type=int, default=50)
    parser.add_argument("--include-unconverged", action="store_true")
    parser.add_argument("--models", default="models/digits")
    parser.add_argument("--run", default=None, help="run location (default: a temp folder)")
    parser.add_argument("--out", default="benchmarks/results/inc_study")
    args = parser.parse_args()
    torch.set_num_threads(2)
    start = time.perf_counter()
    results = run(args)
    results["seconds"] = time.perf_counter() - start
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    out.with_suffix(".md").write_text(table(results) + "\n")
    plot(results, out.with_suffix(".png"))
    print(table(results))
    print(f"wrote {out}.json, .md, .png in {results['seconds']:.0f} s")


if __name__ == "__main__":
    main()
