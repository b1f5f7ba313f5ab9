"""Train-stage throughput ÷ a bare torch training loop on the same model and batches, one run.

    python benchmarks/train_throughput.py [--model models/digits/ddpm] [--steps 150] [--batch 64]

Builds a small real run (generate → reward → filter best-of-8 on the digits task), then
  * the train stage (DeepSpeed engine, fp32 on CPU, on its Ray actor group) for --steps steps with 1 and
    with 2 ranks (the same global batch): its own samples/s over the steps
    (start-up excluded) and the fraction of step time spent preparing data;
  * a bare loop, run before and after the stage: the same UNet, AdamW, batch size and P-GRAFT targets, plain
    `loss.backward(); opt.step()`, batches built in advance, the first 10 steps untimed.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pgraft import targets  # noqa: E402
from pgraft.config import load_config  # noqa: E402


def bare_loop(model_path: str, latents: torch.Tensor, labels: torch.Tensor, visited: torch.Tensor, t_level: float,
              steps: int, batch: int, lr: float, warmup: int = 10) -> float:
    import diffusers

    unet = diffusers.UNet2DModel.from_pretrained(Path(model_path) / "unet")
    sched = diffusers.DDIMScheduler.from_pretrained(Path(model_path) / "scheduler")
    opt = torch.optim.AdamW(unet.parameters(), lr=lr)
    g = torch.Generator().manual_seed(0)
    t_coef = targets.ddpm_coefficients(sched.alphas_cumprod, torch.tensor([t_level]))
    batches = []
    for _ in range(steps):
        idx = torch.randint(0, len(latents), (batch,), generator=g)
        s = visited[torch.randint(0, len(visited), (batch,), generator=g)]
        x_s, target = targets.training_pair(latents[idx], targets.ddpm_coefficients(sched.alphas_cumprod, s), t_coef,
                                            torch.randn(latents[idx].shape, generator=g), "epsilon")
        batches.append((x_s, s, labels[idx], target))
    unet.train()
    start = time.perf_counter()
    for i, (x_s, s, y, target) in enumerate(batches):
        if i == warmup:
            start = time.perf_counter()
        loss = torch.nn.functional.mse_loss(unet(x_s, s, class_labels=y).sample, target)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)  # the stage clips too
        opt.step()
    return (steps - warmup) * batch / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="models/digits/ddpm")
    parser.add_argument("--classifier", default="models/digits/classifier")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    if not Path(args.model).exists():
        sys.exit(f"no model at {args.model}: run `pgraft pretrain digits --out models/digits` first")

    from stages.filter import run_filter
    from stages.generate import run_generate
    from stages.reward import run_reward
    from stages.train import load_accepted, run_train

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config("configs/digits.yaml", [
            f"run.uri={tmp}/run", f"model.path={args.model}", f"reward.model_path={args.classifier}",
            "generate.capture_steps=[15]", "train.t_step=15", "train.epochs=null", f"train.steps={args.steps}",
            f"train.batch_size={args.batch}", "train.checkpoint_every=100000", "model.device=cpu",
        ])
        for stage in (run_generate, run_reward, run_filter):
            stage(cfg, progress=False)
        from pgraft.models.adapters import load_adapter
        from pgraft.storage import open_storage

        data = load_accepted(open_storage(cfg.run.uri), cfg, cfg.filter.selection_name())
        labels = load_adapter(cfg.model).class_ids(data.prompts)
        visited = torch.tensor(data.model_timesteps).long()  # the sampler's model calls before x_15
        bare_args = (args.model, data.latents, labels, visited, data.t_level, args.steps, args.batch, cfg.train.lr)
        before = bare_loop(*bare_args)
        runs = {}
        for workers in (1, 2):
            stage_cfg = cfg.model_copy(deep=True)
            stage_cfg.train.num_workers, stage_cfg.train.name = workers, f"bench-{workers}w"
            runs[workers] = run_train(stage_cfg, progress=False)
            assert runs[workers].timesteps_trained == [float(t) for t in visited]
        after = bare_loop(*bare_args)  # before and after: this 2-core machine drifts between runs
        bare = (before + after) / 2
    print(f"model {args.model}, {runs[1].samples} accepted latents, global batch {args.batch}, {args.steps} steps, "
          f"{torch.get_num_threads()} CPU threads for the bare loop")
    print(f"bare torch loop              {bare:8.1f} samples/s (before the stages {before:.1f}, after {after:.1f})")
    for workers, summary in runs.items():
        print(f"train stage, {workers} rank(s) {summary.samples_per_second:7.1f} samples/s   "
              f"ratio {summary.samples_per_second / bare:.3f}   data wait {summary.data_wait_fraction:.2%} of step time   "
              f"stage wall time {summary.seconds:.1f} s")


if __name__ == "__main__":
    main()
