"""Train-corrector stage: fit a noise corrector to an inversion's inverse noises
(docs/DESIGN.md §5), so a flow model samples from ε → corrector → z → base instead of z ~ N(0, I).

`corrector.kind: gaussian` fits the mean and covariance in closed form, in one placed Ray
task. `corrector.kind: flow` adds a small rectified flow on the whitened inverse noises,
trained by a group of train ranks (Ray actors) running the same DeepSpeed machinery as the train stage
(cluster/train_group.py): checkpoints under corrector/<name>/checkpoints/, a lost worker
restarts the group from the last one, a rerun resumes. Either way the result is exported to
corrector/<name>/model/ (what `model.noise_corrector` names) with its summary.json.

    pgraft train-corrector --config configs/digits-inc.yaml
    pgraft train-corrector --config configs/digits-inc.yaml --set corrector.kind=gaussian
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

import cluster
from cluster.train_group import TrainerSpec, deepspeed_config, fit, join_group, resume, run_steps
from pgraft import contract
from pgraft.config import Config
from pgraft.errors import PgraftError
from pgraft.models.adapters import check_flow_model, check_model_folder
from pgraft.models.corrector import (
    base_weights_digest,
    corrector_card,
    corrector_network,
    fit_gaussian,
    minibatch_ot_pairs,
    residual_training_pair,
    save_corrector,
)
from pgraft.models.fetch import fetch_model, model_digest
from pgraft.shards import list_committed_at, read_shard_bytes_at
from pgraft.storage import Storage, open_storage, staged_folder
from pgraft.stagespec import StageSpec, stage_main


class CorrectorError(PgraftError):
    """The noise corrector cannot be fitted as configured; the message says why."""


def load_inverse_noises(storage: Storage, inversion: str, include_unconverged: bool) -> tuple[torch.Tensor, int]:
    """(inverse noises (N, ...), how many non-converged ones were left out), in shard order."""
    from pgraft.shards import iter_tar_samples

    prefix = contract.inversion_shards_prefix(inversion)
    noises, left_out = [], 0
    for shard_id, record in sorted(list_committed_at(storage, prefix).items()):
        data = read_shard_bytes_at(storage, prefix, shard_id, record, "rerun `pgraft invert`")
        for sample in iter_tar_samples(data, storage.url(prefix), ("latents.safetensors", "json"),
                                       meta_cls=contract.InversionMeta):
            if not sample.meta.converged and not include_unconverged:
                left_out += 1
                continue
            noise = sample.latents[contract.INITIAL_NOISE]
            if not torch.isfinite(noise).all():
                raise CorrectorError(f"{storage.url(prefix)}: the inverse noise of {sample.key} is not finite; "
                                     "its inversion diverged (|η|·Lip(v) ≥ 1): invert with more Euler steps, or leave "
                                     "non-converged inversions out (corrector.include_unconverged=false)")
            noises.append(noise)
    if len(noises) < 2:
        raise CorrectorError(f"{storage.url(contract.inversion_prefix(inversion))} has {len(noises)} usable inverse "
                             f"noises ({left_out} did not converge); invert more data, raise invert.max_iterations, "
                             "or set corrector.include_unconverged=true")
    return torch.stack(noises), left_out


def _base_parameters(model_path: str) -> int:
    """Parameters of the base model's denoiser, counted from its safetensors headers."""
    from safetensors import safe_open

    total = 0
    root = Path(fetch_model(model_path))
    for sub in ("unet", "transformer"):
        for file in sorted((root / sub).glob("*.safetensors")):
            with safe_open(str(file), "pt") as f:
                for key in f.keys():
                    total += int(np.prod(f.get_slice(key).get_shape()))
    return total


def _export(storage: Storage, name: str, card: dict, fit_result, net) -> str:
    prefix = contract.corrector_model_prefix(name)
    with staged_folder(storage, prefix) as folder:
        save_corrector(folder, card, fit_result, net)
    return storage.url(prefix)


def _card(params: dict, noises: torch.Tensor) -> dict:
    cfg = Config.model_validate(params["cfg"])
    c = cfg.corrector
    return corrector_card(c.kind, cfg.model.path, base_weights_digest(fetch_model(cfg.model.path)),
                          cfg.model.num_inference_steps,
                          list(noises.shape[1:]), params["guidance_scale"], params["inversion_url"], len(noises),
                          c.sampling_steps, c.covariance)


def fit_gaussian_task(params: dict) -> dict:
    """A Ray task: fit and export the Gaussian corrector; its summary as a dict."""
    start = time.perf_counter()
    cfg = Config.model_validate(params["cfg"])
    storage = open_storage(cfg.run.uri)
    noises, left_out = load_inverse_noises(storage, params["inversion"], cfg.corrector.include_unconverged)
    fit_result = fit_gaussian(noises, cfg.corrector.covariance, cfg.corrector.ridge)
    model_dir = _export(storage, params["name"], _card(params, noises), fit_result, None)
    summary = contract.CorrectorSummary(
        name=params["name"], kind="gaussian", inversion=params["inversion_url"], samples=len(noises), left_out=left_out,
        parameters=fit_result.parameters, base_parameters=_base_parameters(cfg.model.path), steps=0, resumed_from=0,
        final_loss=None, seconds=time.perf_counter() - start, model_dir=model_dir, fingerprint=params["fingerprint"],
        nodes=[cluster.current_node_id()],
    )
    storage.put_bytes(contract.corrector_summary_key(params["name"]), json.dumps(asdict(summary), indent=1).encode())
    return asdict(summary)


def corrector_worker(params: dict) -> None:
    """Entry point of each train rank of a flow corrector: whiten the inverse noises by
    their Gaussian fit, train the velocity network with DeepSpeed, export (rank 0)."""
    start = time.perf_counter()
    if params.get("threads"):
        torch.set_num_threads(params["threads"])
    rank, world, device = join_group()
    import deepspeed

    cfg = Config.model_validate(params["cfg"])
    c, name = cfg.corrector, params["name"]
    storage = open_storage(cfg.run.uri)
    noises, left_out = load_inverse_noises(storage, params["inversion"], c.include_unconverged)
    fit_result = fit_gaussian(noises, c.covariance, c.ridge)  # deterministic: every rank gets the same
    whitened = fit_result.whiten(noises).to(device)
    torch.manual_seed(c.seed)  # the network's initialisation
    net = corrector_network(tuple(noises.shape[1:]), c.channels, c.layers_per_block)
    ds_config = deepspeed_config(c, "corrector", world, device)
    engine, _, _, _ = deepspeed.initialize(model=net, model_parameters=list(net.parameters()), config=ds_config)
    first_step = resume(engine, params["fingerprint"], c.steps,
                        storage.url(f"{contract.corrector_prefix(name)}/{contract.CHECKPOINTS_DIR}"), "corrector.name")
    dtype = next(engine.module.parameters()).dtype

    def micro_loss(idx, gen):
        data = whitened[idx.to(device)]
        noise = torch.randn(data.shape, generator=gen).to(device)
        timesteps = (torch.rand(len(idx), generator=gen) * 1000).to(device)
        if c.coupling == "ot":
            data = data[minibatch_ot_pairs(noise, data)]
        x_s, target = residual_training_pair(data, noise, timesteps)
        return torch.nn.functional.mse_loss(engine(x_s.to(dtype), timesteps).sample.float(), target.float())

    losses, _ = run_steps(engine, ds_config, c, rank, len(whitened), first_step, micro_loss, f"train-corrector {name}",
                          params["fingerprint"], bool(params.get("progress")))

    nodes = [None] * world
    torch.distributed.all_gather_object(nodes, cluster.current_node_id())
    if rank != 0:
        return
    net = engine.module.float().cpu().eval()
    model_dir = _export(storage, name, _card(params, noises), fit_result, net)
    summary = contract.CorrectorSummary(
        name=name, kind="flow", inversion=params["inversion_url"], samples=len(noises), left_out=left_out,
        parameters=sum(p.numel() for p in net.parameters()) + fit_result.parameters,
        base_parameters=_base_parameters(cfg.model.path), steps=c.steps, resumed_from=first_step,
        final_loss=float(np.mean(losses[-20:])) if losses else None, seconds=time.perf_counter() - start,
        model_dir=model_dir, fingerprint=params["fingerprint"], nodes=nodes,
    )
    storage.put_bytes(contract.corrector_summary_key(name), json.dumps(asdict(summary), indent=1).encode())


def _inversion_checks(storage: Storage, cfg: Config, inversion: str) -> dict:
    """The inversion's settings, checked against the base model the corrector is for."""
    key = contract.inversion_settings_key(inversion)
    if not storage.exists(key) or not storage.exists(contract.inversion_summary_key(inversion)):
        raise CorrectorError(f"{storage.url(contract.inversion_prefix(inversion))} is not a finished inversion; run "
                             f"`pgraft invert` with invert.name={inversion} first")
    settings = json.loads(storage.get_bytes(key))
    for field_name in ("model.path", "model.num_inference_steps", "invert.conditional"):
        section, attr = field_name.split(".")
        if field_name not in settings:
            raise CorrectorError(f"{storage.url(key)} lacks {field_name}; rerun `pgraft invert` into a new invert.name")
        mine = getattr(getattr(cfg, section), attr)
        if section == "model" and settings[field_name] != mine:
            raise CorrectorError(f"{storage.url(contract.inversion_prefix(inversion))} inverted {field_name}="
                                 f"{settings[field_name]!r}; this config has {mine!r}")
    return settings


def corrector_fingerprint(cfg: Config, storage: Storage, inversion: str, base_digest: str) -> str:
    """What the corrector is a function of: the inversion's committed shards, the settings its
    kind reads (`CorrectorSection.fit_identity`: the WHAT fields, worker count included since each
    rank draws its own noise; for `gaussian` only those its closed-form fit reads) and the base model."""
    digest = hashlib.sha256()
    for shard_id, record in sorted(list_committed_at(storage, contract.inversion_shards_prefix(inversion)).items()):
        digest.update(f"{shard_id}:{record.sha256}".encode())
    settings = cfg.corrector.fit_identity()
    digest.update(json.dumps({"corrector": settings, "base": base_digest}, sort_keys=True).encode())
    return digest.hexdigest()


def run_train_corrector(cfg: Config, progress: bool = True) -> contract.CorrectorSummary:
    cfg = cfg.with_absolute_paths()
    storage = open_storage(cfg.run.uri)
    inversion, name = cfg.corrector.inversion_name(cfg.invert), cfg.corrector.output_name(cfg.invert)
    check_model_folder(cfg.model.model_copy(update={"noise_corrector": None}))
    check_flow_model(cfg.model, "a noise corrector is fitted for a flow sampler")
    settings = _inversion_checks(storage, cfg, inversion)
    if cfg.corrector.kind == "flow":
        deepspeed_config(cfg.corrector, "corrector", cfg.corrector.num_workers, torch.device("cpu"))
    base_digest = model_digest(cfg.model.path)
    fingerprint = corrector_fingerprint(cfg, storage, inversion, base_digest)
    summary_key = contract.corrector_summary_key(name)
    if storage.exists(summary_key):
        done = contract.CorrectorSummary.from_json(storage.get_bytes(summary_key), storage.url(summary_key))
        if done.fingerprint != fingerprint:
            raise CorrectorError(f"{storage.url(contract.corrector_prefix(name))} was fitted to other inverse noises, "
                                 "with other settings or for another base model; use another corrector.name, or delete "
                                 "that folder to fit again")
        if storage.exists(f"{contract.corrector_model_prefix(name)}/{contract.CORRECTOR_CARD}"):
            return done

    guidance = cfg.model.guidance_scale if settings["invert.conditional"] else 1.0
    params = {"cfg": cfg.model_dump(mode="json"), "name": name, "inversion": inversion, "progress": progress,
              "inversion_url": storage.url(contract.inversion_prefix(inversion)),
              "guidance_scale": guidance, "fingerprint": fingerprint}
    if cfg.corrector.kind == "gaussian":
        cluster.connect()
        placement = cluster.plan_placement(1, "cpu", "model.device", cfg.corrector.resources_per_worker,
                                           cfg.corrector.cpus_per_worker)
        return contract.CorrectorSummary(**cluster.run_task(fit_gaussian_task, (params,), placement,
                                                            "corrector fit", cfg.cluster.placement_timeout_s))
    fit(TrainerSpec(
        worker=corrector_worker, loop_config=params, section=cfg.corrector, section_key="corrector",
        device=cfg.model.device, device_key="model.device", storage=storage, prefix=contract.corrector_prefix(name),
        placement_timeout_s=cfg.cluster.placement_timeout_s, label="corrector workers",
    ))
    return contract.CorrectorSummary.from_json(storage.get_bytes(summary_key), storage.url(summary_key))


STAGE = StageSpec(
    name="train-corrector", run=run_train_corrector, description="fit a noise corrector to an inversion's inverse noises",
    reads=("inversion",), writes=("corrector",),
)


def main(argv: list[str] | None = None) -> int:
    return stage_main(STAGE, argv)


if __name__ == "__main__":
    sys.exit(main())
