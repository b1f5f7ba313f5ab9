"""The data contract between stages: names, layout, seeds and record schemas (docs/DESIGN.md §2).

Every stage imports its paths and formats from here and nowhere else, so that a stage can
be rerun alone against what an earlier stage left in storage.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field

import numpy as np

from pgraft.errors import PgraftError

CONFIG_KEY = "config.yaml"
SCHEMA_VERSION = 2  # 2: samples record their noise corrector

# Latent tensor names inside `<key>.latents.safetensors`.
INITIAL_NOISE = "x_T"
FINAL_LATENT = "x_0"

_KEY_RE = re.compile(r"^p(\d{6})_s(\d{5})$")
_SHARD_RE = re.compile(r"shard-(\d{6})\.(tar|json)$")


def latent_name(step: int) -> str:
    """Name of the latent after `step` sampler steps (1 ≤ step < num_inference_steps)."""
    return f"x_{step}"


def latent_order(name: str) -> tuple[int, int]:
    """Sort key for latent names in sampling order: x_T, x_1, x_2, …, x_0."""
    if name == INITIAL_NOISE:
        return (0, 0)
    if name == FINAL_LATENT:
        return (2, 0)
    return (1, int(name.split("_", 1)[1]))


def captured_step(name: str) -> int:
    """Step index k of a latent named x_k."""
    if name in (INITIAL_NOISE, FINAL_LATENT) or not re.fullmatch(r"x_\d+", name):
        raise ValueError(f"{name!r} is not a captured step latent")
    return int(name[2:])


def sample_key(prompt_id: int, sample_idx: int) -> str:
    if not (0 <= prompt_id < 10**6 and 0 <= sample_idx < 10**5):
        raise ValueError(f"prompt_id {prompt_id} or sample_idx {sample_idx} out of the key format's range")
    return f"p{prompt_id:06d}_s{sample_idx:05d}"


def parse_sample_key(key: str) -> tuple[int, int]:
    m = _KEY_RE.match(key)
    if not m:
        raise ValueError(f"{key!r} is not a sample key of the form p000000_s00000")
    return int(m.group(1)), int(m.group(2))


def sample_seed(run_seed: int, round_idx: int, prompt_id: int, sample_idx: int) -> int:
    """Deterministic 63-bit seed per sample, independent of batching, workers and sharding."""
    state = np.random.SeedSequence([run_seed, round_idx, prompt_id, sample_idx]).generate_state(2, np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & ((1 << 63) - 1)


# Layout -----------------------------------------------------------------------------------

def round_prefix(round_idx: int) -> str:
    return f"round-{round_idx:03d}"


def generate_prefix(round_idx: int) -> str:
    return f"{round_prefix(round_idx)}/generate"


def shard_name(shard_id: int) -> str:
    return f"shard-{shard_id:06d}"


def shard_key_at(prefix: str, shard_id: int) -> str:
    """A shard's tar under `prefix` (a round's generate/ folder, an inversion's shards/)."""
    return f"{prefix}/{shard_name(shard_id)}.tar"


def commit_key_at(prefix: str, shard_id: int) -> str:
    """The commit record of shard `shard_id` under `prefix`."""
    return f"{prefix}/{shard_name(shard_id)}.json"


def shard_key(round_idx: int, shard_id: int) -> str:
    return shard_key_at(generate_prefix(round_idx), shard_id)


def commit_key(round_idx: int, shard_id: int) -> str:
    return commit_key_at(generate_prefix(round_idx), shard_id)


def shard_id_of(key: str) -> int | None:
    m = _SHARD_RE.search(key)
    return int(m.group(1)) if m else None


def lease_key(round_idx: int, stage: str) -> str:
    """The lease a stage's driver holds while it writes that round's output (pgraft.lease)."""
    return f"leases/{round_prefix(round_idx)}/{stage}.json"


TORN_DIR = "torn"  # at the run's root: objects that failed their commit check, moved aside by the rerun


def torn_key(key: str, stamp: str) -> str:
    """Where a torn object goes: `torn/<its key>.<stamp>`, outside every folder a stage reads
    (no shard or part pattern matches it), kept for a post-mortem rather than deleted."""
    return f"{TORN_DIR}/{key}.{stamp}"


def generate_plan_key(round_idx: int) -> str:
    """What a round's generate stage set out to write ({"units", "samples"}), written before any
    shard, so that `pgraft status` can tell a half-generated round from a finished one."""
    return f"{generate_prefix(round_idx)}/plan.json"


def rewards_prefix(round_idx: int, reward_name: str) -> str:
    return f"{round_prefix(round_idx)}/rewards/{reward_name}"


def filter_prefix(round_idx: int, selection: str) -> str:
    return f"{round_prefix(round_idx)}/filter/{selection}"


def train_prefix(round_idx: int, name: str) -> str:
    return f"{round_prefix(round_idx)}/train/{name}"


def model_prefix(round_idx: int, name: str) -> str:
    """The exported model of a training run: what the next round's sampler loads."""
    return f"{train_prefix(round_idx, name)}/model"


def train_summary_key(round_idx: int, name: str) -> str:
    return f"{train_prefix(round_idx, name)}/summary.json"


# A trainer's checkpoints under train/<name>/ (or corrector/<name>/): one folder per checkpoint and
# the record naming the fully written ones (cluster/train_group.py registers them).
CHECKPOINTS_DIR = "checkpoints"
CHECKPOINT_RECORD = "registered.json"
CHECKPOINT_TAG = "step{:07d}"  # the folder name of the checkpoint taken after that many steps
_CHECKPOINT_RE = re.compile(r"/checkpoints/step(\d+)/")


def checkpoint_step(key: str) -> int | None:
    """The step of the checkpoint a key lies in (…/checkpoints/stepNNNNNNN/…), else None."""
    m = _CHECKPOINT_RE.search(key)
    return int(m.group(1)) if m else None


def eval_prefix(round_idx: int, variant: str) -> str:
    """One evaluation variant (base, finetuned) of a round, laid out as a one-round run of its
    own: config.yaml, round-000/generate/ shards, round-000/rewards/<table>/ parts, summary.json."""
    return f"{round_prefix(round_idx)}/eval/{variant}"


def pipeline_record_key(round_idx: int) -> str:
    """What the round pipeline did in a round: stage wall times, the Ray nodes each stage ran on."""
    return f"{round_prefix(round_idx)}/pipeline.json"


def eval_summary_key(round_idx: int) -> str:
    return f"{round_prefix(round_idx)}/eval/summary.json"


# Records ----------------------------------------------------------------------------------

class ContractError(PgraftError, ValueError):
    """A record in storage does not follow the data contract; the message says what to do."""


def record_from_json(cls, data: bytes, where: str, what: str, remedy: str):
    """A record dataclass from its JSON, or one ContractError line naming the object and the fix."""
    try:
        return cls(**json.loads(data))
    except (ValueError, TypeError) as exc:
        raise ContractError(f"{where} is not a {what} ({exc}); {remedy}") from None


@dataclass
class CommitRecord:
    """Written after a shard's tar is complete and uploaded; only then does the shard count."""

    shard: str  # e.g. "shard-000017.tar"
    count: int  # samples in the shard
    bytes: int  # size of the tar
    sha256: str  # of the tar bytes, checked by readers to catch torn or replaced shards
    keys: list[str]  # sample keys in tar order
    round: int = 0
    schema_version: int = SCHEMA_VERSION

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True, indent=1).encode()

    @classmethod
    def from_json(cls, data: bytes, where: str = "commit record") -> "CommitRecord":
        return record_from_json(cls, data, where, "valid commit record", "delete it to regenerate that shard")


@dataclass
class SampleMeta:
    """The `.json` member of every sample."""

    key: str
    prompt: str
    prompt_id: int
    sample_idx: int
    seed: int
    round: int
    model: str  # model reference (path or URI) the sample came from
    model_kind: str
    scheduler: str  # scheduler class name
    num_inference_steps: int
    guidance_scale: float
    captured_steps: dict[str, int] = field(default_factory=dict)  # latent name -> scheduler timestep
    timesteps: list[float] = field(default_factory=list)  # every timestep the sampler visited, in order
    finetuned: str | None = None  # the train stage model/ folder of the composite sampler, if any
    noise_corrector: str | None = None  # the corrector that made x_T from ε ~ N(0, I), if any
    schema_version: int = SCHEMA_VERSION

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> "SampleMeta":
        return cls(**json.loads(data))


def reward_part_key(round_idx: int, table: str, shard_id: int) -> str:
    return f"{rewards_prefix(round_idx, table)}/part-{shard_id:06d}.parquet"


def part_record_key(part_key: str) -> str:
    """A reward part's commit record (`_part-NNNNNN.json` beside its `.parquet`): written after
    the part, so a part counts as scored only once its bytes are recorded. The leading `_`
    keeps it out of what Parquet readers gather from the folder (pyarrow, Spark and others
    skip `_` and `.` names)."""
    folder, _, name = part_key.rpartition("/")
    record = "_" + name[: -len(".parquet")] + ".json"
    return f"{folder}/{record}" if folder else record


@dataclass
class PartRecord:
    """The commit record of one reward part."""

    part: str  # e.g. "part-000017.parquet"
    rows: int
    bytes: int
    sha256: str  # of the part's bytes: a rerun redoes a part that no longer matches

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True, indent=1).encode()

    @classmethod
    def from_json(cls, data: bytes, where: str = "part record") -> "PartRecord":
        return record_from_json(cls, data, where, "valid part record", "delete it to score that shard again")


def accepted_key(round_idx: int, selection: str) -> str:
    """The single accepted file of selections made before accepted parts (still read)."""
    return f"{filter_prefix(round_idx, selection)}/accepted.parquet"


def accepted_prefix(round_idx: int, selection: str) -> str:
    """Folder of a selection's accepted parts (`part-<token>-NNNNNN.parquet`, listed in its summary)."""
    return f"{filter_prefix(round_idx, selection)}/accepted"


def accepted_part_key(round_idx: int, selection: str, token: str, index: int) -> str:
    """`token` names one make of the selection (its parts are listed in its summary)."""
    return f"{accepted_prefix(round_idx, selection)}/part-{token}-{index:06d}.parquet"


def selection_summary_key(round_idx: int, selection: str) -> str:
    return f"{filter_prefix(round_idx, selection)}/summary.json"


_PART_RE = re.compile(r"part-(\d{6})\.parquet$")


def part_shard_id(key: str) -> int | None:
    m = _PART_RE.search(key)
    return int(m.group(1)) if m else None


def committed_parts(keys) -> dict[int, str]:
    """Among `keys`: the reward parts whose commit record is there too, by shard id."""
    keys = set(keys)
    parts = {}
    for key in sorted(keys):
        shard_id = part_shard_id(key)
        if shard_id is not None and part_record_key(key) in keys:
            parts[shard_id] = key
    return parts


# Parquet schemas (pyarrow types by name, so this module stays import-light).
# Reward table: one row per sample; reward-specific columns may follow these.
REWARD_COLUMNS: dict[str, str] = {
    "key": "string", "shard": "string", "round": "int32", "prompt_id": "int64", "prompt": "string",
    "sample_idx": "int64", "seed": "int64", "reward": "float64", "reward_name": "string", "sample_hash": "string",
}
# Accepted table of a selection.
ACCEPTED_COLUMNS: dict[str, str] = {
    "key": "string", "shard": "string", "prompt_id": "int64", "sample_idx": "int64", "reward": "float64",
    "reshaped_reward": "float64", "rank_in_prompt": "int64",
}


# Train outputs -----------------------------------------------------------------------------

COMPOSITE_CARD = "composite.json"  # in train/<name>/model/: how to sample with the fine-tuned model


def composite_card(base_model: str, kind: str, finetuned: str, switch_step: int, t_level: float | None,
                   num_inference_steps: int, guidance_scale: float, timesteps_trained: list[float]) -> dict:
    """The composite sampler's card: fine-tuned denoiser for steps 0..switch_step-1, base after."""
    return {
        "base_model": base_model, "kind": kind, "finetuned": finetuned, "switch_step": switch_step,
        "t_level": t_level, "num_inference_steps": num_inference_steps, "guidance_scale": guidance_scale,
        "timesteps_trained": timesteps_trained,
        "usage": "run the fine-tuned denoiser for sampler steps 0..switch_step-1, the base for the rest",
    }


@dataclass
class TrainSummary:
    """train/<name>/summary.json, written by rank 0 once the model is exported."""

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
    nodes: list[str] = field(default_factory=list)  # Ray node id of every rank
    fingerprint: str = ""  # of the accepted table and every setting that changes the weights

    def headline(self) -> str:
        return (f"train round {self.round}: {self.name}, {self.steps} steps on {self.samples} latents from x_{self.t_step}, "
                f"final loss {self.final_loss:.4f}, {self.seconds:.1f} s on {self.processes} worker(s)")

    def render(self) -> str:
        level = "x_0 (GRAFT)" if self.t_level is None else f"x_{self.t_step} (t={self.t_level:g}, P-GRAFT)"
        return "\n".join([
            f"train: {self.name!r} on selection {self.selection!r}, round {self.round}, from {level}",
            f"  data     {self.samples} accepted latents; s drawn from {len(self.timesteps_trained)} sampler timesteps "
            f"{self.timesteps_trained[0]:g}…{self.timesteps_trained[-1]:g}",
            f"  steps    {self.steps} ({self.mode}, batch {self.batch_size}, {self.processes} train rank(s)"
            + (f", resumed at step {self.resumed_from}" if self.resumed_from else "") + ")",
            f"  loss     {self.final_loss:.4f} (mean of the last steps); {self.samples_per_second:.1f} samples/s, "
            f"{self.data_wait_fraction:.1%} of step time waiting for data",
            f"  model    {self.model_dir}/ (composite: fine-tuned for steps 0..{self.t_step - 1}, base after)",
        ])

    @classmethod
    def from_json(cls, data: bytes, where: str) -> "TrainSummary":
        return record_from_json(cls, data, where, "train summary", "delete it to train again")


@dataclass
class EvalSummary:
    """round-NNN/eval/summary.json: one entry per variant (keys: docs/FORMAT.md, Evaluation)."""

    round: int
    reward: str
    samples_per_prompt: int
    seed: int
    variants: dict[str, dict] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def nodes(self) -> list[str]:
        """Ray nodes that sampled, scored or summarised any variant."""
        return sorted({node for v in self.variants.values() for node in v.get("nodes", [v["node_id"]])})

    def headline(self) -> str:
        parts = [f"{name} {v['reward_mean']:.4f} ± {v['reward_stderr']:.4f}" for name, v in self.variants.items()]
        return f"evaluate round {self.round}: mean reward " + ", ".join(parts) + f" ({self.seconds:.1f} s)"

    def render(self) -> str:
        lines = [f"evaluate: round {self.round}, {self.samples_per_prompt} fresh samples per prompt, reward {self.reward}"]
        for name, v in self.variants.items():
            fd = "n/a" if v["frechet_distance"] is None else f"{v['frechet_distance']:.3f}"
            lines.append(f"  {name:<10} mean {v['reward_mean']:.4f} ± {v['reward_stderr']:.4f} (s.e.), "
                         f"Fréchet distance {fd}, within-prompt diversity {v['diversity']:.3f}")
            if v.get("task_metrics"):
                lines.append("             " + ", ".join(f"{k} {x:.3f}" if isinstance(x, float) else f"{k} {x}"
                                                       for k, x in v["task_metrics"].items()))
        return "\n".join(lines)


# Inverse Noise Correction (docs/DESIGN.md §5) -----------------------------------------------
# An inversion of a data set: inversion/<name>/{settings.json, shards/, table/, summary.json}.
# Each shard record holds `x_0` (the data point, as the model sees it) and `x_T` (its inverse
# noise Φ⁻¹(x_0)) in `<key>.latents.safetensors`, the decoded sample (`.png` for an image) and an InversionMeta as
# `.json`; `table/part-NNNNNN.parquet` holds one row per record (INVERSION_COLUMNS).

def inversion_prefix(name: str) -> str:
    return f"inversion/{name}"


def inversion_shards_prefix(name: str) -> str:
    return f"{inversion_prefix(name)}/shards"


def inversion_part_key(name: str, shard_id: int) -> str:
    return f"{inversion_prefix(name)}/table/part-{shard_id:06d}.parquet"


def inversion_settings_key(name: str) -> str:
    return f"{inversion_prefix(name)}/settings.json"


def inversion_summary_key(name: str) -> str:
    return f"{inversion_prefix(name)}/summary.json"


def inversion_key(unit: int, position: int) -> str:
    """Record key of the data point at `position` in work unit `unit` of an inversion."""
    if not (0 <= unit < 10**6 and 0 <= position < 10**6):
        raise ValueError(f"unit {unit} or position {position} out of the key format's range")
    return f"u{unit:06d}_{position:06d}"


INVERSION_COLUMNS: dict[str, str] = {
    "key": "string", "shard": "string", "index": "int64", "prompt": "string", "reconstruction_error": "float64",
    "iterations": "int64", "max_step_iterations": "int64", "converged": "bool_", "residual": "float64",
    "noise_rms": "float64",
}


@dataclass
class InversionMeta:
    """The `.json` member of every inversion record."""

    key: str
    index: int  # position in its source (the task split, or the input shard)
    source: str  # where the data point came from (e.g. task:digits/train, or the input shard's location)
    prompt: str  # the condition the velocity was evaluated with ("" = the null condition)
    model: str  # the base model's location
    num_inference_steps: int
    guidance_scale: float  # 1.0 means the velocity of the condition alone (no guidance)
    iterations: int
    max_step_iterations: int
    converged: bool
    residual: float  # the largest final fixed-point update over the steps (RMS)
    reconstruction_error: float  # ‖Φ(Φ⁻¹(x)) − x‖ (RMS)
    schema_version: int = SCHEMA_VERSION

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> "InversionMeta":
        return record_from_json(cls, data, "an inversion record's .json", "inversion record",
                                "delete its shard's commit record and rerun `pgraft invert`")


@dataclass
class InversionSummary:
    """inversion/<name>/summary.json, rewritten by every run of the invert stage."""

    name: str
    source: str
    model: str
    num_inference_steps: int
    conditional: bool
    samples: int
    converged: int
    reconstruction_error_mean: float
    reconstruction_error_max: float
    iterations_mean: float
    noise_rms: float  # root mean square of the inverse noises' elements: 1 for N(0, I)
    shards: int
    skipped: int  # shards committed before this run
    seconds: float
    nodes: list[str] = field(default_factory=list)
    location: str = ""

    def headline(self) -> str:
        return (f"invert {self.name}: {self.samples} samples of {self.source}, {self.converged} converged, "
                f"{self.shards} shards ({self.skipped} already there) in {self.seconds:.1f} s")

    def render(self) -> str:
        lines = [
            f"invert: {self.samples} samples of {self.source} through {self.model} ({self.num_inference_steps} Euler steps, "
            f"{'conditional' if self.conditional else 'null condition'})",
            f"  converged        {self.converged}/{self.samples}"
            + ("" if self.converged == self.samples else " (the rest are left out of a corrector's data unless "
               "corrector.include_unconverged)"),
            f"  reconstruction   ‖Φ(Φ⁻¹(x)) − x‖ mean {self.reconstruction_error_mean:.2e}, max "
            f"{self.reconstruction_error_max:.2e} (RMS per element); {self.iterations_mean:.1f} iterations per sample",
            f"  inverse noise    RMS per element {self.noise_rms:.3f} (1 for N(0, I))",
            f"  shards           {self.shards} ({self.skipped} committed before), {self.seconds:.1f} s",
            f"  at {self.location}",
        ]
        return "\n".join(lines)

    @classmethod
    def from_json(cls, data: bytes, where: str) -> "InversionSummary":
        return record_from_json(cls, data, where, "inversion summary", "rerun `pgraft invert` to rewrite it")


# A noise corrector: corrector/<name>/{checkpoints/ (flow only), model/, summary.json}.
CORRECTOR_CARD = "corrector.json"  # in corrector/<name>/model/: what it corrects and how


def corrector_prefix(name: str) -> str:
    return f"corrector/{name}"


def corrector_model_prefix(name: str) -> str:
    return f"{corrector_prefix(name)}/model"


def corrector_summary_key(name: str) -> str:
    return f"{corrector_prefix(name)}/summary.json"


@dataclass
class CorrectorSummary:
    """corrector/<name>/summary.json, written once the corrector is exported."""

    name: str
    kind: str
    inversion: str
    samples: int  # inverse noises it was fitted to
    left_out: int  # non-converged inversions excluded
    parameters: int
    base_parameters: int
    steps: int  # optimizer steps (0 for a closed-form fit)
    resumed_from: int
    final_loss: float | None
    seconds: float
    model_dir: str
    fingerprint: str
    nodes: list[str] = field(default_factory=list)

    def headline(self) -> str:
        loss = "" if self.final_loss is None else f", final loss {self.final_loss:.4f}"
        return (f"train-corrector {self.name}: {self.kind} fitted to {self.samples} inverse noises of {self.inversion}"
                f"{loss} in {self.seconds:.1f} s")

    def render(self) -> str:
        share = self.parameters / self.base_parameters if self.base_parameters else float("nan")
        lines = [
            f"train-corrector: {self.kind} corrector {self.name!r} fitted to {self.samples} inverse noises of "
            f"{self.inversion}" + (f" ({self.left_out} non-converged left out)" if self.left_out else ""),
            f"  parameters  {self.parameters:,} ({share:.1%} of the base model's {self.base_parameters:,})",
        ]
        if self.steps:
            loss = "n/a (resumed at the last step)" if self.final_loss is None else f"{self.final_loss:.4f}"
            lines.append(f"  training    {self.steps} steps (resumed from {self.resumed_from}), final loss {loss}, "
                         f"{self.seconds:.1f} s")
        lines.append(f"  model at    {self.model_dir}")
        return "\n".join(lines)

    @classmethod
    def from_json(cls, data: bytes, where: str) -> "CorrectorSummary":
        return record_from_json(cls, data, where, "corrector summary", "delete it to fit the corrector again")
