"""Train stage: fine-tune the T→t segment on accepted X_t with DeepSpeed on a group of Ray actors
(P-GRAFT; t = 0 is GRAFT).

    pgraft train --config C --set train.selection=thr07 --set train.t_step=15
    pgraft train --config C --set train.num_workers=2          # two ranks (Ray actors)

One job per module: `data` (accepted latents, seeded batches), `denoiser` (conditioning via
the model adapter, noise path), `loop` (the DeepSpeed step loop each rank runs; checkpoints
are saved, registered and resumed by cluster/train_group.py), `export` (model/ and its card)
and `launch` (the driver side: checks, then `fit`). Output:
train/<name>/{checkpoints/, model/, summary.json}; model/ is what the composite sampler loads.
"""

from cluster.train_group import global_batch, step_generator
from pgraft.contract import TrainSummary
from stages.train.data import load_accepted
from stages.train.errors import TrainError
from pgraft.stagespec import StageSpec, stage_main
from stages.train.launch import run_train

STAGE = StageSpec(
    name="train", run=run_train, description="fine-tune the T→t segment on accepted X_t with DeepSpeed on Ray actors",
    reads=("task", "selection"), writes=("training",),
)


def main(argv: list[str] | None = None) -> int:
    return stage_main(STAGE, argv)


__all__ = ["STAGE", "TrainError", "TrainSummary", "global_batch", "load_accepted", "main", "run_train", "step_generator"]
