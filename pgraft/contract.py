"""The data contract between stages: names, layout, seeds and record schemas (docs/DESIGN.md §2).

Every stage imports its paths and formats from here and nowhere else, so that a stage can
be rerun alone against what an earlier stage left in storage.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field

import numpy as np

CONFIG_KEY = "config.yaml"
SCHEMA_VERSION = 1

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


def shard_key(round_idx: int, shard_id: int) -> str:
    return f"{generate_prefix(round_idx)}/{shard_name(shard_id)}.tar"


def commit_key(round_idx: int, shard_id: int) -> str:
    return f"{generate_prefix(round_idx)}/{shard_name(shard_id)}.json"


def shard_id_of(key: str) -> int | None:
    m = _SHARD_RE.search(key)
    return int(m.group(1)) if m else None


def rewards_prefix(round_idx: int, reward_name: str) -> str:
    return f"{round_prefix(round_idx)}/rewards/{reward_name}"


def filter_prefix(round_idx: int, selection: str) -> str:
    return f"{round_prefix(round_idx)}/filter/{selection}"


def train_prefix(round_idx: int, name: str) -> str:
    return f"{round_prefix(round_idx)}/train/{name}"


# Records ----------------------------------------------------------------------------------

class ContractError(ValueError):
    """A record in storage does not follow the data contract; the message says what to do."""


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
        try:
            raw = json.loads(data)
            return cls(**raw)
        except (ValueError, TypeError) as exc:
            raise ContractError(f"{where} is not a valid commit record ({exc}); delete it to regenerate that shard") from None


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
    schema_version: int = SCHEMA_VERSION

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> "SampleMeta":
        return cls(**json.loads(data))


def reward_part_key(round_idx: int, table: str, shard_id: int) -> str:
    return f"{rewards_prefix(round_idx, table)}/part-{shard_id:06d}.parquet"


def accepted_key(round_idx: int, selection: str) -> str:
    return f"{filter_prefix(round_idx, selection)}/accepted.parquet"


def selection_summary_key(round_idx: int, selection: str) -> str:
    return f"{filter_prefix(round_idx, selection)}/summary.json"


_PART_RE = re.compile(r"part-(\d{6})\.parquet$")


def part_shard_id(key: str) -> int | None:
    m = _PART_RE.search(key)
    return int(m.group(1)) if m else None


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
