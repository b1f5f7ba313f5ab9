"""The train stage's data: the accepted samples' x_k with their prompts, and the seeded
global batch order (a function of the step, so a resumed run sees the same batches)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from pgraft import contract
from pgraft.config import Config
from pgraft.contract import SampleMeta
from pgraft.models.fetch import is_remote
from pgraft.shards import LATENTS_EXT, META_EXT, list_committed, read_shard
from pgraft.storage import Storage
from pgraft.tables import MissingSelection, read_accepted
from stages.train.errors import TrainError


@dataclass
class AcceptedLatents:
    latents: torch.Tensor  # (n, ...) x_k of every accepted sample, float32
    prompts: list[str]
    keys: list[str]
    t_level: float | None  # scheduler timestep of x_k (None: x_0)
    num_inference_steps: int
    model: str
    model_timesteps: list[float]  # timesteps of the sampler's model calls before x_k


def _selection(storage: Storage, cfg: Config, selection: str):
    """(accepted keys by shard, committed records by shard name) of a selection."""
    try:
        accepted = read_accepted(storage, cfg.run.round, selection)
    except MissingSelection as exc:
        raise TrainError(str(exc)) from None
    if accepted.num_rows == 0:
        raise TrainError(f"selection {selection!r} is empty; rerun the filter with a looser rule")
    committed = {rec.shard: (sid, rec) for sid, rec in list_committed(storage, cfg.run.round).items()}
    wanted: dict[str, set[str]] = {}
    for key, shard in zip(accepted["key"].to_pylist(), accepted["shard"].to_pylist()):
        wanted.setdefault(shard, set()).add(key)
    missing = sorted(set(wanted) - set(committed))
    if missing:
        raise TrainError(f"selection {selection!r} names shards that are not committed: {', '.join(missing[:5])}")
    return wanted, committed, accepted.num_rows


def check_selection(storage: Storage, cfg: Config, selection: str) -> SampleMeta:
    """Cheap checks before any worker starts (the accepted table and one sample's JSON):
    the selection exists and is not empty, its shards are committed, the step and model match."""
    wanted, committed, _ = _selection(storage, cfg, selection)
    shard = sorted(wanted)[0]
    sid, rec = committed[shard]
    meta = read_shard(storage, cfg.run.round, sid, rec, wanted=(META_EXT,))[0].meta
    check_step(cfg, meta)
    return meta


def load_accepted(storage: Storage, cfg: Config, selection: str) -> AcceptedLatents:
    """Every accepted sample's x_k (k = train.t_step), streamed from the committed shards."""
    k = cfg.train.t_step
    wanted, committed, rows = _selection(storage, cfg, selection)
    latents, prompts, keys = [], [], []
    info = None
    for shard in sorted(wanted):
        sid, rec = committed[shard]
        for sample in read_shard(storage, cfg.run.round, sid, rec, wanted=(LATENTS_EXT, META_EXT)):
            if sample.key not in wanted[shard]:
                continue
            meta = sample.meta
            if info is None:
                info = meta
                check_step(cfg, meta)
            name = contract.FINAL_LATENT if k == meta.num_inference_steps else contract.latent_name(k)
            latents.append(sample.latents[name])
            prompts.append(meta.prompt)
            keys.append(sample.key)
    if info is None:
        raise TrainError(f"none of the {rows} accepted keys of selection {selection!r} is in its shards; "
                         "the selection was made from another run's reward table")
    # The noise level of x_k as the sampler recorded it (DDIM steps to t − T/N, which is not
    # always timesteps[k]), and the timesteps at which it called the model before x_k.
    t_level = None if k == info.num_inference_steps else float(info.captured_steps[contract.latent_name(k)])
    return AcceptedLatents(torch.stack(latents), prompts, keys, t_level, info.num_inference_steps, info.model,
                           [float(t) for t in info.timesteps[:k]])


def same_model(a: str, b: str) -> bool:
    """Whether two model references name the same model (URIs by text, paths by location)."""
    if is_remote(a) or is_remote(b):
        return a.rstrip("/") == b.rstrip("/")
    return Path(a).resolve() == Path(b).resolve()


def check_step(cfg: Config, meta: SampleMeta) -> None:
    k, n = cfg.train.t_step, meta.num_inference_steps
    captured = sorted(contract.captured_step(name) for name in meta.captured_steps)
    if not 1 <= k <= n:
        raise TrainError(f"train.t_step={k} is out of range 1..{n} (model.num_inference_steps of the shards)")
    if k != n and k not in captured:
        raise TrainError(f"train.t_step={k} is not a captured step; the shards hold {captured} (or {n} for x_0, GRAFT)")
    if not same_model(meta.model, cfg.model.path) or meta.model_kind != cfg.model.kind:
        raise TrainError(f"the shards come from model {meta.model!r} ({meta.model_kind}); the config names "
                         f"{cfg.model.path!r} ({cfg.model.kind}): train the model that generated them")
    if meta.num_inference_steps != cfg.model.num_inference_steps:
        raise TrainError(f"the shards were sampled with {n} steps; model.num_inference_steps is {cfg.model.num_inference_steps}")
