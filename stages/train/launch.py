"""Launch the train stage on a group of Ray actors from the driver, which holds no model.

`run_train` checks the selection and the model (cheap reads), makes sure the cluster can
ever hold `train.num_workers` workers (failing with one line naming the missing resource,
not hanging), then runs `train_worker` on that many ranks (cluster/train_group.py `fit`): one
Ray actor each, one process group (gloo on CPU, NCCL on GPUs), checkpoints written to
train/<name>/checkpoints/ in the run's storage, the group restarted from the latest
registered checkpoint after a lost rank (`train.max_failures`), and a rerun of the same
command resuming from that checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import math

import torch

from cluster.train_group import TrainerSpec, deepspeed_config, fit
from pgraft import contract
from pgraft.config import Config, identity_fields
from pgraft.models.adapters import check_model_folder
from pgraft.storage import open_storage
from pgraft.tables import accepted_content, read_selection_summary
from stages.train.data import check_selection
from stages.train.errors import TrainError
from stages.train.loop import train_worker

def train_fingerprint(cfg: Config, accepted: bytes) -> str:
    """What the weights are a function of: the accepted table's bytes, the train settings marked
    WHAT in pgraft/config.py (worker count included: each rank draws its own noise; not `epochs`,
    which acts through the resolved `steps`) and the model being tuned."""
    settings = identity_fields(cfg.train, "what")
    # The model fields the training reads: the base weights (path, kind), the previous round's
    # network it continues from (finetuned), and the sampler whose timesteps above x_k it trains on
    # (scheduler, timestep_spacing, num_inference_steps). Sampling-only fields (guidance, size,
    # dtype, device) are left out; the set is kept as it was so fingerprints stay the same.
    model = cfg.model.model_dump(mode="json", include={"path", "kind", "finetuned", "scheduler", "timestep_spacing",
                                                       "num_inference_steps"})
    digest = hashlib.sha256(accepted)
    digest.update(json.dumps({"train": settings, "model": model}, sort_keys=True).encode())
    return digest.hexdigest()


def steps_for_epochs(epochs: float, accepted: int, batch_size: int) -> int:
    """Optimizer steps for `epochs` passes over `accepted` latents in batches of `batch_size`."""
    return max(1, math.ceil(epochs * accepted / batch_size))


def check_settings(cfg: Config) -> None:
    """Errors a worker would otherwise meet only after placement and model load."""
    from pgraft.models.adapters import TRAINABLE_KINDS

    if cfg.model.kind not in TRAINABLE_KINDS:
        raise TrainError(f"model.kind={cfg.model.kind}: the train stage supports {', '.join(TRAINABLE_KINDS)}")
    if cfg.model.finetuned and cfg.train.mode == "lora":
        raise TrainError("training on top of a fine-tuned composite in train.mode=lora (a later round) is not supported "
                         "yet; use train.mode=full")
    deepspeed_config(cfg.train, "train", cfg.train.num_workers, torch.device("cpu"))  # batch sizes that divide evenly


def run_train(cfg: Config, progress: bool = True) -> contract.TrainSummary:

    cfg = cfg.with_absolute_paths()
    storage = open_storage(cfg.run.uri)
    selection, name = cfg.train_output()
    rnd = cfg.run.round
    check_selection(storage, cfg, selection)
    check_model_folder(cfg.model)
    check_settings(cfg)
    accepted, accepted_rows = accepted_content(storage, rnd, selection, read_selection_summary(storage, rnd, selection))
    if cfg.train.epochs is not None:
        cfg.train.steps = steps_for_epochs(cfg.train.epochs, accepted_rows,
                                           cfg.train.batch_size)
    fingerprint = train_fingerprint(cfg, accepted)
    summary_key = contract.train_summary_key(rnd, name)
    if storage.exists(summary_key):
        done = contract.TrainSummary.from_json(storage.get_bytes(summary_key), storage.url(summary_key))
        if done.fingerprint != fingerprint:
            raise TrainError(f"{storage.url(contract.train_prefix(rnd, name))} was trained on another selection or with "
                             "other train settings; use another train.name, or delete that folder to train again")
        if storage.exists(f"{contract.model_prefix(rnd, name)}/{contract.COMPOSITE_CARD}"):
            return done  # trained and exported already: a rerun of the round goes on from here

    fit(TrainerSpec(
        worker=train_worker,
        loop_config={"cfg": cfg.model_dump(mode="json"), "selection": selection, "name": name, "progress": progress,
                     "fingerprint": fingerprint},
        section=cfg.train, section_key="train", device=cfg.model.device, device_key="model.device", storage=storage,
        prefix=contract.train_prefix(rnd, name), placement_timeout_s=cfg.cluster.placement_timeout_s,
        label="train workers",
    ))
    return contract.TrainSummary.from_json(storage.get_bytes(summary_key), storage.url(summary_key))
