"""Ray Train worker groups running a DeepSpeed step loop, shared by every trainer of the
project (the train stage's T→t fine-tune, the noise corrector).

The driver calls `fit(TrainerSpec(...))`: it checks that the cluster can ever hold the group
(one line naming the missing resource, not a hang), then runs the worker function under a
`TorchTrainer` (gloo on CPU, NCCL on GPUs) whose checkpoints go to `<prefix>/checkpoints/` in
the run's storage; a lost worker restarts the group from the last checkpoint. Each worker calls
`join_group`, builds its engine from `deepspeed_config`, `resume`s, and `save_and_report`s.
The trainer's settings are one config section (a `pgraft.config.TrainerSection`: `train` or
`corrector`).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch

from pgraft.contract import CHECKPOINT_TAG, CHECKPOINTS_DIR
from pgraft.errors import PgraftError, TrainError

if TYPE_CHECKING:
    from pgraft.config import TrainerSection
    from pgraft.storage import Storage


def step_generator(seed: int, *parts: int) -> torch.Generator:
    """A generator seeded by (seed, parts): randomness that is a function of the step."""
    state = np.random.SeedSequence([seed, *parts]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def global_batch(n: int, batch: int, step: int, seed: int) -> torch.Tensor:
    """Indices of the global batch of `step`: consecutive slices of seeded per-epoch permutations."""
    start = step * batch
    out = []
    while len(out) < batch:
        epoch, offset = divmod(start + len(out), n)
        perm = torch.randperm(n, generator=step_generator(seed, 1, epoch))
        out.extend(perm[offset:offset + batch - len(out)].tolist())
    return torch.tensor(out)


def deepspeed_config(section, section_name: str, world: int, device: torch.device) -> dict:
    """The DeepSpeed config of a trainer's config section (a TrainerSection: batch_size,
    micro_batch_size, lr, weight_decay, zero_stage, grad_clip, precision); `section_name` names it
    in errors."""
    t = section
    micro = t.micro_batch_size or max(1, t.batch_size // world)
    if t.batch_size % (micro * world):
        raise TrainError(f"{section_name}.batch_size={t.batch_size} is not a multiple of micro batch {micro} × {world} "
                         f"workers ({section_name}.num_workers)")
    precision = t.precision if t.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    return {
        "train_batch_size": t.batch_size,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": t.batch_size // (micro * world),
        # torch_adam: the PyTorch AdamW, no fused-kernel build (which takes ~40 s on CPU).
        "optimizer": {"type": "AdamW", "params": {"lr": t.lr, "weight_decay": t.weight_decay, "torch_adam": True}},
        "zero_optimization": {"stage": t.zero_stage},
        "gradient_clipping": t.grad_clip,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def join_group() -> tuple[int, int, torch.device]:
    """Rank, world size and device of this Ray Train worker; sets the environment DeepSpeed reads."""
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(ctx.get_local_rank()),
                      LOCAL_WORLD_SIZE=str(ctx.get_local_world_size()))
    device = ray.train.torch.get_device()
    if device.type != "cuda":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    return rank, world, device


def save_and_report(engine, step: int, metrics: dict, fingerprint: str) -> None:
    """Save this rank's part of the checkpoint after `step` steps and report it; Ray Train
    merges the ranks' files into one folder in storage. Every rank calls this at the same
    steps (the report is a barrier)."""
    import ray.train

    tag = CHECKPOINT_TAG.format(step)
    scratch = tempfile.mkdtemp(prefix="pgraft-ckpt-")
    try:
        engine.save_checkpoint(scratch, tag=tag, client_state={"step": step, "fingerprint": fingerprint})
        ray.train.report({**metrics, "step": step}, checkpoint=ray.train.Checkpoint.from_directory(scratch),
                         checkpoint_dir_name=tag)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def resume(engine, fingerprint: str, steps: int, where: str, name_key: str) -> int:
    """Load the latest reported checkpoint on every rank; the step to continue from (0: none).
    A checkpoint of other data or settings, or one past `steps`, is refused, not continued."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return 0
    with checkpoint.as_directory() as folder:
        _, client = engine.load_checkpoint(folder)
    step = int(client["step"])
    if client.get("fingerprint") != fingerprint:
        raise TrainError(f"{where} holds checkpoints of a run with other data or other settings; "
                         f"use another {name_key}, or delete that folder to train again")
    if step > steps:
        raise TrainError(f"{where} holds a checkpoint at step {step}, past the {steps} steps configured; "
                         f"use another {name_key}, or delete that folder to train again")
    return step


def run_steps(engine, ds_config: dict, section, rank: int, n: int, first_step: int, micro_loss, what: str,
              fingerprint: str, progress: bool) -> tuple[list[float], float]:
    """The seeded step loop every trainer runs, from `first_step` to `section.steps`.

    Each step takes the global batch of `global_batch` over `n` items, this rank's slice of
    it, and `accum` micro batches; `micro_loss(idx, gen)` returns one micro batch's loss, its
    randomness drawn from `gen` = step_generator(seed, 2, step, rank, micro), so a resumed run
    ends with the weights of one that never stopped. Rank 0 prints a line every tenth of the
    run (a redrawn bar would become a line per refresh in a job log); a checkpoint is reported
    every `section.checkpoint_every` steps and at the end. Returns (loss per step, seconds in steps)."""
    micro, accum = ds_config["train_micro_batch_size_per_gpu"], ds_config["gradient_accumulation_steps"]
    report_every = max(1, section.steps // 10) if progress and rank == 0 else 0
    losses, step_seconds = [], 0.0
    engine.train()
    for step in range(first_step, section.steps):
        t0 = time.perf_counter()
        mine = global_batch(n, section.batch_size, step, section.seed)[rank * micro * accum:(rank + 1) * micro * accum]
        step_loss = 0.0
        for m in range(accum):
            loss = micro_loss(mine[m * micro:(m + 1) * micro], step_generator(section.seed, 2, step, rank, m))
            engine.backward(loss)
            engine.step()
            step_loss += loss.item() / accum
        losses.append(step_loss)
        step_seconds += time.perf_counter() - t0
        done = step + 1
        if report_every and (done % report_every == 0 or done == section.steps):
            rate = (done - first_step) * section.batch_size / step_seconds
            print(f"{what}: step {done}/{section.steps}, loss {np.mean(losses[-20:]):.4f}, {rate:.0f} samples/s",
                  flush=True)
        if done % section.checkpoint_every == 0 or done == section.steps:
            save_and_report(engine, done, {"loss": float(np.mean(losses[-20:]))}, fingerprint)
    return losses, step_seconds


def first_user_error(exc: Exception) -> Exception:
    """The first user-facing error a worker raised (any PgraftError), else one TrainError line."""
    seen, stack = set(), [exc]
    while stack:
        err = stack.pop()
        if id(err) in seen or err is None:
            continue
        seen.add(id(err))
        if isinstance(err, PgraftError):
            return err
        stack.extend([getattr(err, "cause", None), err.__cause__, err.__context__])
        for inner in (getattr(err, "worker_failures", None) or {}).values():
            stack.append(inner)
    text = str(exc).strip().splitlines()
    return TrainError(f"training failed: {text[-1] if text else exc.__class__.__name__}")


@dataclass(frozen=True)
class TrainerSpec:
    """One trainer's worker group, as `fit` runs it."""

    worker: Callable[[dict], None]  # run on every rank as worker(loop_config + {"threads": torch threads on CPU})
    loop_config: dict  # the worker's parameters (JSON-ready)
    section: TrainerSection  # cfg.train or cfg.corrector: workers, their resources, restarts, checkpoints kept
    device: str  # `auto`, `cpu` or `cuda` (model.device)
    device_key: str  # the config key of `device`, named in placement errors
    storage: Storage  # the run's storage
    prefix: str  # checkpoints go to <prefix>/checkpoints/ in `storage`
    placement_timeout_s: float  # how long the cluster may take to offer the workers' resources
    label: str  # the group in messages, e.g. "train workers"


def fit(spec: TrainerSpec) -> None:
    """Run `spec.worker(spec.loop_config)` on `spec.section.num_workers` Ray Train workers,
    checkpoints under `<spec.prefix>/checkpoints/` in `spec.storage`."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.util.placement_group import remove_placement_group

    from cluster.ray_cluster import connect, plan_placement, reserve

    section = spec.section
    connect()
    placement = plan_placement(section.num_workers, spec.device, spec.device_key, section.resources_per_worker,
                               section.cpus_per_worker, exact=True)
    # Can the cluster ever hold the group? Reserve it once (an autoscaler sees the demand), then free it for Ray Train.
    remove_placement_group(reserve(placement, spec.label, spec.placement_timeout_s))
    use_gpu = placement.num_gpus > 0
    filesystem, path = spec.storage.arrow_location(spec.prefix)
    trainer = TorchTrainer(
        spec.worker,
        train_loop_config={**spec.loop_config, "threads": placement.threads},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=placement.count, use_gpu=use_gpu, resources_per_worker=placement.bundle),
        run_config=RunConfig(name=CHECKPOINTS_DIR, storage_path=path, storage_filesystem=filesystem,
                             failure_config=FailureConfig(max_failures=section.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=section.keep_checkpoints)),
    )
    try:
        trainer.fit()
    except Exception as exc:  # noqa: BLE001 - Ray Train wraps worker errors in its own types
        raise first_user_error(exc) from None
