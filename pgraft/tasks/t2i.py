"""The `t2i` task (docs/DESIGN.md §6c, docs/T2I.md): text-to-image with Stable Diffusion 2.x, rewarded by VQAScore.

Nothing is trained here: the base (an SD 2.x diffusers folder, ε or v prediction as its scheduler
says) and the reward's image-text-to-text model come from their makers, from a folder or storage
(`task.dir/sd2`, `task.dir/vqa`, or `model.path` / `reward.model_path`). Prompts come from a file,
one a line (`generate.prompts`; configs/prompts/ ships one). There is no real image set to compare
with, so the evaluation reports the reward and the within-prompt diversity of downscaled pixels,
no Fréchet distance.
"""

from __future__ import annotations

import numpy as np

from pgraft.errors import PgraftError

FEATURE_PX = 64  # the side images are shrunk to for the diversity features


class T2IError(PgraftError):
    """The t2i task cannot do what was asked; the message says what to do instead."""


def pretrain(location: str, seed: int = 0, threads: int | None = None, **options) -> dict:
    """The t2i task brings no pretraining: its models are published by their makers."""
    raise T2IError(f"task t2i does not pretrain: put an SD 2.x diffusers folder at {location}/sd2 and an "
                   f"image-text-to-text model at {location}/vqa (or set model.path and reward.model_path), "
                   "and set task.pretrain=false; docs/T2I.md walks through it")


def feature_extractor(weights: str | None):
    """Features for diversity: each image shrunk to FEATURE_PX² RGB, scaled to [0, 1]."""

    def extract(images) -> np.ndarray:
        from PIL import Image

        rows = [np.asarray(Image.fromarray(np.asarray(image)).convert("RGB").resize((FEATURE_PX, FEATURE_PX),
                                                                                   Image.BILINEAR), np.float64)
                for image in images]
        return np.stack(rows).reshape(len(rows), -1) / 255.0

    return extract
