"""Train stage: fine-tune the T→t segment on accepted X_t with DeepSpeed (P-GRAFT; t = 0 is GRAFT).

    pgraft train --config C --set train.selection=thr07 --set train.t_step=15
    torchrun --nproc_per_node=2 -m stages.train --config C        # several processes (gloo/NCCL)

Data: the accepted samples' latent x_k (k = train.t_step) and their condition, streamed from
the committed shards (held in memory, nothing copied to disk); every process sees the same
seeded global batch order and takes its own slice. Noise levels s are drawn only from the
timesteps the sampler visits before step k. Checkpoints every `train.checkpoint_every` steps;
a rerun resumes from the latest, and since data order and noise are functions of the step,
the resumed run ends with the same weights as an uninterrupted one. Output:
train/<name>/{checkpoints/, model/, summary.json}; model/ is what the composite sampler loads.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from pgraft import contract, targets
from pgraft.config import Config
from pgraft.models.adapters import COMPOSITE_CARD
from pgraft.shards import LATENTS_EXT, META_EXT, list_committed, read_shard
from pgraft.storage import Storage, open_storage

EXIT_AFTER_ENV = "PGRAFT_TRAIN_EXIT_AFTER_STEP"  # crash simulation for resume tests: hard exit after this step


class TrainError(RuntimeError):
    """The train stage cannot run as configured; the message says why."""


# Data ---------------------------------------------------------------------------------------

@dataclass
class AcceptedLatents:
    latents: torch.Tensor  # (n, ...) x_k of every accepted sample, float32
    prompts: list[str]
    keys: list[str]
    t_level: float | None  # scheduler timestep of x_k (None: x_0)
    num_inference_steps: int
    model: str
    model_timesteps: list[float]  # timesteps of the sampler's model calls before x_k


def load_accepted(storage: Storage, cfg: Config, selection: str) -> AcceptedLatents:
    from stages.filter import FilterError, read_accepted

    rnd, k = cfg.run.round, cfg.train.t_step
    try:
        accepted = read_accepted(storage, rnd, selection)
    except FilterError as exc:
        raise TrainError(str(exc)) from None
    if accepted.num_rows == 0:
        raise TrainError(f"selection {selection!r} is empty; rerun the filter with a looser rule")
    committed = {rec.shard: (sid, rec) for sid, rec in list_committed(storage, rnd).items()}
    wanted: dict[str, set[str]] = {}
    for key, shard in zip(accepted["key"].to_pylist(), accepted["shard"].to_pylist()):
        wanted.setdefault(shard, set()).add(key)
    missing = sorted(set(wanted) - set(committed))
    if missing:
        raise TrainError(f"selection {selection!r} names shards that are not committed: {', '.join(missing[:5])}")
    latents, prompts, keys = [], [], []
    info = None
    for shard in sorted(wanted):
        sid, rec = committed[shard]
        for sample in read_shard(storage, rnd, sid, rec, wanted=(LATENTS_EXT, META_EXT)):
            if sample.key not in wanted[shard]:
                continue
            meta = sample.meta
            if info is None:
                info = meta
                _check_step(cfg, meta)
            name = contract.FINAL_LATENT if k == meta.num_inference_steps else contract.latent_name(k)
            latents.append(sample.latents[name])
            prompts.append(meta.prompt)
            keys.append(sample.key)
    if info is None:
        raise TrainError(f"none of the {accepted.num_rows} accepted keys of selection {selection!r} is in its shards; "
                         "the selection was made from another run's reward table")
    # The noise level of x_k as the sampler recorded it (DDIM steps to t − T/N, which is not
    # always timesteps[k]), and the timesteps at which it called the model before x_k.
    t_level = None if k == info.num_inference_steps else float(info.captured_steps[contract.latent_name(k)])
    return AcceptedLatents(torch.stack(latents), prompts, keys, t_level, info.num_inference_steps, info.model,
                           [float(t) for t in info.timesteps[:k]])


def _check_step(cfg: Config, meta) -> None:
    k, n = cfg.train.t_step, meta.num_inference_steps
    captured = sorted(contract.captured_step(name) for name in meta.captured_steps)
    if not 1 <= k <= n:
        raise TrainError(f"train.t_step={k} is out of range 1..{n} (model.num_inference_steps of the shards)")
    if k != n and k not in captured:
        raise TrainError(f"train.t_step={k} is not a captured step; the shards hold {captured} (or {n} for x_0, GRAFT)")
    if Path(meta.model).resolve() != Path(cfg.model.path).resolve() or meta.model_kind != cfg.model.kind:
        raise TrainError(f"the shards come from model {meta.model!r} ({meta.model_kind}); the config names "
                         f"{cfg.model.path!r} ({cfg.model.kind}): train the model that generated them")
    if meta.num_inference_steps != cfg.model.num_inference_steps:
        raise TrainError(f"the shards were sampled with {n} steps; model.num_inference_steps is {cfg.model.num_inference_steps}")


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


# Model --------------------------------------------------------------------------------------

class Denoiser(torch.nn.Module):
    """The trainable network with its conditioning, one forward for every model kind."""

    def __init__(self, adapter, prompts: list[str]):
        super().__init__()
        self.kind = adapter.kind
        self.net = adapter.denoiser
        self.unique_prompts = sorted(set(prompts))
        self.prompt_index = {p: i for i, p in enumerate(self.unique_prompts)}
        if self.kind == "class_unet":
            self.register_buffer("cond", adapter.class_ids(self.unique_prompts))
            self.null = adapter.null_class
        elif self.kind == "stable_diffusion":
            with torch.no_grad():
                embeds, _ = adapter.pipe.encode_prompt(self.unique_prompts, adapter.device, 1, False)
                null, _ = adapter.pipe.encode_prompt([""], adapter.device, 1, False)
            self.register_buffer("cond", embeds.float())
            self.register_buffer("null_embed", null.float())
        else:
            raise TrainError(f"model.kind={self.kind}: the train stage supports class_unet and stable_diffusion")

    def forward(self, x_s: torch.Tensor, timesteps: torch.Tensor, prompt_idx: torch.Tensor, drop: torch.Tensor):
        if self.kind == "class_unet":
            labels = torch.where(drop, torch.full_like(self.cond[prompt_idx], self.null), self.cond[prompt_idx])
            return self.net(x_s, timesteps, class_labels=labels).sample
        embeds = torch.where(drop.view(-1, 1, 1), self.null_embed.expand(len(x_s), -1, -1), self.cond[prompt_idx])
        return self.net(x_s, timesteps, encoder_hidden_states=embeds.to(x_s.dtype)).sample


def path_of(scheduler):
    """(coefficient function over timesteps, prediction type) for the sampler's Gaussian path."""
    if "FlowMatch" in type(scheduler).__name__:
        return (lambda ts: targets.flow_coefficients(ts, scheduler.config.num_train_timesteps)), "flow"
    return (lambda ts: targets.ddpm_coefficients(scheduler.alphas_cumprod, ts)), scheduler.config.prediction_type


def _trainable(net, cfg: Config):
    if cfg.train.mode == "lora":
        from pgraft.models.lora import inject_lora

        net.requires_grad_(False)
        try:
            inject_lora(net, cfg.train.lora_rank, cfg.train.lora_targets)
        except ValueError as exc:
            raise TrainError(f"train.lora_targets={cfg.train.lora_targets}: {exc}") from None
    params = [p for p in net.parameters() if p.requires_grad]
    if not params:
        raise TrainError(f"no trainable parameters (train.lora_targets={cfg.train.lora_targets} matched nothing?)")
    return params


# DeepSpeed ----------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(device: torch.device) -> tuple[int, int]:
    """Join the launcher's process group (torchrun/deepspeed set RANK, WORLD_SIZE, MASTER_*),
    or make a group of one on a free port without leaving MASTER_PORT in the environment
    (a later subprocess would inherit a port that is taken)."""
    import deepspeed

    backend = "nccl" if device.type == "cuda" else "gloo"
    if not torch.distributed.is_initialized():
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            deepspeed.init_distributed(dist_backend=backend, verbose=False, auto_mpi_discovery=False)
        else:
            os.environ.setdefault("LOCAL_RANK", "0")
            deepspeed.init_distributed(dist_backend=backend, verbose=False, auto_mpi_discovery=False,
                                       init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def deepspeed_config(cfg: Config, world: int, device: torch.device) -> dict:
    t = cfg.train
    micro = t.micro_batch_size or max(1, t.batch_size // world)
    if t.batch_size % (micro * world):
        raise TrainError(f"train.batch_size={t.batch_size} is not a multiple of micro batch {micro} × {world} processes")
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


# Stage --------------------------------------------------------------------------------------

@dataclass
class TrainSummary:
    name: str
    selection: str
    round: int
    t_step: int
    t_level: float | None
    mode: str
    samples: int
    steps: int
    resumed_from: int
    batch_size: int
    processes: int
    timesteps_trained: list[float]
    final_loss: float
    samples_per_second: float
    data_wait_fraction: float
    seconds: float
    model_dir: str
    deepspeed: dict

    def render(self) -> str:
        level = "x_0 (GRAFT)" if self.t_level is None else f"x_{self.t_step} (t={self.t_level:g}, P-GRAFT)"
        return "\n".join([
            f"train: {self.name!r} on selection {self.selection!r}, round {self.round}, from {level}",
            f"  data     {self.samples} accepted latents; s drawn from {len(self.timesteps_trained)} sampler timesteps "
            f"{self.timesteps_trained[0]:g}…{self.timesteps_trained[-1]:g}",
            f"  steps    {self.steps} ({self.mode}, batch {self.batch_size}, {self.processes} process(es)"
            + (f", resumed at step {self.resumed_from}" if self.resumed_from else "") + ")",
            f"  loss     {self.final_loss:.4f} (mean of the last steps); {self.samples_per_second:.1f} samples/s, "
            f"{self.data_wait_fraction:.1%} of step time waiting for data",
            f"  model    {self.model_dir}/ (composite: fine-tuned for steps 0..{self.t_step - 1}, base after)",
        ])


class CheckpointStore:
    """DeepSpeed checkpoints in a local folder, mirrored to the run's storage when it is remote."""

    def __init__(self, storage: Storage, prefix: str, cache_dir: str):
        self.storage, self.prefix = storage, prefix
        local = storage.local_path(prefix)
        self.remote = local is None
        digest = hashlib.sha256(storage.url(prefix).encode()).hexdigest()[:16]
        self.dir = Path(local) if local else Path(cache_dir).expanduser() / "checkpoints" / digest

    def pull(self) -> None:
        """Fetch the latest checkpoint only (remote runs)."""
        if not self.remote or not self.storage.exists(f"{self.prefix}/latest"):
            return
        tag = self.storage.get_bytes(f"{self.prefix}/latest").decode().strip()
        self.storage.download_prefix(f"{self.prefix}/{tag}", self.dir / tag)
        (self.dir / "latest").write_text(tag)

    def push(self, tag: str) -> None:
        """Upload the checkpoint just written, then `latest` (remote runs)."""
        if self.remote:
            self.storage.upload_folder(self.dir / tag, f"{self.prefix}/{tag}")
            self.storage.put_file(self.dir / "latest", f"{self.prefix}/latest")

    def latest_step(self) -> int | None:
        latest = self.dir / "latest"
        return int(latest.read_text().strip().removeprefix("step")) if latest.is_file() else None


def run_train(cfg: Config, progress: bool = True) -> TrainSummary:
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    from tqdm.auto import tqdm

    from pgraft.models.adapters import load_adapter

    start = time.perf_counter()
    storage = open_storage(cfg.run.uri)
    selection = cfg.train.selection or cfg.filter.selection_name()
    name = cfg.train.output_name(selection)
    rnd = cfg.run.round
    out_prefix = contract.train_prefix(rnd, name)
    data = load_accepted(storage, cfg, selection)

    device_type = "cuda" if cfg.model.device != "cpu" and torch.cuda.is_available() else "cpu"
    rank, world = init_distributed(torch.device(device_type))
    if device_type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))  # one GPU per process
    adapter = load_adapter(cfg.model)
    if adapter.composite is not None:
        # A later round: keep tuning the previous round's T→t network (the base stays for t→0).
        if adapter.composite.tuned is None or cfg.train.mode == "lora":
            raise TrainError("training on top of a LoRA composite (a later round in train.mode=lora) is not supported yet")
        adapter.composite.use_finetuned()
    device = torch.device("cuda", torch.cuda.current_device()) if device_type == "cuda" else adapter.device
    torch.manual_seed(cfg.train.seed)  # LoRA initialisation
    scheduler = adapter.pipe.scheduler
    scheduler.set_timesteps(data.num_inference_steps)
    visited = scheduler.timesteps[:cfg.train.t_step].clone()  # the sampler's timesteps above x_k
    if [float(t) for t in visited] != data.model_timesteps:
        raise TrainError(f"the configured sampler visits {[float(t) for t in visited][:4]}… before step "
                         f"{cfg.train.t_step}, the shards' sampler visited {data.model_timesteps[:4]}…; use the "
                         "model.scheduler and model.timestep_spacing that generated them")
    coefficients, prediction_type = path_of(scheduler)
    t_coef = targets.clean() if data.t_level is None else coefficients(torch.tensor([data.t_level]))
    t_coef = targets.PathCoefficients(t_coef.a.to(device), t_coef.sigma.to(device))

    model = Denoiser(adapter, data.prompts)
    params = _trainable(model.net, cfg)
    ds_config = deepspeed_config(cfg, world, device)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=params, config=ds_config)
    micro, accum = ds_config["train_micro_batch_size_per_gpu"], ds_config["gradient_accumulation_steps"]

    checkpoints = CheckpointStore(storage, f"{out_prefix}/checkpoints", cfg.train.cache_dir)
    if rank == 0:
        checkpoints.pull()
    torch.distributed.barrier()
    first_step = 0
    if checkpoints.latest_step() is not None:
        _, client = engine.load_checkpoint(str(checkpoints.dir))
        first_step = int(client["step"])

    latents = data.latents.to(device)
    prompt_idx = torch.tensor([model.prompt_index[p] for p in data.prompts], device=device)
    dtype = next(p for p in engine.module.parameters()).dtype
    exit_after = int(os.environ.get(EXIT_AFTER_ENV, "-1"))
    losses, data_seconds, step_seconds = [], 0.0, 0.0
    bar = tqdm(range(first_step, cfg.train.steps), desc=f"train {name}", disable=not progress or rank != 0,
               initial=first_step, total=cfg.train.steps)
    engine.train()
    for step in bar:
        t0 = time.perf_counter()
        batch = global_batch(len(latents), cfg.train.batch_size, step, cfg.train.seed)
        mine = batch[rank * micro * accum:(rank + 1) * micro * accum]
        step_loss = 0.0
        for m in range(accum):
            t_data = time.perf_counter()
            idx = mine[m * micro:(m + 1) * micro].to(device)
            gen = step_generator(cfg.train.seed, 2, step, rank, m)
            noise = torch.randn(latents[idx].shape, generator=gen).to(device)
            s_pick = torch.randint(0, len(visited), (len(idx),), generator=gen)
            drop = (torch.rand(len(idx), generator=gen) < cfg.train.prompt_dropout).to(device)
            s_steps = visited[s_pick].to(device)
            x_s, target = targets.training_pair(latents[idx], coefficients(s_steps), t_coef, noise, prediction_type)
            data_seconds += time.perf_counter() - t_data
            pred = engine(x_s.to(dtype), s_steps, prompt_idx[idx], drop)
            loss = torch.nn.functional.mse_loss(pred.float(), target.float())
            engine.backward(loss)
            engine.step()
            step_loss += loss.item() / accum
        losses.append(step_loss)
        step_seconds += time.perf_counter() - t0
        bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
        done = step + 1
        if done % cfg.train.checkpoint_every == 0 or done == cfg.train.steps:
            engine.save_checkpoint(str(checkpoints.dir), tag=f"step{done:07d}", client_state={"step": done})
            torch.distributed.barrier()
            if rank == 0:  # one node: every rank's files are in this folder (multi-node S3 runs: see docs)
                checkpoints.push(f"step{done:07d}")
        if done == exit_after:
            os._exit(17)  # simulated crash: no cleanup, no export
    bar.close()

    model_dir = export_model(engine, cfg, storage, out_prefix, data, visited, rank)
    steps_run = cfg.train.steps - first_step
    summary = TrainSummary(
        name=name, selection=selection, round=rnd, t_step=cfg.train.t_step, t_level=data.t_level,
        mode=cfg.train.mode, samples=len(latents), steps=cfg.train.steps, resumed_from=first_step,
        batch_size=cfg.train.batch_size, processes=world, timesteps_trained=[float(t) for t in visited],
        final_loss=float(np.mean(losses[-20:])) if losses else float("nan"),
        samples_per_second=steps_run * cfg.train.batch_size / step_seconds if step_seconds else 0.0,
        data_wait_fraction=data_seconds / step_seconds if step_seconds else 0.0,
        seconds=time.perf_counter() - start, model_dir=model_dir, deepspeed=ds_config,
    )
    if rank == 0:
        storage.put_bytes(f"{out_prefix}/summary.json", json.dumps(asdict(summary), indent=1).encode())
    return summary


def export_model(engine, cfg: Config, storage: Storage, out_prefix: str, data: AcceptedLatents, visited, rank: int) -> str:
    """train/<name>/model/: fine-tuned weights (full UNet folder or LoRA safetensors) and the
    composite sampler card. Returns the model folder's URI."""
    import deepspeed
    from safetensors.torch import save_file

    net = engine.module.net
    params = list(net.parameters())
    with deepspeed.zero.GatheredParameters(params, enabled=cfg.train.zero_stage == 3):
        if rank != 0:
            return storage.url(f"{out_prefix}/model")
        with _staging(storage, f"{out_prefix}/model", cfg.train.cache_dir) as folder:
            if cfg.train.mode == "lora":
                from pgraft.models.lora import lora_state_dict

                lora = lora_state_dict(net)
                (folder / "lora").mkdir(parents=True, exist_ok=True)
                save_file(lora, folder / "lora" / "adapter.safetensors")
                (folder / "lora" / "config.json").write_text(json.dumps(
                    {"r": cfg.train.lora_rank, "lora_alpha": cfg.train.lora_rank, "target_modules": cfg.train.lora_targets}))
            else:
                net.save_pretrained(folder / "unet")
            card = {
                "base_model": cfg.model.path, "kind": cfg.model.kind, "finetuned": cfg.train.mode,
                "switch_step": cfg.train.t_step, "t_level": data.t_level,
                "num_inference_steps": data.num_inference_steps, "guidance_scale": cfg.model.guidance_scale,
                "timesteps_trained": [float(t) for t in visited],
                "usage": "run the fine-tuned denoiser for sampler steps 0..switch_step-1, the base for the rest",
            }
            (folder / COMPOSITE_CARD).write_text(json.dumps(card, indent=1))
    return storage.url(f"{out_prefix}/model")


class _staging:
    """Write a folder locally, then upload it (remote runs) or move it into place (local runs)."""

    def __init__(self, storage: Storage, prefix: str, cache_dir: str):
        self.storage, self.prefix = storage, prefix
        self.local = storage.local_path(prefix)
        base = Path(self.local).parent if self.local else Path(cache_dir).expanduser()
        base.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=".model-", dir=base))

    def __enter__(self) -> Path:
        return self.tmp

    def __exit__(self, exc_type, *_):
        if exc_type is None:
            if self.local:
                shutil.rmtree(self.local, ignore_errors=True)
                os.replace(self.tmp, self.local)
            else:
                self.storage.upload_folder(self.tmp, self.prefix)
        shutil.rmtree(self.tmp, ignore_errors=True)
        return False


def main(argv: list[str] | None = None) -> int:
    from pgraft.cli import run_stage

    return run_stage("train", argv)


if __name__ == "__main__":
    sys.exit(main())
