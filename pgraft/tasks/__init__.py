"""Task registry (docs/DESIGN.md §8): what a task brings, declared once, looked up by name.

A task is a `TaskSpec` (the `TrainSpec` habit of torchtitan): its real data, its pretraining,
its default base model, reward, hash and prompts, its feature extractor, and how a sample is
decoded and shown. Config, stages and pipelines ask the spec; none of them branches on a
task's name. Built-in tasks register below; a user's task is a plug-in named `module:attr`
(an attribute holding a TaskSpec, or a function returning one), as rewards are.

Specs are import-light: their heavy parts are `lazy("module:function")` references imported
on first call, so reading a config (the filter process) never imports torch.
"""

from __future__ import annotations

import importlib
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Callable, Mapping

from pgraft.errors import ConfigError


class lazy:
    """A callable that imports `module:function` on its first call (and pickles as the reference,
    so a Ray task running it imports the function on its own node)."""

    def __init__(self, ref: str):
        self.ref = ref
        self._fn: Callable | None = None

    def __call__(self, *args, **kwargs):
        if self._fn is None:
            module, _, attr = self.ref.partition(":")
            self._fn = getattr(importlib.import_module(module), attr)
        return self._fn(*args, **kwargs)

    def __reduce__(self):
        return (lazy, (self.ref,))

    def __repr__(self) -> str:
        return f"lazy({self.ref!r})"


@dataclass(frozen=True)
class RewardWeights:
    """Where a task's reward finds its weights by default: a folder under `task.dir` and a file
    whose presence means the folder is complete."""

    folder: str
    marker: str


@dataclass(frozen=True)
class TaskSpec:
    name: str  # what `task.name` says; also the default run and model folders (runs/<name>, models/<name>)
    # pretrain(location, seed, threads) -> summary dict: trains and publishes the task's models to
    # `location` (a folder or storage URI), `summary.json` last. The round pipeline runs it as a placed Ray task.
    pretrain: Callable[..., dict]
    # Command-line options of `pgraft pretrain <name>`: flag -> (type, default, help); each reaches
    # `pretrain` as a keyword argument named after the flag (dashes as underscores).
    pretrain_options: Mapping[str, tuple[type, Any, str]]
    base_model: str  # the folder under task.dir that model.path defaults to
    reward: str  # reward.name's default
    rewards: Mapping[str, Callable]  # rewards the task brings: name -> factory(model_path, device, **options)
    reward_weights: Mapping[str, RewardWeights]  # reward name -> its default weights under task.dir
    hash: str  # reward.hash's default (a registered sample_hash, one of `hashes`, or module:function)
    prompts: tuple[str, ...]  # generate.prompts' default
    # real_data(split, seed, task_dir) -> (x (N, ...) as the model sees it, prompts): what `pgraft invert` inverts
    # (None: the task has no real data in model space). task_dir: where a task that builds its data keeps it.
    real_data: Callable[[str, int], tuple[Any, list[str]]] | None
    # real_samples(split, seed, task_dir) -> decoded samples (N, ...): the reference set of Fréchet distance (None: none,
    # so the evaluation reports no Fréchet distance).
    real_samples: Callable[[str, int], Any] | None
    # features(weights_folder) -> fn(decoded samples) -> (N, D) float64 features, for Fréchet distance and
    # diversity; `feature_weights` names its folder under task.dir (None: features need no weights).
    features: Callable[[str | None], Callable[[Any], Any]]
    feature_weights: str | None
    # latents x_0 (N, ...) in model space -> decoded samples (what rewards see), for class-conditional models;
    # None where the pipeline decodes (Stable Diffusion's VAE).
    decode: Callable[[Any], Any] | None
    show: Callable[[Any], Any] = field(default=lambda sample: sample)  # decoded sample -> uint8 image for reports
    splits: tuple[str, ...] = ("train", "test", "all")  # the splits real_data / real_samples know
    sample_kind: str = "image"  # what `decode` returns, as pgraft.samples names it (how shards store it)
    model_kind: str = "class_unet"  # model.kind's default: the adapter of the task's base models
    reference_split: str = "all"  # the real_samples split the evaluation's Fréchet distance compares with
    feature_space: str = "classifier"  # what `features` are, as evaluation summaries name them
    # metrics(decoded samples, seed) -> {name: float}: the task's own evaluation figures (e.g. validity,
    # novelty); None: the generic ones only (reward, Fréchet distance, diversity).
    metrics: Callable[[Any, int], dict] | None = None
    hashes: Mapping[str, Callable] = field(default_factory=dict)  # sample_hash functions the task brings, by name
    description: str = ""
    # The base models `pretrain` can make, each a folder under task.dir. When set, `pretrain` takes
    # `bases="a,b"` and makes only those, and the round pipeline asks for the one the run samples
    # from (model.path); empty: `pretrain` makes everything it makes.
    bases: tuple[str, ...] = ()


# The parts a task must declare (those without a default); those in MAY_BE_NONE may be None.
REQUIRED_PARTS = tuple(f.name for f in fields(TaskSpec) if f.default is MISSING and f.default_factory is MISSING)
MAY_BE_NONE = {"feature_weights", "metrics", "real_data", "real_samples", "decode"}

TASKS: dict[str, TaskSpec] = {}


def register_task(spec: TaskSpec) -> TaskSpec:
    """Add a task to the registry (a second spec under one name is refused: names are identities)."""
    check_spec(spec, spec.name if isinstance(spec, TaskSpec) else repr(spec))
    if spec.name in TASKS and TASKS[spec.name] is not spec:
        raise ConfigError(f"config error: task.name: a task named {spec.name!r} is already registered")
    TASKS[spec.name] = spec
    return spec


def check_spec(spec: Any, where: str) -> TaskSpec:
    """`spec` itself when it is a complete TaskSpec; otherwise one line naming the missing part."""
    missing = [part for part in REQUIRED_PARTS
               if not hasattr(spec, part) or getattr(spec, part) is None and part not in MAY_BE_NONE]
    if missing or not isinstance(spec, TaskSpec):
        what = f"misses {', '.join(missing)}" if missing else f"is a {type(spec).__name__}, not a TaskSpec"
        raise ConfigError(f"config error: task.name: task {where} {what} (see pgraft.tasks.TaskSpec)")
    from pgraft.samples import SAMPLE_KINDS

    if spec.sample_kind not in SAMPLE_KINDS:
        raise ConfigError(f"config error: task.name: task {where} makes {spec.sample_kind!r} samples; known sample "
                          f"kinds: {sorted(SAMPLE_KINDS)} (pgraft/samples.py)")
    return spec


def known_tasks() -> list[str]:
    return sorted(TASKS)


def get_task(name: str) -> TaskSpec:
    """The registered task `name`, or a plug-in `module:attr` (a TaskSpec, or a function returning one)."""
    if name in TASKS:
        return TASKS[name]
    if ":" in name:
        from pgraft.plugins import load_plugin

        found = load_plugin(name, "task.name")
        spec = found() if callable(found) and not isinstance(found, TaskSpec) else found
        return check_spec(spec, repr(name))
    raise ConfigError(f"config error: task.name: unknown task {name!r}; known tasks: {known_tasks()}, "
                      "or a plug-in module:attr")


from pgraft.tasks.builtin import DEFAULT_TASK  # noqa: E402  (registers the built-in tasks)

__all__ = ["DEFAULT_TASK", "RewardWeights", "TASKS", "TaskSpec", "get_task", "known_tasks", "lazy", "register_task"]
