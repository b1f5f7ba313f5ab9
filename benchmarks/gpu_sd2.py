"""GPU check of the t2i task at SD 2 scale, for a lent device (one script, a few minutes on one GPU).

    python benchmarks/gpu_sd2.py                    # CUDA: SD 2 at 512 px, fp16 sampling, bf16 training
    python benchmarks/gpu_sd2.py --smoke            # tiny models on the CPU: checks the script itself
    python benchmarks/gpu_sd2.py --device cpu --parts vqascore   # one part, the real sizes, on the CPU

Weights are random, built from SD 2's architecture (the 2.x-base UNet, VAE and OpenCLIP-H text
encoder configs), saved with `save_pretrained` and loaded back through pgraft's adapter: the cost is
the architecture's, not the checkpoint's. It measures, each against a baseline run in this process:

1. sampling: a bare `pipe(...)` call (DDIM, guidance 7.5) vs pgraft's rollout capturing 3 steps
   in-process, and vs the generate stage (one Ray actor on the GPU, shards written to local disk):
   samples/s, their ratio to the bare call, and peak GPU memory;
2. training: DeepSpeed steps (bf16 on CUDA) of the T→t segment (P-GRAFT targets at the sampler's
   timesteps above t), full fine-tune and LoRA: samples/s and peak GPU memory;
3. VQAScore: a small random LLaVA-style VLM (CLIP ViT-B/16 tower, 8-layer Llama) scoring 512 px
   images in one forward per batch, at several batch sizes: images/s and peak GPU memory.

Prints one line per figure and writes them as JSON (--out).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

PARTS = ("sampling", "training", "vqascore")
PROMPTS = ["a red apple to the left of a green pear", "two cats sleeping on a striped sofa",
           "a lighthouse on a rocky cliff under a stormy sky", "a bowl with exactly five strawberries"]


# Models ------------------------------------------------------------------------------------

def save_sd2(out: Path, smoke: bool) -> Path:
    """SD 2.x-base's architecture with random weights (or a tiny one for --smoke), saved as a pipeline folder."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from tiny_models import save_tiny_sd, tiny_clip_tokenizer

    if smoke:
        return save_tiny_sd(out)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(  # stabilityai/stable-diffusion-2-1-base unet/config.json
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        attention_head_dim=(5, 10, 20, 20), cross_attention_dim=1024, use_linear_projection=True)
    vae = AutoencoderKL(  # the SD 2 VAE: 8× down, 4 latent channels
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512)
    text_encoder = CLIPTextModel(CLIPTextConfig(  # OpenCLIP ViT-H/14's text tower as SD 2 ships it
        vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=23,
        max_position_embeddings=77, hidden_act="gelu", projection_dim=512, bos_token_id=0, eos_token_id=1,
        pad_token_id=1))
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")
    StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tiny_clip_tokenizer(77), unet=unet,
                            scheduler=scheduler, safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(out)
    return out


def save_vlm(out: Path, smoke: bool) -> Path:
    """A small random LLaVA-style VLM: a CLIP ViT-B/16 tower at 224 px and an 8-layer Llama (a tiny one for --smoke)."""
    from tiny_models import save_llava, save_tiny_vlm

    if smoke:
        return save_tiny_vlm(out)
    return save_llava(out, dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                                projection_dim=512),
                      dict(hidden_size=1024, intermediate_size=2816, num_attention_heads=16, num_key_value_heads=16,
                           num_hidden_layers=8, vocab_size=32000, max_position_embeddings=2048),
                      image_size=224, patch_size=16)


# Measuring ---------------------------------------------------------------------------------

def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def shown(gib: float | None) -> str:
    return "peak n/a (CPU)" if gib is None else f"peak {gib:.1f} GiB"


def timed(fn, repeats: int, device: torch.device) -> float:
    """Seconds per call of `fn` after one untimed warm-up call, the device drained before each clock read."""
    from pgraft.models.adapters import synchronize

    fn()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / repeats


def model_section(path: Path, args, dtype: str | None = None):
    from pgraft.config import ModelSection

    return ModelSection(kind="stable_diffusion", path=str(path), scheduler="ddim", timestep_spacing="leading",
                        num_inference_steps=args.steps, guidance_scale=7.5, dtype=dtype or args.dtype, device=args.device)


def sampling(sd: Path, args, device: torch.device, figures: dict) -> None:
    from pgraft.models.adapters import initial_noise, load_adapter

    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.batch)]
    seeds = list(range(args.batch))
    capture = [args.steps * 2 // 5, args.steps * 3 // 5, args.steps * 4 // 5]
    adapter = load_adapter(model_section(sd, args))
    pipe = adapter.pipe
    noise = initial_noise(seeds, adapter.latent_shape()).to(device, adapter.dtype)

    def bare():
        pipe(prompt=prompts, num_inference_steps=args.steps, guidance_scale=7.5, latents=noise, output_type="np")

    reset_peak(device)
    bare_s = timed(bare, args.repeats, device)
    figures["bare_samples_per_s"] = args.batch / bare_s
    figures["bare_peak_gib"] = peak_gib(device)
    reset_peak(device)
    rollout_s = timed(lambda: adapter.rollout(prompts, seeds, capture), args.repeats, device)
    figures["rollout_samples_per_s"] = args.batch / rollout_s
    figures["rollout_ratio"] = bare_s / rollout_s
    figures["rollout_peak_gib"] = peak_gib(device)
    print(f"bare pipe(...), batch {args.batch}, {args.steps} steps     {figures['bare_samples_per_s']:7.2f} samples/s  "
          f"{shown(figures['bare_peak_gib'])}")
    print(f"rollout capturing x_{capture}         {figures['rollout_samples_per_s']:7.2f} samples/s  "
          f"ratio {figures['rollout_ratio']:.3f}  {shown(figures['rollout_peak_gib'])}")
    adapter = pipe = None  # free the GPU memory before the stage loads its own copy
    if device.type == "cuda":
        torch.cuda.empty_cache()
    stage(sd, args, capture, figures)


def stage(sd: Path, args, capture: list[int], figures: dict) -> None:
    """The generate stage on one Ray actor (Ray started before the clock; actor start and model load inside it)."""
    import ray

    import cluster
    from pgraft.config import load_config
    from stages.generate import run_generate

    cluster.connect()  # a local Ray, the GPU detected
    samples = args.batch * args.repeats * 2
    with tempfile.TemporaryDirectory() as run:
        prompts = Path(run) / "prompts.txt"
        prompts.write_text("\n".join(PROMPTS) + "\n")
        cfg = load_config(None, [
            f"run.uri={run}/run", "task.name=null", "reward.name=jpeg_compressibility", f"model.path={sd}",
            "model.kind=stable_diffusion", "model.scheduler=ddim", "model.timestep_spacing=leading",
            f"model.num_inference_steps={args.steps}", "model.guidance_scale=7.5", f"model.dtype={args.dtype}",
            f"model.device={args.device}", f"generate.prompts={prompts}",
            f"generate.samples_per_prompt={samples // len(PROMPTS)}", f"generate.batch_size={args.batch}",
            f"generate.samples_per_shard={args.batch * 2}", "generate.num_workers=1", f"generate.capture_steps={capture}",
        ])
        start = time.perf_counter()
        summary = run_generate(cfg, progress=False)
        seconds = time.perf_counter() - start
    ray.shutdown()
    figures["stage_samples_per_s"] = summary.samples_written / seconds
    figures["stage_working_samples_per_s"] = summary.samples_written / summary.working_seconds
    figures["stage_working_ratio"] = figures["stage_working_samples_per_s"] / figures["bare_samples_per_s"]
    figures["stage_bytes_per_sample"] = summary.bytes_written / summary.samples_written
    print(f"generate stage, 1 actor, {summary.samples_written} samples   {figures['stage_samples_per_s']:7.2f} samples/s "
          f"(start-up included); working {figures['stage_working_samples_per_s']:.2f} samples/s, ratio "
          f"{figures['stage_working_ratio']:.3f}; {figures['stage_bytes_per_sample'] / 1e3:.0f} kB/sample")


def init_single_rank(device: torch.device) -> None:
    import deepspeed

    from cluster.local_s3 import free_port

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")


def training(sd: Path, args, device: torch.device, mode: str, figures: dict) -> None:
    """DeepSpeed steps of the T→t segment on random 'accepted' x_t, with the train stage's model and config."""
    import deepspeed

    from pgraft import targets
    from pgraft.config import TrainSection
    from pgraft.models.adapters import load_adapter
    from cluster.train_group import deepspeed_config
    from stages.train.denoiser import Denoiser, path_of, trainable_parameters

    section = TrainSection(batch_size=args.train_batch, lr=1e-5, mode=mode, lora_rank=16, t_step=args.steps * 3 // 5,
                           precision="auto")
    adapter = load_adapter(model_section(sd, args, dtype="float32"))
    scheduler = adapter.scheduler
    scheduler.set_timesteps(args.steps)
    visited = scheduler.timesteps[:section.t_step].clone()
    coefficients, prediction_type = path_of(scheduler)
    t_level = float(visited[-1]) - scheduler.config.num_train_timesteps // args.steps
    t_coef = coefficients(torch.tensor([t_level]))
    t_coef = targets.PathCoefficients(t_coef.a.to(device), t_coef.sigma.to(device))
    model = Denoiser(adapter, PROMPTS)
    params = trainable_parameters(model.net, mode, section.lora_rank, section.lora_targets)
    trained = sum(p.numel() for p in params)
    reset_peak(device)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=params,
                                           config=deepspeed_config(section, "train", 1, device))
    dtype = next(engine.module.parameters()).dtype
    gen = torch.Generator().manual_seed(0)
    x_t = torch.randn((args.train_batch, *adapter.latent_shape()), generator=gen).to(device)
    prompt_idx = torch.arange(args.train_batch, device=device) % len(PROMPTS)

    def step():
        s = visited[torch.randint(0, len(visited), (args.train_batch,), generator=gen)].to(device)
        noise = torch.randn(x_t.shape, generator=gen).to(device)
        x_s, target = targets.training_pair(x_t, coefficients(s), t_coef, noise, prediction_type)
        drop = torch.zeros(args.train_batch, dtype=torch.bool, device=device)
        loss = torch.nn.functional.mse_loss(engine(x_s.to(dtype), s, prompt_idx, drop).float(), target.float())
        engine.backward(loss)
        engine.step()

    seconds = timed(step, args.train_steps, device)
    key = f"train_{mode}"
    figures[f"{key}_samples_per_s"] = args.train_batch / seconds
    figures[f"{key}_peak_gib"] = peak_gib(device)
    figures[f"{key}_trained_parameters"] = trained
    print(f"DeepSpeed step, {mode:<4}, batch {args.train_batch}, {trained:,} parameters trained   "
          f"{figures[f'{key}_samples_per_s']:7.2f} samples/s  {shown(figures[f'{key}_peak_gib'])}")
    engine = model = adapter = None  # free the GPU memory before the next measurement
    if device.type == "cuda":
        torch.cuda.empty_cache()


def vqascore(vlm: Path, args, device: torch.device, figures: dict) -> None:
    from pgraft.vqascore import VQAScorer

    scorer = VQAScorer(str(vlm), device)
    rng = np.random.default_rng(0)
    for batch in args.vqa_batches:
        images = [rng.integers(0, 256, (512, 512, 3), dtype=np.uint8) for _ in range(batch)]
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
        reset_peak(device)
        seconds = timed(lambda: scorer.scores(images, prompts), args.repeats, device)
        figures[f"vqascore_batch{batch}_images_per_s"] = batch / seconds
        figures[f"vqascore_batch{batch}_peak_gib"] = peak_gib(device)
        print(f"VQAScore, batch {batch:3d}                    {batch / seconds:7.1f} images/s  "
              f"{shown(peak_gib(device))}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny models on the CPU (checks the script)")
    parser.add_argument("--batch", type=int, default=8, help="images per pipeline call")
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per figure")
    parser.add_argument("--train-batch", type=int, default=8)
    parser.add_argument("--train-steps", type=int, default=5)
    parser.add_argument("--vqa-batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS), help="what to measure")
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda (cpu with --smoke)")
    parser.add_argument("--out", default=None, help="JSON of the figures (default: print only)")
    args = parser.parse_args()
    args.device = args.device or ("cpu" if args.smoke else "cuda")
    args.dtype = "float16" if args.device == "cuda" else "float32"
    if args.smoke:
        args.steps, args.batch, args.train_batch, args.vqa_batches = 10, 2, 2, [1, 4]
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_sd2: no CUDA device (--smoke checks the script on the CPU)")
    device = torch.device(args.device)
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"{torch.get_num_threads()} CPU threads"
    print(f"gpu_sd2: {'tiny models' if args.smoke else 'real sizes (SD 2 at 512 px, a 256 M VLM)'}, {args.device} ({where}), "
          f"torch {torch.__version__}")
    figures: dict = {"device": where, "smoke": args.smoke, "parts": args.parts, "batch": args.batch, "steps": args.steps}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        sd = save_sd2(Path(tmp) / "sd2", args.smoke) if {"sampling", "training"} & set(args.parts) else None
        vlm = save_vlm(Path(tmp) / "vlm", args.smoke) if "vqascore" in args.parts else None
        print(f"models built and saved in {time.perf_counter() - start:.0f} s")
        if "sampling" in args.parts:
            sampling(sd, args, device, figures)
        if "training" in args.parts:
            init_single_rank(device)
            training(sd, args, device, "lora", figures)
            training(sd, args, device, "full", figures)
        if "vqascore" in args.parts:
            vqascore(vlm, args, device, figures)
    figures["seconds"] = time.perf_counter() - start
    print(f"total {figures['seconds']:.0f} s")
    if args.out:
        Path(args.out).write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
