"""Stage registry: stage name -> the module that declares it (`STAGE = pgraft.stagespec.StageSpec`).

Modules are imported on lookup, so `pgraft filter` never imports the stages that load torch.
Stages never import each other (import-linter checks it, see pyproject.toml); what two stages
share lives in `cluster` or the library.
"""

from __future__ import annotations

import importlib

from pgraft.errors import ConfigError

STAGE_MODULES: dict[str, str] = {
    "generate": "stages.generate",
    "reward": "stages.reward",
    "filter": "stages.filter",
    "train": "stages.train",
    "evaluate": "stages.evaluate",
    "invert": "stages.invert",
    "train-corrector": "stages.train_corrector",
}


def known_stages() -> list[str]:
    return list(STAGE_MODULES)


def get_stage(name: str):
    """The StageSpec of stage `name`; an unknown name is one line listing the known ones."""
    if name not in STAGE_MODULES:
        raise ConfigError(f"unknown stage {name!r}; known stages: {', '.join(STAGE_MODULES)}")
    return importlib.import_module(STAGE_MODULES[name]).STAGE
