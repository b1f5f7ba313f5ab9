"""Typed run configuration: YAML file + dotted command-line overrides, validated by pydantic.

Every field carries a description; `docs/CONFIG.md` is generated from them
(`python -m pgraft.config --markdown`). Errors are one line that names the key.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticUndefined

from pgraft.errors import ConfigError
from pgraft.models.fetch import child
from pgraft.tasks import DEFAULT_TASK, TaskSpec, get_task

__all__ = ["ConfigError", "Config", "load_config", "config_from_dict", "config_to_yaml"]

# Identity metadata: every config field says whether it changes what a stage produces. A stage's
# "same work" check (run config, inversion settings, train and corrector fingerprints) takes the
# fields marked WHAT (and PER_ROUND where it compares one round's work) from the sections it
# reads; tests/pgraft/test_config.py fails on a field without a mark.
WHAT = {"identity": "what"}  # changes the results (samples, rows, weights)
HOW = {"identity": "how"}  # placement, speed, retries, bookkeeping or where results are kept: never the results
PER_ROUND = {"identity": "per_round"}  # differs between the rounds of one run by design (run.round, model.finetuned)


def identity_of(field) -> str | None:
    """The identity mark (`what`, `how`, `per_round`) of a pydantic field, or None when unmarked."""
    extra = field.json_schema_extra
    return extra.get("identity") if isinstance(extra, dict) else None


def identity_fields(section: "BaseModel", *marks: str) -> dict:
    """The section's values whose fields carry one of `marks` (JSON-ready), by field name."""
    dumped = section.model_dump(mode="json")
    return {name: dumped[name] for name, field in type(section).model_fields.items() if identity_of(field) in marks}


def identity(config: "Config | dict", sections: tuple[str, ...], marks: tuple[str, ...] = ("what",)) -> dict:
    """{"section.key": value} of the fields marked with one of `marks` in `sections`, from a
    Config or from a dumped one (an earlier run's config.yaml: keys it lacks are left out)."""
    tree = config.model_dump(mode="json") if isinstance(config, BaseModel) else config
    out = {}
    for section in sections:
        values = tree.get(section) or {}
        for name, field in Config.model_fields[section].annotation.model_fields.items():
            if identity_of(field) in marks and name in values:
                out[f"{section}.{name}"] = values[name]
    return out


def first_difference(theirs: dict, mine: dict, common_only: bool = False) -> tuple[str, Any, Any] | None:
    """The first key (sorted) whose value differs between two identities, as (key, theirs, mine);
    `common_only` compares only the keys both have (identities recorded by older versions)."""
    keys = set(theirs) & set(mine) if common_only else set(theirs) | set(mine)
    for key in sorted(keys):
        if theirs.get(key) != mine.get(key):
            return key, theirs.get(key), mine.get(key)
    return None


class _Section(BaseModel):
    # Unknown keys are errors: a typo must not silently fall back to a default.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RunSection(_Section):
    uri: str | None = Field(None, description="Where the run lives: a local path, file:// URI or s3://bucket/prefix "
                            "(default: runs/<task.name>).", json_schema_extra=HOW)
    seed: int = Field(0, ge=0, description="Run seed; every sample's seed derives from (seed, round, prompt_id, sample_idx).", json_schema_extra=WHAT)
    rounds: int = Field(1, ge=1, description="How many generate→reward→filter→train rounds the round pipeline runs.", json_schema_extra=HOW)
    round: int = Field(0, ge=0, description="The round a single-stage command (e.g. `pgraft generate`) works on.", json_schema_extra=PER_ROUND)


def checked_pretrain_options(spec: "TaskSpec", options: dict) -> dict:
    """`task.pretrain_options` as the task's pretraining takes them (each cast to its flag's type);
    an option it does not take is one line naming the key and the ones it does."""
    takes = {flag.lstrip("-").replace("-", "_"): kind for flag, (kind, _, _) in spec.pretrain_options.items()}
    takes.pop("bases", None)  # the pipeline asks for the base the run samples from
    out = {}
    for key, value in options.items():
        if key not in takes:
            raise ValueError(f"task.pretrain_options.{key} is not an option of the {spec.name} task's pretraining; "
                             f"it takes {', '.join(sorted(takes)) or 'none'}")
        try:
            out[key] = takes[key](value)
        except (TypeError, ValueError):
            raise ValueError(f"task.pretrain_options.{key} takes a {takes[key].__name__}, not {value!r}") from None
    return out


class TaskSection(_Section):
    name: str | None = Field(
        default_factory=lambda: DEFAULT_TASK,
        description="Registered task (pgraft.tasks; `pgraft pretrain --help` lists them) or a plug-in `module:attr` "
        "TaskSpec: its models are pretrained into `task.dir` when missing, and it gives the defaults of model.path, "
        "reward.name, reward.hash, generate.prompts and the evaluation's features; null for none.", json_schema_extra=WHAT,
    )
    dir: str | None = Field(None, description="Where the task's models live: a local folder or a storage location such "
                            "as s3://bucket/models/<task> (use storage on a multi-node cluster); default models/<task.name>. "
                            "The round pipeline pretrains them in a Ray task and publishes them there once.", json_schema_extra=HOW)
    seed: int = Field(0, ge=0, description="Seed of the task's pretraining and of its data splits.", json_schema_extra=WHAT)
    pretrain: bool = Field(True, description="The round pipeline pretrains the task's models into task.dir (in a Ray "
                           "task) when they are missing; false: the models named by model.path and reward.model_path "
                           "must exist.", json_schema_extra=HOW)
    pretrain_options: dict[str, Any] = Field(
        default_factory=dict, description="Options of that pretraining, as `pgraft pretrain <task> --help` lists them "
        "(a flag's dashes as underscores: {ddpm_steps: 400, width: 16}); unset ones take the flag's default. "
        "task.dir's summary.json records them: models made with other values are refused, not mixed.",
        json_schema_extra=WHAT,
    )

    @field_validator("name")
    @classmethod
    def _registered(cls, name: str | None) -> str | None:
        if name is not None:
            try:
                get_task(name)
            except ConfigError as exc:
                raise ValueError(str(exc).removeprefix("config error: task.name: ")) from None
        return name

    def spec(self) -> "TaskSpec | None":
        """The task's registered spec (None for no task)."""
        return None if self.name is None else get_task(self.name)


class ModelSection(_Section):
    kind: Literal["class_unet", "class_sequence", "layout_sequence", "stable_diffusion", "sd3"] = Field(
        "class_unet",
        description="Adapter: class-conditional UNet2DModel (DDPM/DDIM or flow), class-conditional sequence "
        "transformer over token vectors, the same conditioned per position (layouts: a prompt names the elements' "
        "classes), StableDiffusionPipeline 2.x, or StableDiffusion3Pipeline (flow matching). "
        "Unset in a config with a task: the task's model kind.", json_schema_extra=WHAT,
    )
    path: str | None = Field(None, description="The base model's diffusers folder: a local path or a storage location "
                             "(s3://…), fetched once per node into PGRAFT_CACHE_DIR. Default: the task's base model under task.dir.", json_schema_extra=WHAT)
    scheduler: Literal["folder", "ddim", "ddpm", "flow_euler"] = Field(
        "folder", description="Sampler; `folder` uses the scheduler saved with the model.", json_schema_extra=WHAT
    )
    timestep_spacing: Literal["folder", "leading", "trailing", "linspace"] = Field(
        "folder", description="Which training timesteps the sampler visits (DDIM `leading` at 20 of 1000: 950, 900, …, 0).", json_schema_extra=WHAT
    )
    num_inference_steps: int = Field(20, ge=1, le=1000, description="Sampler steps from x_T to x_0.", json_schema_extra=WHAT)
    guidance_scale: float = Field(0.7, ge=0.0, description="Classifier-free guidance scale; 1 disables guidance (conditional only).", json_schema_extra=WHAT)
    height: int | None = Field(None, ge=8, description="Image height for pipelines (None: the model's default).", json_schema_extra=WHAT)
    width: int | None = Field(None, ge=8, description="Image width for pipelines (None: the model's default).", json_schema_extra=WHAT)
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="Compute dtype; latents are stored as float32.", json_schema_extra=WHAT)
    device: str = Field("auto", description="`auto` (cuda when visible, else cpu), `cpu`, or `cuda`.", json_schema_extra=HOW)
    finetuned: str | None = Field(
        None, description="A train stage's `model/` location (path or storage URI): sample with the composite sampler (fine-tuned model "
        "for steps T→t, base model for t→0). The round pipeline sets it for rounds after the first.", json_schema_extra=PER_ROUND,
    )
    noise_corrector: str | None = Field(
        None, description="A noise corrector's `model/` location (`pgraft train-corrector`; flow models only): every "
        "sampler draws ε ~ N(0, I), maps it through the corrector to z and starts the base flow from z.", json_schema_extra=WHAT,
    )


class GenerateSection(_Section):
    prompts: list[str] | str | None = Field(
        None, description="Prompts as a list, or the path of a text file with one prompt per line (default: the task's).", json_schema_extra=WHAT,
    )
    samples_per_prompt: int = Field(64, ge=1, description="M: samples drawn per prompt.", json_schema_extra=WHAT)
    capture_steps: list[int] = Field(
        default_factory=lambda: [5, 10, 15],
        description="Step indices k (1 ≤ k < num_inference_steps) whose latent x_k, after k sampler steps, is cached.", json_schema_extra=WHAT,
    )
    samples_per_shard: int = Field(128, ge=1, description="Samples per work unit; one WebDataset shard per unit.", json_schema_extra=WHAT)
    store_views: bool = Field(False, description="Also store a PNG of each sample that is not an image (a molecule "
                              "drawn by RDKit), as `<key>.png` beside it, for viewing only.", json_schema_extra=WHAT)
    num_workers: int = Field(2, ge=1, description="Ray generate actors (one GPU each where the cluster has GPUs).", json_schema_extra=HOW)
    batch_size: int = Field(32, ge=1, description="Samples per model call inside an actor.", json_schema_extra=HOW)
    cpus_per_worker: int | None = Field(None, ge=1, description="CPUs per generate actor on CPU (default: a node's CPUs split evenly between the actors that fit on it); fixes each actor's torch threads.", json_schema_extra=HOW)
    resources: dict[str, float] = Field(default_factory=dict, description="Extra Ray resources each generate actor "
                                        "requests, e.g. {gpu_node: 1} to pin actors to a node type.", json_schema_extra=HOW)

    @field_validator("capture_steps")
    @classmethod
    def _sorted_unique(cls, steps: list[int]) -> list[int]:
        if len(set(steps)) != len(steps):
            raise ValueError(f"duplicate step indices in {steps}")
        return sorted(steps)


class RewardSection(_Section):
    name: str | None = Field(None, description="Registered reward (docs/SELECTION.md) or a plug-in `module:function` "
                             "factory (default: the task's reward).", json_schema_extra=WHAT)
    table: str | None = Field(None, description="Name of the reward table under rewards/ (default: the reward's name).", json_schema_extra=HOW)
    model_path: str | None = Field(
        None, description="Weights the reward needs (default: the task's weights for its own reward, e.g. the "
        "classifier under task.dir), a CLIP folder or hub id for clip_score / aesthetic.", json_schema_extra=WHAT,
    )
    options: dict[str, Any] = Field(default_factory=dict, description="Reward-specific keyword arguments (e.g. transform: log_prob, or vqascore's normalise, dtype and backend; docs/SELECTION.md lists them).", json_schema_extra=WHAT)
    hash: str | None = Field(None, description="sample_hash: `exact` (decoded pixels), `perceptual` (64-bit dHash) or a "
                             "plug-in `module:function` (default: the task's).", json_schema_extra=WHAT)
    batch_size: int = Field(256, ge=1, description="Images per reward call.", json_schema_extra=HOW)
    num_workers: int = Field(1, ge=1, description="Ray reward actors (one GPU each where the cluster has GPUs).", json_schema_extra=HOW)
    device: str = Field("auto", description="`auto`, `cpu` or `cuda` for reward models.", json_schema_extra=HOW)
    cpus_per_worker: int | None = Field(None, ge=1, description="CPUs per reward actor on CPU (default: a node's CPUs split evenly between the actors that fit on it); fixes each actor's torch threads.", json_schema_extra=HOW)
    resources: dict[str, float] = Field(default_factory=dict, description="Extra Ray resources each reward actor requests.", json_schema_extra=HOW)

    def table_name(self) -> str:
        if self.table:
            return self.table
        return self.name.split(":")[-1]


FilterMethod = Literal["rejection", "threshold", "best_of_n", "top_k", "quantile"]


class FilterSection(_Section):
    name: str | None = Field(None, description="Selection name: output goes to filter/<name>/ (default derived from method and parameters).", json_schema_extra=HOW)
    method: FilterMethod = Field("best_of_n", description="GRS rule: rejection, threshold, best_of_n, top_k or quantile.", json_schema_extra=WHAT)
    threshold: float | None = Field(None, description="threshold: accept r ≥ τ.", json_schema_extra=WHAT)
    n: int | None = Field(None, ge=1, description="best_of_n: group size N; the best of each N consecutive samples of a prompt.", json_schema_extra=WHAT)
    k: int | None = Field(None, ge=1, description="top_k: keep the K best of each group of M.", json_schema_extra=WHAT)
    m: int | None = Field(None, ge=1, description="top_k: group size M (default: all samples of the prompt).", json_schema_extra=WHAT)
    alpha: float | None = Field(None, gt=0, description="rejection: temperature α; accept with probability exp((r − r_max)/α).", json_schema_extra=WHAT)
    r_max: float | None = Field(None, description="rejection: r_max (default: the largest reward in the table).", json_schema_extra=WHAT)
    quantile: float | None = Field(None, gt=0, le=1, description="quantile: keep this top fraction of all rows.", json_schema_extra=WHAT)
    dedup: bool = Field(False, description="Keep one representative (highest reward) per sample_hash within a prompt first.", json_schema_extra=WHAT)
    kl_budget: float | None = Field(None, gt=0, description="Pick τ, K, N, the quantile or α so the implied KL (nats) meets this budget.", json_schema_extra=WHAT)
    nan_policy: Literal["error", "drop"] = Field("error", description="NaN/inf rewards: `error` names the keys; `drop` leaves them out.", json_schema_extra=WHAT)
    engine: Literal["local", "ray"] = Field("local", description="`local`: one process; `ray`: prompts hash-partitioned over the Ray cluster, for tables larger than a node's memory (same accepted rows).", json_schema_extra=HOW)
    partitions: int | None = Field(None, ge=1, le=4096, description="ray engine: prompt partitions (default: 2 per CPU of the cluster, 2–256); changes speed, never the rows.", json_schema_extra=HOW)

    @model_validator(mode="after")
    def _parameters_present(self) -> "FilterSection":
        need = {"threshold": "threshold", "best_of_n": "n", "top_k": "k", "quantile": "quantile", "rejection": "alpha"}[self.method]
        if getattr(self, need) is None and self.kl_budget is None:
            raise ValueError(f"filter.{need} is required for filter.method={self.method} (or set filter.kl_budget)")
        if self.method == "top_k" and self.m is not None and self.k is not None and self.k > self.m:
            raise ValueError(f"filter.k ({self.k}) exceeds filter.m ({self.m})")
        return self

    def selection_name(self) -> str:
        if self.name:
            return self.name
        value = {"threshold": self.threshold, "best_of_n": self.n, "top_k": self.k, "quantile": self.quantile,
                 "rejection": self.alpha}[self.method]
        label = f"kl{self.kl_budget:g}" if value is None else f"{value:g}"
        return f"{self.method}-{label}" + ("-dedup" if self.dedup else "")


def _inherit(base: type[BaseModel], name: str, default: Any = PydanticUndefined, note: str = "", **constraints) -> Any:
    """`base`'s field `name` for a subclass to re-declare: the same constraints, description and identity
    mark, with another default, tighter `constraints` (e.g. le=2) or a `note` appended to the description
    where given. Pydantic does not inherit a field's definition into a re-declared one, so a subclass
    that only changes a default writes `lr: float = _inherit(TrainerSection, "lr", 1e-3)` instead of
    copying the whole Field (its annotation must be repeated: pydantic requires it on every override)."""
    info = base.model_fields[name]
    kept = {key: value for meta in info.metadata for key, value in dataclasses.asdict(meta).items()}  # Ge(ge=1) → ge=1
    factory = None
    if default is PydanticUndefined:  # the base's default, or its factory
        default, factory = info.default, info.default_factory
    return Field(default, default_factory=factory, description=" ".join(filter(None, [info.description, note])),
                 json_schema_extra=info.json_schema_extra, **{**kept, **constraints})


class TrainerSection(_Section):
    """The settings of a DeepSpeed trainer on Ray actors (cluster/train_group.py), shared by the train
    stage (`train.*`) and the noise corrector (`corrector.*`), which inherit them: the YAML keys stay in
    each section. Defaults are the train stage's; CorrectorSection re-defaults what differs (`_inherit`)."""

    steps: int = Field(400, ge=1, description="Optimizer steps.", json_schema_extra=WHAT)
    batch_size: int = Field(64, ge=1, description="Global batch size (micro batch × accumulation × processes).",
                            json_schema_extra=WHAT)
    micro_batch_size: int | None = Field(None, ge=1, description="Per-process micro batch (default: batch_size / "
                                         "processes).", json_schema_extra=WHAT)
    lr: float = Field(1e-4, gt=0, description="AdamW learning rate.", json_schema_extra=WHAT)
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.", json_schema_extra=WHAT)
    grad_clip: float = Field(1.0, ge=0, description="Gradient norm clipping (0: off).", json_schema_extra=WHAT)
    zero_stage: int = Field(0, ge=0, le=3, description="DeepSpeed ZeRO stage.", json_schema_extra=WHAT)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field("auto", description="`auto`: bf16 on CUDA, fp32 on CPU.",
                                                               json_schema_extra=WHAT)
    seed: int = Field(0, ge=0, description="Seed of the initialisation (LoRA, a corrector's network), the data order "
                      "and the noise and dropout draws (per step, so resume is exact).", json_schema_extra=WHAT)
    checkpoint_every: int = Field(100, ge=1, description="Save a DeepSpeed checkpoint every this many steps (and at "
                                  "the end).", json_schema_extra=HOW)
    # The worker count changes the weights: each rank draws its own noise.
    num_workers: int = Field(1, ge=1, description="Ranks of the DeepSpeed group (one Ray actor each); one GPU "
                             "each when model.device is cuda (or auto on a cluster with GPUs), else CPUs.",
                             json_schema_extra=WHAT)
    cpus_per_worker: int | None = Field(None, ge=1, description="CPUs per worker on CPU (default: a node's CPUs "
                                        "split evenly between the workers that fit on it, at least 1).",
                                        json_schema_extra=HOW)
    resources_per_worker: dict[str, float] = Field(default_factory=dict, description="Extra Ray resources per "
                                                   "worker, e.g. {gpu_node: 1} to pin training to a node type.",
                                                   json_schema_extra=HOW)
    keep_checkpoints: int = Field(2, ge=1, description="Checkpoints kept in storage (the newest); older ones are "
                                  "deleted.", json_schema_extra=HOW)
    max_failures: int = Field(2, ge=-1, description="Restarts of the whole group after a lost rank; each "
                              "restart resumes from the last checkpoint (-1: unlimited).", json_schema_extra=HOW)


class TrainSection(TrainerSection):
    # The trainer settings (steps … max_failures) come from TrainerSection with its defaults.
    selection: str | None = Field(None, description="Selection (filter/<name>) to train on; default: the filter "
                                  "section's name.", json_schema_extra=WHAT)
    t_step: int = Field(15, ge=1, description="Step index k of the accepted latents x_k to learn from (a captured step); "
                        "k = model.num_inference_steps means x_0 (GRAFT).", json_schema_extra=WHAT)
    name: str | None = Field(None, description="Output name under train/ (default: <selection>-t<t_step>).",
                             json_schema_extra=HOW)
    mode: Literal["full", "lora"] = Field("full", description="Fine-tune every weight, or a LoRA adapter (peft).",
                                          json_schema_extra=WHAT)
    lora_rank: int = Field(8, ge=1, description="LoRA rank.", json_schema_extra=WHAT)
    lora_targets: list[str] = Field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"],
                                    description="Module names that get LoRA adapters.", json_schema_extra=WHAT)
    steps: int = _inherit(TrainerSection, "steps", note="train.epochs, when set, replaces them.")
    # HOW: epochs acts only through the steps it resolves to, and those are fingerprinted.
    epochs: float | None = Field(None, gt=0, description="Passes over the accepted set: when set, the steps are "
                                 "ceil(epochs × accepted / batch_size), so training scales with what the filter kept.",
                                 json_schema_extra=HOW)
    prompt_dropout: float = Field(0.1, ge=0, le=1, description="Probability of replacing the condition by the null "
                                  "condition, as the base was trained for classifier-free guidance.",
                                  json_schema_extra=WHAT)
    eval_samples_per_prompt: int = Field(50, ge=0, description="Fresh samples per prompt that the evaluate stage "
                                         "(`pgraft evaluate`, and the round pipeline after training) draws and scores "
                                         "for the base and the fine-tuned composite (0: the pipeline skips evaluation).",
                                         json_schema_extra=HOW)

    def output_name(self, selection: str) -> str:
        return self.name or f"{selection}-t{self.t_step}"


class InvertSection(_Section):
    name: str | None = Field(None, description="Output name: the inversion goes to inversion/<name>/ in the run "
                             "(default <task.name>-<invert.split>).", json_schema_extra=HOW)
    data: str = Field("task", description="What to invert: `task` (the built-in task's real data, encoded as the "
                      "model sees it) or the location of a WebDataset folder of `.tar` shards whose records hold an "
                      "`x_0` tensor in `.latents.safetensors` or a `.png` image, and optionally a `.json` with a `prompt`.", json_schema_extra=WHAT)
    split: Literal["train", "test", "all"] = Field("train", description="`data: task`: which part of the task's data "
                                                    "(each task defines its splits).", json_schema_extra=WHAT)
    conditional: bool = Field(False, description="Invert with each record's prompt as the condition (guided by "
                              "model.guidance_scale); false: the null condition, the unconditional flow.", json_schema_extra=WHAT)
    limit: int | None = Field(None, ge=1, description="Invert only the first this many data points of the task's "
                              "data, or the first this many shards of a WebDataset (None: all).", json_schema_extra=WHAT)
    tolerance: float = Field(1e-3, gt=0, description="A backward Euler step has converged when its fixed-point update "
                             "falls to this RMS per element.", json_schema_extra=WHAT)
    max_iterations: int = Field(50, ge=1, description="Fixed-point iterations allowed per Euler step; a sample still "
                                "moving then is recorded as not converged.", json_schema_extra=WHAT)
    samples_per_shard: int = Field(256, ge=1, description="Data points per work unit; one shard and one table part each.", json_schema_extra=WHAT)
    batch_size: int = Field(256, ge=1, description="Data points per model call inside an actor.", json_schema_extra=HOW)
    num_workers: int = Field(2, ge=1, description="Ray invert actors (one GPU each where the cluster has GPUs).", json_schema_extra=HOW)
    cpus_per_worker: int | None = Field(None, ge=1, description="CPUs per invert actor on CPU (default: a node's CPUs split evenly between the actors that fit on it); fixes each actor's torch threads.", json_schema_extra=HOW)
    resources: dict[str, float] = Field(default_factory=dict, description="Extra Ray resources each invert actor requests.", json_schema_extra=HOW)


# corrector.kind=gaussian is fitted in closed form: it reads only the WHAT fields also marked GAUSSIAN_FIT.
# The flow kind reads every WHAT field (the Gaussian's, its network's and the trainer's); see fit_identity.
GAUSSIAN_FIT = {**WHAT, "gaussian_fit": True}


class CorrectorSection(TrainerSection):
    kind: Literal["gaussian", "flow"] = Field("flow", description="`gaussian`: mean and covariance of the inverse "
                                              "noises, fitted in closed form (the baseline); `flow`: that Gaussian "
                                              "plus a small rectified flow trained on the whitened inverse noises "
                                              "with the trainer settings (steps … max_failures), which `gaussian` "
                                              "ignores but for cpus_per_worker and resources_per_worker.",
                                              json_schema_extra=GAUSSIAN_FIT)
    # HOW: the inversion enters the fingerprint through its shards' hashes, not its name.
    inversion: str | None = Field(None, description="The inversion (inversion/<name>) to fit; default invert.name.",
                                  json_schema_extra=HOW)
    name: str | None = Field(None, description="Output name under corrector/ (default <kind>-<inversion>).",
                             json_schema_extra=HOW)
    include_unconverged: bool = Field(False, description="Fit non-converged inversions too (default: left out, "
                                      "counted).", json_schema_extra=GAUSSIAN_FIT)
    covariance: Literal["full", "diagonal"] = Field("full", description="The Gaussian's covariance; full is a D×D "
                                                    "matrix (up to 8192 latent elements).",
                                                    json_schema_extra=GAUSSIAN_FIT)
    ridge: float = Field(1e-4, gt=0, description="Added to the covariance's diagonal so its Cholesky factor exists.",
                         json_schema_extra=GAUSSIAN_FIT)
    channels: list[int] = Field(default_factory=lambda: [16, 32], description="flow: the corrector UNet's "
                                "block_out_channels: its size (16,32 with one layer per block: 0.16 M parameters, 16 % of the built-in task's 1.0 M base).",
                                json_schema_extra=WHAT)
    layers_per_block: int = Field(1, ge=1, description="flow: ResNet layers per UNet block.", json_schema_extra=WHAT)
    sampling_steps: int = Field(4, ge=1, description="flow: the corrector's Euler steps per sample (its FLOPs count).",
                                json_schema_extra=WHAT)
    coupling: Literal["independent", "ot"] = Field("independent", description="flow: how training pairs noise with "
                                                   "data: `independent` (rectified flow; its Gaussian part is exact, "
                                                   "docs/DESIGN.md §5) or `ot`, matched by optimal transport within "
                                                   "each micro batch (minibatch OT coupling).", json_schema_extra=WHAT)
    # The trainer settings (TrainerSection) where the corrector's differ from the train stage's.
    steps: int = _inherit(TrainerSection, "steps", 2000)
    batch_size: int = _inherit(TrainerSection, "batch_size", 256)
    lr: float = _inherit(TrainerSection, "lr", 1e-3)
    zero_stage: int = _inherit(TrainerSection, "zero_stage", le=2, note="Up to 2 for a corrector: it is small, and "
                               "ZeRO 3 would partition the weights it exports.")
    checkpoint_every: int = _inherit(TrainerSection, "checkpoint_every", 500)
    cpus_per_worker: int | None = _inherit(TrainerSection, "cpus_per_worker", note="For the Gaussian fit's task too.")
    resources_per_worker: dict[str, float] = _inherit(TrainerSection, "resources_per_worker",
                                                      note="For the Gaussian fit's task too.")

    @field_validator("channels")
    @classmethod
    def _channels(cls, channels: list[int]) -> list[int]:
        if not channels or any(c < 1 for c in channels):
            raise ValueError(f"needs one or more positive channel counts, got {channels}")
        return channels

    def fit_identity(self) -> dict:
        """The settings this kind's fit reads, by name (what its fingerprint takes): every WHAT field for
        `flow`, the GAUSSIAN_FIT ones for `gaussian`."""
        fields = type(self).model_fields
        return {name: value for name, value in identity_fields(self, "what").items()
                if self.kind == "flow" or fields[name].json_schema_extra.get("gaussian_fit")}

    def inversion_name(self, invert: "InvertSection") -> str:
        return self.inversion or invert.name

    def output_name(self, invert: "InvertSection") -> str:
        return self.name or f"{self.kind}-{self.inversion_name(invert)}"


class ClusterSection(_Section):
    placement_timeout_s: float = Field(300.0, gt=0, description="How long a stage waits for the cluster to offer "
                                       "the resources its actors ask for (an autoscaler may be adding nodes) before "
                                       "it stops with an error naming the missing resource.", json_schema_extra=HOW)
    max_restarts: int = Field(3, ge=0, description="Restarts of a lost generate/reward/eval actor; its unfinished "
                              "unit is retried on the restarted actor.", json_schema_extra=HOW)


class StorageSection(_Section):
    outage_s: float = Field(120.0, gt=0, description="How long every storage call rides out an unreachable object "
                            "store (connections refused, cut or timed out, 5xx answers), retrying with backoff and "
                            "jitter, before the stage stops with one line saying for how long storage was "
                            "unreachable. Work in flight is retried, not lost.", json_schema_extra=HOW)
    lease_ttl_s: float = Field(60.0, gt=0, description="A stage's driver holds a lease on its output in storage and "
                               "renews it every third of this; a lease not renewed for this long (its driver died) "
                               "is taken over by the next driver.", json_schema_extra=HOW)
    lease_wait_s: float = Field(180.0, ge=0, description="How long a second driver of the same stage output waits "
                                "for a live holder to finish before it stops with one line naming the holder (0: "
                                "stop at once). A stale lease is taken over sooner, after lease_ttl_s.",
                                json_schema_extra=HOW)


class Config(_Section):
    run: RunSection = Field(default_factory=RunSection, description="Where and with which seed the run lives.", json_schema_extra=WHAT)
    task: TaskSection = Field(default_factory=TaskSection, description="The built-in task, if any.", json_schema_extra=WHAT)
    model: ModelSection = Field(default_factory=ModelSection, description="The base model and its sampler.", json_schema_extra=WHAT)
    generate: GenerateSection = Field(default_factory=GenerateSection, description="The generate stage.", json_schema_extra=WHAT)
    reward: RewardSection = Field(default_factory=RewardSection, description="The reward stage.", json_schema_extra=WHAT)
    filter: FilterSection = Field(default_factory=lambda: FilterSection(n=8), description="The filter stage.", json_schema_extra=WHAT)
    train: TrainSection = Field(default_factory=TrainSection, description="The train stage.", json_schema_extra=WHAT)
    invert: InvertSection = Field(default_factory=InvertSection, description="The invert stage (Inverse Noise Correction).", json_schema_extra=WHAT)
    corrector: CorrectorSection = Field(default_factory=CorrectorSection, description="The noise corrector (`pgraft "
                                        "train-corrector`).", json_schema_extra=WHAT)
    cluster: ClusterSection = Field(default_factory=ClusterSection, description="Placement and fault tolerance on Ray.", json_schema_extra=HOW)
    storage: StorageSection = Field(default_factory=StorageSection, description="Riding out object-store outages; "
                                    "one writer per stage output.", json_schema_extra=HOW)

    def train_output(self) -> tuple[str, str]:
        """(selection the train stage reads, its output name under train/)."""
        selection = self.train.selection or self.filter.selection_name()
        return selection, self.train.output_name(selection)

    def trained_model(self) -> str:
        """Where this round's train stage exports its model (train/<name>/model/ in the run):
        what the evaluate stage scores and the next round samples from."""
        from pgraft import contract
        from pgraft.storage import open_storage

        return open_storage(self.run.uri).url(contract.model_prefix(self.run.round, self.train_output()[1]))

    def with_absolute_paths(self) -> "Config":
        """A copy whose local locations are absolute, resolved where this process runs.

        Actors run in their own working directory (under `ray job submit`, each node unpacks
        its own copy), so a relative path would name a different folder in every process.
        Storage URIs are left alone; so is a relative model/reward reference that is not a
        local folder here (e.g. a hub id)."""
        out = self.model_copy(deep=True)
        # `ray job submit` runs the driver in Ray's unpacked copy of the working dir
        # (…/runtime_resources/working_dir_files/_ray_pkg_<hash>), which Ray deletes later and
        # whose name changes with every code edit: nothing may be written or kept there.
        in_job_copy = "_ray_pkg_" in Path.cwd().as_posix()

        def absolute(key: str, value: str | None, must_exist: bool, written: bool) -> str | None:
            if value is None or "://" in value or Path(value).expanduser().is_absolute():
                return value
            path = Path(value).expanduser()
            if must_exist and not path.exists():
                return value  # e.g. a hub id
            if in_job_copy and (written or not path.exists()):
                raise ConfigError(f"config error: {key}: {value!r} is relative, and this job runs in Ray's temporary "
                                  "copy of the working dir; use s3://… (or an absolute path every node mounts)")
            return str(path.absolute())

        out.run.uri = absolute("run.uri", out.run.uri, must_exist=False, written=True)
        if out.task.name is not None:  # task.dir is read (and maybe written) only for a registered task
            # Pretraining writes there; otherwise it is only read, for weights that another key
            # (reward.model_path) usually names, so a folder that is not here is left to fail where it is read.
            pretrain = out.task.pretrain
            out.task.dir = absolute("task.dir", out.task.dir, must_exist=not pretrain, written=pretrain)
        out.model.path = absolute("model.path", out.model.path, must_exist=False, written=False)
        out.model.finetuned = absolute("model.finetuned", out.model.finetuned, must_exist=False, written=False)
        out.model.noise_corrector = absolute("model.noise_corrector", out.model.noise_corrector, must_exist=False,
                                             written=False)
        if out.invert.data != "task":
            out.invert.data = absolute("invert.data", out.invert.data, must_exist=False, written=False)
        out.reward.model_path = absolute("reward.model_path", out.reward.model_path, must_exist=True, written=False)
        if isinstance(out.generate.prompts, str):
            out.generate.prompts = absolute("generate.prompts", out.generate.prompts, must_exist=False, written=False)
        return out

    @model_validator(mode="after")
    def _apply_storage_settings(self) -> "Config":
        """Storage calls of every process that loads this config (drivers, actors, train ranks)
        ride out outages for `storage.outage_s`: they open stores by URI alone."""
        from pgraft.storage import set_outage_s

        set_outage_s(self.storage.outage_s)
        return self

    @model_validator(mode="after")
    def _defaults_from_task(self) -> "Config":
        """Fill the keys left unset from the task's spec (the dumped config.yaml shows the values used)."""
        spec = self.task.spec()
        if spec is not None and self.task.dir is None:
            self.task.dir = f"models/{spec.name}"
        if self.run.uri is None:
            self.run.uri = f"runs/{spec.name if spec else 'run'}"
        if spec is not None and "kind" not in self.model.model_fields_set:
            self.model.kind = spec.model_kind
        defaults = {"model.path": lambda: child(self.task.dir, spec.base_model),
                    "reward.name": lambda: spec.reward, "reward.hash": lambda: spec.hash,
                    "generate.prompts": lambda: list(spec.prompts),
                    "invert.name": lambda: f"{spec.name}-{self.invert.split}"}
        # Without a task: the model and the reward must be named; prompts are checked where they are
        # needed (the generate stage), and the rest have defaults of their own.
        no_task = {"reward.hash": lambda: "exact", "generate.prompts": lambda: None, "invert.name": lambda: "inversion"}
        for key, default in defaults.items():
            section, name = key.split(".")
            if getattr(getattr(self, section), name) is None:
                if spec is None and key not in no_task:
                    raise ValueError(f"{key} is required when task.name is null")
                setattr(getattr(self, section), name, default() if spec else no_task[key]())
        if spec is not None:
            self.task.pretrain_options = checked_pretrain_options(spec, self.task.pretrain_options)
        if spec is not None:  # a reward or hash for another sample kind than the task's: say so now
            from pgraft.hashing import hash_takes
            from pgraft.rewards import reward_takes
            from pgraft.samples import check_takes

            check_takes("reward.name", self.reward.name, reward_takes(self.reward.name), spec.sample_kind)
            check_takes("reward.hash", self.reward.hash, hash_takes(self.reward.hash), spec.sample_kind)
        return self


def _format_validation_error(err: ValidationError) -> str:
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"]) or "<root>"
    if first["type"] == "value_error" and first["msg"].split(".", 1)[0].removeprefix("Value error, ") in Config.model_fields:
        key = first["msg"].removeprefix("Value error, ").split(" ", 1)[0]  # the validator names the key itself
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    shown = f" (got {first['input']!r})" if first["type"] != "extra_forbidden" and not isinstance(first.get("input"), dict) else ""
    more = f" (+{len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    return f"config error: {key}: {msg}{shown}{more}"


def apply_override(tree: dict[str, Any], assignment: str) -> None:
    """Apply `a.b.c=value` to a nested dict; the value is parsed as YAML (so 8, 0.7, [1,2], true work)."""
    if "=" not in assignment:
        raise ConfigError(f"config error: override {assignment!r} is not of the form key.path=value")
    dotted, raw = assignment.split("=", 1)
    parts = dotted.strip().split(".")
    if not all(parts):
        raise ConfigError(f"config error: override key {dotted!r} is empty or malformed")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"config error: {dotted}: value {raw!r} is not valid YAML ({exc.__class__.__name__})") from None
    node = tree
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"config error: {'.'.join(parts[: i + 1])}: is a value, not a section")
        node = child
    node[parts[-1]] = value


def config_from_dict(tree: dict[str, Any], overrides: list[str] | tuple[str, ...] = ()) -> Config:
    tree = copy.deepcopy(tree)
    for assignment in overrides:
        apply_override(tree, assignment)
    try:
        return Config.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err)) from None


def load_config(path: str | os.PathLike | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a YAML config (None: all defaults) and apply `key.path=value` overrides."""
    tree: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config error: config file {str(p)!r} does not exist")
        try:
            tree = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config error: {p}: not valid YAML: {str(exc).splitlines()[0]}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"config error: {p}: top level must be a mapping of sections")
    return config_from_dict(tree, overrides)


def config_to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def markdown_reference() -> str:
    """Every config key with its type, default and description, as a Markdown table."""
    lines = ["| key | default | identity | description |", "|---|---|---|---|"]
    for section_name, section_field in Config.model_fields.items():
        section_cls = section_field.annotation
        for name, field in section_cls.model_fields.items():
            default = field.default_factory() if field.default_factory else field.default
            lines.append(f"| `{section_name}.{name}` | `{default!r}` | {identity_of(field)} | {field.description} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown_reference())
