"""DeepSpeed checkpoints through Ray Train: every rank saves its own files (ZeRO shards
included) and reports them; Ray Train merges the ranks' files into one checkpoint folder in
storage under train/<name>/checkpoints/, and hands the latest one back after a restart."""

from __future__ import annotations

import shutil
import tempfile

CHECKPOINT_TAG = "step{:07d}"  # the folder name of the checkpoint taken after that many steps


def save_and_report(engine, step: int, metrics: dict, fingerprint: str) -> None:
    """Save this rank's part of the checkpoint after `step` steps and report it. Every rank
    calls this at the same steps (Ray Train's report is a barrier)."""
    import ray.train

    tag = CHECKPOINT_TAG.format(step)
    scratch = tempfile.mkdtemp(prefix="pgraft-ckpt-")
    try:
        engine.save_checkpoint(scratch, tag=tag, client_state={"step": step, "fingerprint": fingerprint})
        ray.train.report({**metrics, "step": step}, checkpoint=ray.train.Checkpoint.from_directory(scratch),
                         checkpoint_dir_name=tag)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def resume(engine, fingerprint: str, steps: int, where: str) -> int:
    """Load the latest reported checkpoint on every rank; the step to continue from (0: none).
    A checkpoint of other data or settings, or one past `steps`, is refused, not continued."""
    import ray.train

    from stages.train.errors import TrainError

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return 0
    with checkpoint.as_directory() as folder:
        _, client = engine.load_checkpoint(folder)
    step = int(client["step"])
    if client.get("fingerprint") != fingerprint:
        raise TrainError(f"{where} holds checkpoints of a run with another selection or other train settings; "
                         "use another train.name, or delete that folder to train again")
    if step > steps:
        raise TrainError(f"{where} holds a checkpoint at step {step}, past train.steps={steps}; "
                         "use another train.name, or delete that folder to train again")
    return step
