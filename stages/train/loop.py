"""The DeepSpeed step loop, run by every rank of the train group (`train_worker`).

The group's rank actor has set up the process group (gloo on CPU, NCCL on GPUs) before this runs;
DeepSpeed initialises on it. Every rank computes the same seeded global batch of a step and
takes its own slice; noise, noise levels and prompt dropout are drawn from generators seeded
by (seed, step, rank, micro step), so a run resumed from a checkpoint ends with the same
weights as one that never stopped.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict

import numpy as np
import torch

from cluster.train_group import deepspeed_config, join_group, resume, run_steps
from pgraft import contract, targets
from pgraft.config import Config
from pgraft.storage import open_storage
from stages.train.data import load_accepted
from stages.train.denoiser import Denoiser, path_of, trainable_parameters
from stages.train.errors import TrainError
from stages.train.export import export_model


def train_worker(params: dict) -> None:
    """Entry point of each rank: load data and model, resume, train, checkpoint,
    export (rank 0) and write the summary (rank 0)."""
    start = time.perf_counter()
    if params.get("threads"):
        torch.set_num_threads(params["threads"])
    rank, world, device = join_group()
    import deepspeed

    from cluster import current_node_id
    from pgraft.models.adapters import load_adapter

    cfg = Config.model_validate(params["cfg"])
    selection, name = params["selection"], params["name"]
    storage = open_storage(cfg.run.uri)
    data = load_accepted(storage, cfg, selection)

    adapter = load_adapter(cfg.model.model_copy(update={"device": str(device)}))
    if adapter.composite is not None:
        # A later round: keep tuning the previous round's T→t network (the base stays for t→0).
        if adapter.composite.tuned is None or cfg.train.mode == "lora":
            raise TrainError("training on top of a LoRA composite (a later round in train.mode=lora) is not supported yet")
        adapter.composite.use_finetuned()
    torch.manual_seed(cfg.train.seed)  # LoRA initialisation
    scheduler = adapter.scheduler
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
    params_to_train = trainable_parameters(model.net, cfg.train.mode, cfg.train.lora_rank, cfg.train.lora_targets)
    ds_config = deepspeed_config(cfg.train, "train", world, device)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=params_to_train, config=ds_config)
    first_step = resume(engine, params["fingerprint"], cfg.train.steps,
                        storage.url(f"{contract.train_prefix(cfg.run.round, name)}/{contract.CHECKPOINTS_DIR}"), "train.name")

    latents = data.latents.to(device)
    prompt_idx = torch.tensor([model.prompt_index[p] for p in data.prompts], device=device)
    dtype = next(p for p in engine.module.parameters()).dtype
    data_seconds = 0.0

    def micro_loss(idx, gen):
        nonlocal data_seconds
        t_data = time.perf_counter()
        idx = idx.to(device)
        noise = torch.randn(latents[idx].shape, generator=gen).to(device)
        s_pick = torch.randint(0, len(visited), (len(idx),), generator=gen)
        drop = (torch.rand(len(idx), generator=gen) < cfg.train.prompt_dropout).to(device)
        s_steps = visited[s_pick].to(device)
        x_s, target = targets.training_pair(latents[idx], coefficients(s_steps), t_coef, noise, prediction_type)
        data_seconds += time.perf_counter() - t_data
        pred = engine(x_s.to(dtype), s_steps, prompt_idx[idx], drop)
        return torch.nn.functional.mse_loss(pred.float(), target.float())

    losses, step_seconds = run_steps(engine, ds_config, cfg.train, rank, len(latents), first_step, micro_loss,
                                     f"train {name}", params["fingerprint"], bool(params.get("progress")))

    card = contract.composite_card(cfg.model.path, cfg.model.kind, cfg.train.mode, cfg.train.t_step, data.t_level,
                                   data.num_inference_steps, cfg.model.guidance_scale, [float(t) for t in visited])
    model_dir = export_model(engine.module.net, cfg, storage, contract.model_prefix(cfg.run.round, name), card, rank)
    nodes = [None] * world
    torch.distributed.all_gather_object(nodes, current_node_id())
    if rank != 0:
        return
    steps_run = cfg.train.steps - first_step
    summary = contract.TrainSummary(
        name=name, selection=selection, round=cfg.run.round, t_step=cfg.train.t_step, t_level=data.t_level,
        mode=cfg.train.mode, samples=len(latents), steps=cfg.train.steps, resumed_from=first_step,
        batch_size=cfg.train.batch_size, processes=world, timesteps_trained=[float(t) for t in visited],
        final_loss=float(np.mean(losses[-20:])) if losses else float("nan"),
        samples_per_second=steps_run * cfg.train.batch_size / step_seconds if step_seconds else 0.0,
        data_wait_fraction=data_seconds / step_seconds if step_seconds else 0.0,
        seconds=time.perf_counter() - start, model_dir=model_dir, deepspeed=ds_config, nodes=nodes,
        fingerprint=params["fingerprint"],
    )
    storage.put_bytes(contract.train_summary_key(cfg.run.round, name), json.dumps(asdict(summary), indent=1).encode())
