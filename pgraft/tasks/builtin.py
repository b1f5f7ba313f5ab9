"""The built-in tasks' specs. Everything heavy is a lazy reference into the task's own module."""

from __future__ import annotations

from pgraft.tasks import RewardWeights, TaskSpec, lazy, register_task

DIGITS = register_task(TaskSpec(
    name="digits",
    description="class-conditional 8×8 digits (scikit-learn's bundled set); docs/DESIGN.md §6",
    pretrain=lazy("pgraft.tasks.digits:pretrain_and_publish"),
    pretrain_options={
        "--ddpm-steps": (int, 800, "optimizer steps of the DDPM base"),
        "--flow-steps": (int, 500, "optimizer steps of the rectified-flow base (0: none)"),
        "--classifier-epochs": (int, 30, "epochs of the reward classifier"),
        "--eval-samples-per-digit": (int, 50, "samples per digit for the base's alignment (0 skips it)"),
    },
    base_model="ddpm",
    reward="digits_alignment",
    rewards={"digits_alignment": lazy("pgraft.tasks.digits:alignment_reward")},
    reward_weights={"digits_alignment": RewardWeights("classifier", "model.safetensors")},
    hash="exact",
    prompts=tuple(f"a handwritten digit {d}" for d in range(10)),
    real_data=lazy("pgraft.tasks.digits:real_data"),
    real_samples=lazy("pgraft.tasks.digits:real_samples"),
    features=lazy("pgraft.tasks.digits:feature_extractor"),
    feature_weights="classifier",
    decode=lazy("pgraft.models.class_pipeline:latents_to_uint8"),
))

# The task the embedded default config runs.
DEFAULT_TASK = DIGITS.name
