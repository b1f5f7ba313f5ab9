"""Generate-stage throughput ÷ a bare pipeline call's, same model, batch size, sampler and device, one run.

    python benchmarks/generate_overhead.py [--model models/digits/ddpm] [--samples 2560] [--device cpu|cuda]

The bare baseline calls the diffusers pipeline directly (no capture, no shards, no Ray) on
the device (on the CPU: all CPUs of this process). The stage runs with 1 and then 2 Ray
actors (on the CPU they split the same CPUs; on CUDA one GPU each, as many as there are),
capturing three steps and writing committed shards to a local run folder. Ray is started
before the clock starts (a cluster is up before a job runs); actor start and model load are
inside it. Per stage run it prints samples/s and its ratio to the bare call, the same while
the actors work (from their first rollout to their last commit: start-up excluded), the
device-idle fraction over that span and bytes written per sample; the 1- and 2-actor
samples/s are the stage's scaling figures.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cluster  # noqa: E402
from pgraft.config import ModelSection, load_config  # noqa: E402
from pgraft.models.adapters import load_adapter, synchronize  # noqa: E402
from stages.generate import GenerateSummary, run_generate  # noqa: E402


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


def bare_pipeline(model_path: str, samples: int, batch: int, steps: int, guidance: float, device: str) -> float:
    adapter = load_adapter(ModelSection(path=model_path, num_inference_steps=steps, guidance_scale=guidance, device=device))
    pipe = adapter.pipe
    labels = torch.arange(samples) % 10
    start = time.perf_counter()
    for lo in range(0, samples, batch):
        gens = [torch.Generator().manual_seed(i) for i in range(lo, min(lo + batch, samples))]
        pipe(class_labels=labels[lo:lo + batch], null_class=10, num_inference_steps=steps, guidance_scale=guidance,
             generator=gens, output_type="np")
    synchronize(adapter.device)  # the clock stops when the device is done, not when the last call was queued
    return samples / (time.perf_counter() - start)


def stage(model_path: str, samples: int, batch: int, steps: int, guidance: float, device: str, workers: int,
          run: Path) -> tuple[float, GenerateSummary]:
    cluster.connect()
    cfg = load_config(None, [
        f"run.uri={run}", f"model.path={model_path}", f"model.num_inference_steps={steps}",
        f"model.guidance_scale={guidance}", f"model.device={device}", f"generate.samples_per_prompt={samples // 10}",
        f"generate.batch_size={batch}", f"generate.samples_per_shard={4 * batch}", f"generate.num_workers={workers}",
        "generate.capture_steps=[5, 10, 15]",
    ])
    start = time.perf_counter()
    summary = run_generate(cfg, progress=False)
    assert summary.samples_written == samples
    return samples / (time.perf_counter() - start), summary


def stage_line(bare: float, rate: float, summary: GenerateSummary) -> str:
    """Whole stage (actor start and model load included), and while the actors work: from their
    first rollout to their last commit, where a host that held the device up would show."""
    label = f"generate stage, {summary.workers} actor{'s' if summary.workers > 1 else ''}"
    working = summary.samples_written / summary.working_seconds
    return (f"{label:<30}{rate:8.1f} samples/s   ratio {rate / bare:.3f}   working {working:6.1f} samples/s "
            f"ratio {working / bare:.3f}   device idle {summary.device_idle_fraction:.1%}"
            f"   {summary.bytes_written / summary.samples_written / 1e3:.1f} kB/sample")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="models/digits/ddpm")
    parser.add_argument("--samples", type=int, default=2560)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=0.7)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    threads = torch.get_num_threads()
    setting = (args.batch, args.steps, args.guidance, args.device)
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        model = ensure_model(args.model, scratch)
        bare_pipeline(model, args.batch, *setting)  # warm-up
        first = bare_pipeline(model, args.samples, *setting)
        one = stage(model, args.samples, *setting, 1, scratch / "run1")
        two = stage(model, args.samples, *setting, 2, scratch / "run2")
        # This machine's speed drifts between runs; the faster of two bare runs (before and
        # after the stage) is the baseline, so the ratios are not flattered by a slow one.
        bare = max(first, bare_pipeline(model, args.samples, *setting))
    where = f"{threads} CPU threads" if args.device == "cpu" else torch.cuda.get_device_name()
    print(f"model {model}, {args.samples} samples, batch {args.batch}, {args.steps} steps, {args.device} ({where})")
    print(f"bare pipeline call            {bare:8.1f} samples/s (faster of {first:.1f} before and the run after)")
    print(stage_line(bare, *one))
    print(stage_line(bare, *two))
    print(f"scaling, {two[1].workers} ÷ {one[1].workers} actors    {two[0] / one[0]:8.3f}")


if __name__ == "__main__":
    main()
