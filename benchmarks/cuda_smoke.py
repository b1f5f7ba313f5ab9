"""CUDA smoke check (run where a GPU is): adapters in fp32 and bf16 against the CPU, then a real
digits round — generate → reward → filter → DeepSpeed train (bf16, NCCL, ZeRO 0 and 2) → the
composite sampler — on the GPU, without Ray (the stage workers are plain classes).

    python benchmarks/cuda_smoke.py
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]


def main() -> None:
    from pgraft.config import ModelSection, load_config
    from pgraft.models.adapters import load_adapter
    from pgraft.tasks import digits
    from tiny_models import save_tiny_sd

    assert torch.cuda.is_available(), "no CUDA device"
    print("device", torch.cuda.get_device_name(0), "torch", torch.__version__)
    tmp = Path(tempfile.mkdtemp())
    sd = save_tiny_sd(tmp / "sd", "v_prediction")
    ref = load_adapter(ModelSection(kind="stable_diffusion", path=str(sd), num_inference_steps=10, guidance_scale=3.0,
                                    device="cpu")).rollout(["a cat", "a dog"], [1, 2], [5])
    for dtype in ("float32", "bfloat16"):
        t0 = time.perf_counter()
        got = load_adapter(ModelSection(kind="stable_diffusion", path=str(sd), num_inference_steps=10, guidance_scale=3.0,
                                        device="cuda", dtype=dtype)).rollout(["a cat", "a dog"], [1, 2], [5])
        err = max((got.latents[k] - ref.latents[k]).abs().max().item() for k in ref.latents)
        print(f"SD tiny v-pred on cuda {dtype}: max |latent - cpu| = {err:.2e}, x_T equal: "
              f"{torch.equal(got.latents['x_T'], ref.latents['x_T'])}, {time.perf_counter() - t0:.1f} s")

    t0 = time.perf_counter()
    digits.pretrain_digits(tmp / "models", ddpm_steps=300, flow_steps=0, classifier_epochs=10, eval_samples_per_digit=0,
                           progress=False)
    print(f"pretrain (300 steps, CPU data, default device) {time.perf_counter() - t0:.0f} s")

    from pgraft.shards import list_committed
    from pgraft.storage import open_storage
    from stages.filter import run_filter
    from stages.generate import GenerateWorker, plan_units, record_run_config, resolve_prompts
    from stages.reward import RewardWorker
    from stages.train import run_train

    cfg = load_config(REPO / "configs/digits.yaml", [
        f"run.uri={tmp / 'run'}", f"task.dir={tmp / 'models'}", f"model.path={tmp / 'models/ddpm'}", "model.device=cuda",
        "generate.samples_per_prompt=64", "generate.capture_steps=[15]", "reward.device=cuda", "train.epochs=null", "train.steps=100",
        "train.checkpoint_every=50",
    ])
    storage = open_storage(cfg.run.uri)
    record_run_config(storage, cfg)
    tree = cfg.model_dump(mode="json")
    worker = GenerateWorker(tree, resolve_prompts(cfg.generate.prompts))
    t0 = time.perf_counter()
    for unit in plan_units(10, 64, cfg.generate.samples_per_shard):
        worker(unit)
    print(f"generate 640 samples on cuda: {640 / (time.perf_counter() - t0):.0f} samples/s")
    scorer = RewardWorker(tree)
    for sid, rec in list_committed(storage, 0).items():
        scorer((sid, vars(rec)))
    print(run_filter(cfg, progress=False).render())
    for zero in (0, 2):
        run_cfg = cfg.model_copy(deep=True)
        run_cfg.train.zero_stage, run_cfg.train.name = zero, f"zero{zero}"
        summary = run_train(run_cfg, progress=False)
        print(summary.render())
        print(f"  deepspeed: bf16={summary.deepspeed['bf16']['enabled']} zero={zero} (train ranks on Ray actors, NCCL on the GPU)")
    from stages.evaluate import run_evaluate

    eval_cfg = cfg.model_copy(deep=True)
    eval_cfg.train.name, eval_cfg.train.eval_samples_per_prompt = "zero0", 50
    result = run_evaluate(eval_cfg, progress=False)  # generate + reward actors on the GPU
    base, after = result.variants["base"]["reward_mean"], result.variants["finetuned"]["reward_mean"]
    print(f"composite on cuda: alignment {base:.3f} (base) -> {after:.3f} (P-GRAFT, 100 steps)")


if __name__ == "__main__":
    main()
