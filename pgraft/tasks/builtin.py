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
        "--width": (int, 32, "channels of the UNet's first block (the second has twice as many)"),
        "--layers-per-block": (int, 2, "ResNet layers in each of the UNet's blocks"),
        "--bases": (str, "ddpm,flow", "the base models to train, comma-separated (a run's pretraining asks for "
                    "the one it samples from)"),
    },
    base_model="ddpm",
    bases=("ddpm", "flow"),
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

MOLECULES = register_task(TaskSpec(
    name="molecules",
    description="small molecules as SELFIES token vectors (RDKit's bundled NCI SMILES); docs/DESIGN.md §8",
    pretrain=lazy("pgraft.tasks.molecules:pretrain_and_publish"),
    pretrain_options={
        "--steps": (int, 3000, "optimizer steps of the DDPM base"),
        "--width": (int, 64, "width of the transformer denoiser"),
        "--layers": (int, 3, "transformer layers of the denoiser"),
        "--prediction": (str, "sample", "what the denoiser predicts: sample (x_0), epsilon or v_prediction"),
        "--eval-samples": (int, 256, "base samples for the summary's validity / uniqueness / QED (0 skips it)"),
    },
    base_model="ddpm",
    model_kind="class_sequence",
    sample_kind="smiles",
    reward="qed",
    rewards={"qed": lazy("pgraft.tasks.molecules:qed_reward"),
             "molecule_properties": lazy("pgraft.tasks.molecules:molecule_properties_reward")},
    reward_weights={},
    hash="canonical_smiles",
    hashes={"canonical_smiles": lazy("pgraft.tasks.molecules:canonical_smiles_hash")},
    prompts=("a molecule",),
    real_data=lazy("pgraft.tasks.molecules:real_data"),
    real_samples=lazy("pgraft.tasks.molecules:real_samples"),
    reference_split="test",
    feature_space="chemnet",
    features=lazy("pgraft.tasks.molecules:feature_extractor"),
    feature_weights=None,
    decode=lazy("pgraft.tasks.molecules:decode"),
    show=lazy("pgraft.tasks.molecules:show"),
    metrics=lazy("pgraft.tasks.molecules:sample_metrics"),
))

T2I = register_task(TaskSpec(
    name="t2i",
    description="text-to-image with Stable Diffusion 2.x and VQAScore (models from their makers); docs/T2I.md",
    pretrain=lazy("pgraft.tasks.t2i:pretrain"),
    pretrain_options={},
    base_model="sd2",
    model_kind="stable_diffusion",
    reward="vqascore",
    rewards={},  # vqascore is a built-in reward (pgraft/rewards.py)
    reward_weights={"vqascore": RewardWeights("vqa", "config.json")},
    hash="perceptual",
    prompts=(),  # generate.prompts names a prompts file (configs/prompts/)
    real_data=None,  # no real images: nothing to invert, no Fréchet reference
    real_samples=None,
    feature_space="pixels (64×64)",
    features=lazy("pgraft.tasks.t2i:feature_extractor"),
    feature_weights=None,
    decode=None,  # the pipeline's VAE decodes
))

LAYOUT = register_task(TaskSpec(
    name="page_layout",
    description="page layouts from their element classes (C → S + P), on real typeset pages; docs/DESIGN.md §6d",
    pretrain=lazy("pgraft.tasks.layout.task:pretrain_and_publish"),
    pretrain_options={
        "--source": (str, "/usr/share/doc/texlive-doc/latex", "a folder of PDFs or a COCO .json file (Debian: "
                     "apt-get install texlive-latex-base-doc)"),
        "--pages-per-file": (int, 12, "pages read from each PDF, spread over it (the corpus stays varied and quick)"),
        "--steps": (int, 3000, "optimizer steps of the DDPM base"),
        "--width": (int, 64, "width of the transformer denoiser"),
        "--layers": (int, 3, "transformer layers of the denoiser"),
        "--encoder-steps": (int, 1500, "optimizer steps of the layout encoder (the Fréchet distance's features)"),
    },
    base_model="ddpm",
    model_kind="layout_sequence",
    sample_kind="layout",
    reward="layout_quality",
    rewards={"layout_quality": lazy("pgraft.tasks.layout.task:quality_reward"),
             "layout_overlap": lazy("pgraft.tasks.layout.task:overlap_reward"),
             "layout_alignment": lazy("pgraft.tasks.layout.task:alignment_reward")},
    reward_weights={},
    hash="layout",
    hashes={"layout": lazy("pgraft.tasks.layout.task:layout_hash")},
    # Class sequences common on the texlive manuals' pages (`pgraft pretrain layout` lists the corpus's own).
    prompts=("text text text", "text text text text text", "text text text text text text",
             "title text text text text text text text text", "title table text", "figure text text",
             "text title text title", "title title title text"),
    real_data=lazy("pgraft.tasks.layout.task:real_data"),
    real_samples=lazy("pgraft.tasks.layout.task:real_samples"),
    reference_split="test",
    feature_space="layout encoder",
    features=lazy("pgraft.tasks.layout.task:feature_extractor"),
    feature_weights="encoder",
    decode=lazy("pgraft.tasks.layout.task:decode"),
    show=lazy("pgraft.tasks.layout.task:show"),
    metrics=lazy("pgraft.tasks.layout.task:sample_metrics"),
))

# The task the embedded default config runs.
DEFAULT_TASK = DIGITS.name
