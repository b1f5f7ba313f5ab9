"""Generate-stage throughput ÷ a bare pipeline call's, same model, batch size and sampler, one run.

    python benchmarks/generate_overhead.py [--model models/digits/ddpm] [--samples 2560]

The bare baseline calls the diffusers pipeline directly (no capture, no shards, no Ray) on
all CPUs of this process. The stage runs one Ray actor holding the same CPUs, capturing
three steps and writing committed shards to a local run folder. Ray is started before the
clock starts (a cluster is up before a job runs); actor start and model load are inside it.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pgraft.config import ModelSection, load_config  # noqa: E402
from pgraft.models.adapters import load_adapter  # noqa: E402


def ensure_model(path: str | None, scratch: Path) -> str:
    if path and Path(path).exists():
        return path
    # No pretrained digits model: the same architecture with random weights costs the same.
    import diffusers

    from pgraft.tasks import digits

    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(**digits.unet_config())
    sched = diffusers.DDIMScheduler.from_config(
        diffusers.DDPMScheduler(beta_schedule="squaredcos_cap_v2").config, timestep_spacing="leading")
    digits.save_base(unet, sched, scratch / "model", "ddpm")
    return str(scratch / "model")


def bare_pipeline(model_path: str, samples: int, batch: int, steps: int, guidance: float) -> float:
    adapter = load_adapter(ModelSection(path=model_path, num_inference_steps=steps, guidance_scale=guidance, device="cpu"))
    pipe = adapter.pipe
    labels = torch.arange(samples) % 10
    start = time.perf_counter()
    for lo in range(0, samples, batch):
        gens = [torch.Generator().manual_seed(i) for i in range(lo, min(lo + batch, samples))]
        pipe(class_labels=labels[lo:lo + batch], null_class=10, num_inference_steps=steps, guidance_scale=guidance,
             generator=gens, output_type="np")
    return samples / (time.perf_counter() - start)


def stage(model_path: str, samples: int, batch: int, steps: int, guidance: float, workers: int, run: Path) -> float:
    import cluster
    from stages.generate import run_generate

    cluster.connect()
    cfg = load_config(None, [
        f"run.uri={run}", f"model.path={model_path}", f"model.num_inference_steps={steps}",
        f"model.guidance_scale={guidance}", "model.device=cpu", f"generate.samples_per_prompt={samples // 10}",
        f"generate.batch_size={batch}", f"generate.samples_per_shard={4 * batch}", f"generate.num_workers={workers}",
        "generate.capture_steps=[5, 10, 15]",
    ])
    start = time.perf_counter()
    summary = run_generate(cfg, progress=False)
    assert summary.samples_written == samples
    return samples / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="models/digits/ddpm")
    parser.add_argument("--samples", type=int, default=2560)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=0.7)
    args = parser.parse_args()
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        model = ensure_model(args.model, scratch)
        bare_pipeline(model, args.batch, args.batch, args.steps, args.guidance)  # warm-up
        bare = bare_pipeline(model, args.samples, args.batch, args.steps, args.guidance)
        one = stage(model, args.samples, args.batch, args.steps, args.guidance, 1, scratch / "run1")
        two = stage(model, args.samples, args.batch, args.steps, args.guidance, 2, scratch / "run2")
    print(f"model {model}, {args.samples} samples, batch {args.batch}, {args.steps} steps, {threads} CPU threads")
    print(f"bare pipeline call            {bare:8.1f} samples/s")
    print(f"generate stage, 1 actor       {one:8.1f} samples/s   ratio {one / bare:.3f}")
    print(f"generate stage, 2 actors      {two:8.1f} samples/s   ratio {two / bare:.3f}")


if __name__ == "__main__":
    main()
