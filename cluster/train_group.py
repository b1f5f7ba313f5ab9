"""DeepSpeed worker groups on Ray actors, shared by every trainer of the project (the train
stage's T→t fine-tune, the noise corrector).

The driver calls `fit(TrainerSpec(...))`. It places one `TrainRank` actor per rank in a
placement group (a group the cluster can never hold is one line naming the missing resource,
not a hang); the ranks join one process group (gloo on CPU, NCCL on GPUs) and run the worker
function. Each worker calls `join_group`, builds its engine from `deepspeed_config`,
`resume`s and `save_and_report`s: every rank writes its part of a checkpoint to
`<prefix>/checkpoints/stepNNNNNNN/` in the run's storage, and rank 0 then names it in
`<prefix>/checkpoints/registered.json` (a checkpoint is resumed from only once registered).
A lost rank ends the group, which starts again from the newest registered checkpoint. The
trainer's settings are one config section (a `pgraft.config.TrainerSection`: `train` or
`corrector`)."""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch

from pgraft.contract import CHECKPOINT_RECORD, CHECKPOINT_TAG, CHECKPOINTS_DIR
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


class GroupContext:
    """Where one rank stands in its group, set by `TrainRank.run` before the worker function starts."""

    def __init__(self, rank: int, world: int, local_rank: int, local_world: int, device: str, storage: Storage,
                 checkpoints: str, keep: int):
        self.rank, self.world, self.local_rank, self.local_world = rank, world, local_rank, local_world
        self.device = device  # "cpu", or "cuda:<index among the GPUs this node's ranks share>"
        self.storage, self.checkpoints, self.keep = storage, checkpoints, keep  # the record and folders of checkpoints


_CONTEXT: GroupContext | None = None


def _context() -> GroupContext:
    if _CONTEXT is None:
        raise RuntimeError("this runs inside a trainer's worker function (cluster.train_group.fit), not on its own")
    return _CONTEXT


def join_group() -> tuple[int, int, torch.device]:
    """Rank, world size and device of this rank of the group (its process group is up already);
    sets the environment DeepSpeed reads."""
    ctx = _context()
    os.environ.update(RANK=str(ctx.rank), WORLD_SIZE=str(ctx.world), LOCAL_RANK=str(ctx.local_rank),
                      LOCAL_WORLD_SIZE=str(ctx.local_world))
    device = torch.device(ctx.device)
    if device.type != "cuda":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        from cluster.deepspeed_ops import ensure_built

        ensure_built()  # built at install time; else built here once, never waiting on a dead builder's lock
    else:
        torch.cuda.set_device(device)
    return ctx.rank, ctx.world, device


def read_checkpoint_record(storage: Storage, checkpoints: str) -> list[dict]:
    """The registered checkpoints under `checkpoints` (oldest first): each {"tag", "step", "metrics"}."""
    key = f"{checkpoints}/{CHECKPOINT_RECORD}"
    if not storage.exists(key):
        return []
    return json.loads(storage.get_bytes(key))["checkpoints"]


def register_checkpoint(storage: Storage, checkpoints: str, tag: str, step: int, metrics: dict, keep: int) -> None:
    """Name a fully written checkpoint in the record, then delete the ones past the newest `keep`
    (the record is written first, so it never names a deleted checkpoint)."""
    record = [c for c in read_checkpoint_record(storage, checkpoints) if c["tag"] != tag]
    record.append({"tag": tag, "step": step, "metrics": metrics})
    record.sort(key=lambda c: c["step"])
    kept, dropped = record[-keep:], record[:-keep]
    storage.put_bytes(f"{checkpoints}/{CHECKPOINT_RECORD}", json.dumps({"checkpoints": kept}, indent=1).encode())
    for old in dropped:
        for key in storage.list(f"{checkpoints}/{old['tag']}"):
            storage.delete(key)


def save_and_report(engine, step: int, metrics: dict, fingerprint: str) -> None:
    """Save this rank's part of the checkpoint after `step` steps into the run's storage, with
    the sha256 of each of its files (`digests-rank<r>.json`, written last); once every rank's
    files are there (a barrier), rank 0 registers it. Every rank calls this at the same steps."""
    ctx = _context()
    tag = CHECKPOINT_TAG.format(step)
    scratch = tempfile.mkdtemp(prefix="pgraft-ckpt-")
    try:
        engine.save_checkpoint(scratch, tag=tag, client_state={"step": step, "fingerprint": fingerprint})
        ctx.storage.upload_folder(scratch, f"{ctx.checkpoints}/{tag}")
        ctx.storage.put_bytes(f"{ctx.checkpoints}/{tag}/{DIGESTS.format(ctx.rank)}",
                              json.dumps(folder_digests(scratch), indent=1, sort_keys=True).encode())
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    torch.distributed.barrier()
    if ctx.rank == 0:
        register_checkpoint(ctx.storage, ctx.checkpoints, tag, step, {**metrics, "step": step}, ctx.keep)


DIGESTS = "digests-rank{}.json"  # in a checkpoint's folder: {relative path: sha256} of one rank's files


def folder_digests(folder: str) -> dict[str, str]:
    """{relative path: sha256} of every file under a local folder."""
    from pathlib import Path

    from pgraft.storage import stream_digest

    root = Path(folder)
    out = {}
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with open(path, "rb") as f:
                out[path.relative_to(root).as_posix()] = stream_digest(f)[1]
    return out


def check_checkpoint_files(folder: str, world: int) -> str | None:
    """Why a downloaded checkpoint folder is not whole (None when it is): every rank's digest
    file must be there and every file it names must match. A checkpoint written before
    digests existed (no digest file at all) is taken as it is."""
    from pathlib import Path

    found = sorted(Path(folder).glob(DIGESTS.format("*")))
    if not found:
        return None
    if len(found) < world:
        return f"digests of {len(found)} of {world} ranks"
    have = folder_digests(folder)
    for digest_file in found:
        for name, sha in json.loads(digest_file.read_text()).items():
            if have.get(name) != sha:
                return f"{name} is {'missing' if name not in have else 'torn (sha256 differs)'}"
    return None


def resume(engine, fingerprint: str, steps: int, where: str, name_key: str) -> int:
    """Load the newest whole registered checkpoint on every rank; the step to continue from (0:
    none). A torn or unloadable checkpoint is skipped, with a warning, for the one before it
    (every rank decides alike: they read the same objects). A checkpoint of other data or
    settings, or one past `steps`, is refused, not continued."""
    ctx = _context()
    client = None
    for entry in reversed(read_checkpoint_record(ctx.storage, ctx.checkpoints)):
        scratch = tempfile.mkdtemp(prefix="pgraft-ckpt-")
        try:
            # The whole folder on every rank, so each finds its own ZeRO shards.
            ctx.storage.download_prefix(f"{ctx.checkpoints}/{entry['tag']}", scratch)
            problem = check_checkpoint_files(scratch, ctx.world)
            if problem is None:
                try:
                    _, client = engine.load_checkpoint(scratch, tag=entry["tag"])
                    problem = None if client is not None else "DeepSpeed found nothing to load"
                except Exception as exc:  # noqa: BLE001 - a corrupt file fails in torch.load or DeepSpeed: skip it
                    problem = f"it does not load ({exc.__class__.__name__})"
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        if problem is None:
            break
        client = None
        if ctx.rank == 0:
            print(f"warning: checkpoint {ctx.storage.url(ctx.checkpoints)}/{entry['tag']} is corrupt ({problem}); "
                  "skipping it for the one before", file=sys.stderr, flush=True)
    if client is None:
        return 0
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


def user_error(exc: BaseException) -> PgraftError | None:
    """The first user-facing error (a PgraftError) in `exc`'s chain of causes, Ray's wrappers included."""
    seen, stack = set(), [exc]
    while stack:
        err = stack.pop()
        if id(err) in seen or err is None:
            continue
        seen.add(id(err))
        cause = getattr(err, "cause", None)
        if isinstance(cause, BaseException):  # Ray's wrapper (itself an instance of the cause's class): the original
            stack.append(cause)
            continue
        if isinstance(err, PgraftError):
            return err
        stack.extend([err.__cause__, err.__context__])
    return None


def one_line(exc: BaseException) -> str:
    """The last line of an error's text (a remote traceback ends with the error itself)."""
    text = str(exc).strip().splitlines()
    return text[-1] if text else exc.__class__.__name__


@dataclass(frozen=True)
class TrainerSpec:
    """One trainer's worker group, as `fit` runs it."""

    worker: Callable[[dict], None]  # run on every rank as worker(loop_config + {"threads": torch threads on CPU})
    loop_config: dict  # the worker's parameters (JSON-ready)
    section: TrainerSection  # cfg.train or cfg.corrector: workers, their resources, restarts, checkpoints kept
    section_key: str  # the config section's name (`train`, `corrector`), named in errors
    device: str  # `auto`, `cpu` or `cuda` (model.device)
    device_key: str  # the config key of `device`, named in placement errors
    storage: Storage  # the run's storage
    prefix: str  # checkpoints go to <prefix>/checkpoints/ in `storage`
    placement_timeout_s: float  # how long the cluster may take to offer the workers' resources
    label: str  # the group in messages, e.g. "train workers"


class TrainRank:
    """One rank of a trainer's group: a Ray actor (`ray::TrainRank`) that joins the group's
    process group and runs the worker function in it. The driver starts one per rank inside a
    placement group and restarts the whole group itself after a loss (the actor has no Ray
    restarts: a rank coming back alone could not rejoin its peers' collectives)."""

    def __init__(self, threads: int | None):
        self.threads = threads

    def where(self) -> tuple[str, str, list[str]]:
        """This rank's node id, node IP and the GPU ids Ray gave it."""
        import ray

        from cluster.ray_cluster import current_node_id

        return current_node_id(), ray.util.get_node_ip_address(), [str(g) for g in ray.get_gpu_ids()]

    def free_port(self) -> int:
        import socket

        with socket.socket() as sock:
            sock.bind(("", 0))
            return sock.getsockname()[1]

    def run(self, worker: Callable[[dict], None], loop_config: dict, context: GroupContext, master: str,
            visible_gpus: list[str]) -> None:
        global _CONTEXT
        import torch.distributed as dist

        if visible_gpus:  # the GPUs of this node's ranks, shared, so NCCL can reach its peers directly
            os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(visible_gpus)
        backend = "nccl" if context.device.startswith("cuda") else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(torch.device(context.device))
        dist.init_process_group(backend, init_method=f"tcp://{master}", rank=context.rank, world_size=context.world)
        _CONTEXT = context
        try:
            worker({**loop_config, "threads": self.threads})
        finally:
            _CONTEXT = None
            # A kept rank joins the next fit's group afresh: DeepSpeed's own teardown also drops the
            # groups it cached (its world-group clone), which would point at the destroyed group.
            deepspeed_comm = sys.modules.get("deepspeed.comm.comm")
            if deepspeed_comm is not None and deepspeed_comm.cdb is not None and dist.is_initialized():
                deepspeed_comm.destroy_process_group()
            elif dist.is_initialized():
                dist.destroy_process_group()
            if torch.cuda.is_initialized():
                torch.cuda.empty_cache()


class LostRank(Exception):
    """A rank of the group is gone (its process or node died), or failed without a user error."""


def _run_group(spec: TrainerSpec, pool) -> None:
    """Start the worker function on every rank of `pool` and wait for all of them; a user error
    (PgraftError) is raised as it is, anything else as LostRank."""
    import ray

    ranks = pool.actors
    try:
        where = ray.get([rank.where.remote() for rank in ranks])
        master = f"{where[0][1]}:{ray.get(ranks[0].free_port.remote())}"
    except ray.exceptions.RayActorError as exc:
        raise LostRank(f"a rank was lost while the group formed ({exc.__class__.__name__})") from None
    calls = {}
    for r, rank in enumerate(ranks):
        node, _, gpus = where[r]
        peers = [i for i, w in enumerate(where) if w[0] == node]
        node_gpus = sorted({g for i in peers for g in where[i][2]}, key=lambda g: (len(g), g))
        device = f"cuda:{node_gpus.index(gpus[0])}" if gpus else "cpu"
        context = GroupContext(r, len(ranks), peers.index(r), len(peers), device, spec.storage,
                               f"{spec.prefix}/{CHECKPOINTS_DIR}", spec.section.keep_checkpoints)
        calls[rank.run.remote(spec.worker, spec.loop_config, context, master, node_gpus)] = r
    pending = list(calls)
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        try:
            ray.get(done[0])
        except ray.exceptions.RayActorError as exc:
            raise LostRank(f"rank {calls[done[0]]} was lost ({exc.__class__.__name__})") from None
        except Exception as exc:  # noqa: BLE001 - the worker function's own error, or a peer's loss seen by gloo/NCCL
            error = user_error(exc)
            if error is not None:
                raise error from None
            raise LostRank(f"rank {calls[done[0]]} failed: {one_line(exc)}") from None


def fit(spec: TrainerSpec) -> None:
    """Run `spec.worker(spec.loop_config)` on `spec.section.num_workers` ranks (Ray actors, one
    process group: gloo on CPU, NCCL on GPUs), checkpoints under `<spec.prefix>/checkpoints/`
    in `spec.storage`. A lost rank (or one failing without a user error) ends the whole group;
    it is started again, resuming from the newest registered checkpoint, up to
    `section.max_failures` times (-1: always)."""
    from cluster.executor import keep_pool, take_kept
    from cluster.ray_cluster import connect, start_workers

    section = spec.section
    connect()
    # Inside cluster.keep_warm() the ranks stay up for the next fit of the same shape (the next round).
    key = (TrainRank, spec.device, section.num_workers, tuple(sorted(section.resources_per_worker.items())),
           section.cpus_per_worker)
    failures = 0
    while True:
        # PACK: a group's ranks on as few nodes as the cluster allows (collectives stay local).
        pool = take_kept(key, section.num_workers)
        from_keep = pool is not None
        pool = pool or start_workers(
            TrainRank, section.num_workers, spec.device, spec.device_key, section.num_workers,
            extra_resources=section.resources_per_worker, timeout_s=spec.placement_timeout_s, max_restarts=0,
            cpus_per_worker=section.cpus_per_worker, exact=True, strategy="PACK", what=spec.label)
        kept = False
        try:
            _run_group(spec, pool)
            kept = keep_pool(key, pool)
            return
        except LostRank as lost:
            if from_keep:  # maybe a kept rank that died while idle: once, a fresh group without counting a restart
                continue
            failures += 1
            if 0 <= section.max_failures < failures:
                raise TrainError(f"{spec.label}: {lost}, after {failures - 1} restart(s) ({spec.section_key}.max_failures="
                                 f"{section.max_failures}); rerun the command to resume from the last checkpoint in "
                                 f"{spec.storage.url(spec.prefix + '/' + CHECKPOINTS_DIR)}") from None
            print(f"{spec.label}: {lost}; restarting the group from its last checkpoint "
                  f"(restart {failures} of {section.max_failures if section.max_failures >= 0 else 'unlimited'})",
                  flush=True)
        finally:
            if not kept:
                pool.close()
