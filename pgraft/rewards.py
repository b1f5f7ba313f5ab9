"""Reward registry. Every reward has one signature (as in ddpo-pytorch):

    factory(model_path, device, **options) -> reward_fn
    reward_fn(images, prompts, metadata) -> RewardOutput | np.ndarray

`images` are the decoded samples of the task's sample kind (pgraft.samples): uint8 arrays
(H×W or H×W×3) for images, SMILES strings for molecules; `prompts` strings, `metadata` the
samples' JSON dicts. A reward may add columns to the reward table through RewardOutput.
A factory says which sample kind it scores (`takes`): the config refuses a reward whose kind
is not the task's. A factory may carry `check_weights(model_path, options)`, a cheap check of its
weights that the reward stage's driver runs before any actor starts. User plug-ins are factories named `module:function` with the same signature.

Import-light (torch is imported by the factories that need it): the config reads `takes`.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import numpy as np
from PIL import Image

from pgraft.errors import ConfigError
from pgraft.plugins import load_plugin

if TYPE_CHECKING:
    import torch


@dataclass
class RewardOutput:
    rewards: np.ndarray  # float64, one per image
    columns: dict[str, np.ndarray] = field(default_factory=dict)  # extra reward-table columns


RewardFn = Callable[[list, list, list], "RewardOutput | np.ndarray"]


def takes(kind: str):
    """Mark a reward factory as scoring samples of `kind` (pgraft.samples)."""

    def mark(factory):
        factory.takes = kind
        return factory

    return mark


def _jpeg_kb(images) -> np.ndarray:
    sizes = []
    for image in images:
        buf = io.BytesIO()
        Image.fromarray(image).convert("RGB").save(buf, format="JPEG", quality=95)
        sizes.append(buf.tell() / 1000.0)
    return np.array(sizes, dtype=np.float64)


@takes("image")
def jpeg_compressibility(model_path, device) -> RewardFn:
    """Minus the JPEG size in kB (quality 95): smaller files score higher."""

    def reward_fn(images, prompts, metadata):
        kb = _jpeg_kb(images)
        return RewardOutput(-kb, {"jpeg_kb": kb})

    return reward_fn


@takes("image")
def jpeg_incompressibility(model_path, device) -> RewardFn:
    """The JPEG size in kB (quality 95): more detail scores higher."""

    def reward_fn(images, prompts, metadata):
        kb = _jpeg_kb(images)
        return RewardOutput(kb, {"jpeg_kb": kb})

    return reward_fn


def _load_clip(model_path: str | None, device: torch.device):
    from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

    if not model_path:
        raise ConfigError("config error: reward.model_path: CLIP rewards need a CLIP folder or hub id")
    try:
        model = CLIPModel.from_pretrained(model_path).to(device).eval()
        tokenizer = CLIPTokenizer.from_pretrained(model_path)
        processor = CLIPImageProcessor.from_pretrained(model_path)
    except OSError as exc:
        raise ConfigError(f"config error: reward.model_path: cannot load CLIP from {model_path!r} ({exc.__class__.__name__})") from None
    return model, tokenizer, processor


def _rgb(images) -> list[Image.Image]:
    return [Image.fromarray(image).convert("RGB") for image in images]


def _image_embeddings(model, processor, images, device) -> torch.Tensor:
    import torch

    pixels = processor(images=_rgb(images), return_tensors="pt")["pixel_values"].to(device)
    emb = model.get_image_features(pixel_values=pixels)
    emb = emb if isinstance(emb, torch.Tensor) else emb.pooler_output
    return emb / emb.norm(dim=-1, keepdim=True)


@takes("image")
def clip_score(model_path, device) -> RewardFn:
    """100 × cosine similarity of CLIP image and prompt embeddings."""
    import torch

    model, tokenizer, processor = _load_clip(model_path, device)

    @torch.no_grad()
    def reward_fn(images, prompts, metadata):
        image_emb = _image_embeddings(model, processor, images, device)
        tokens = tokenizer(list(prompts), padding=True, truncation=True, return_tensors="pt").to(device)
        text_emb = model.get_text_features(**tokens)
        text_emb = text_emb if isinstance(text_emb, torch.Tensor) else text_emb.pooler_output
        text_emb = text_emb / text_emb.norm(dim=-1, keepdim=True)
        return (100.0 * (image_emb * text_emb).sum(-1)).double().cpu().numpy()

    return reward_fn


@takes("image")
def aesthetic(model_path, device, head_path: str | None = None, activation: str = "none") -> RewardFn:
    """A linear or MLP head on L2-normalised CLIP image embeddings (the LAION aesthetic
    predictor's recipe). `head_path`: safetensors with `layers.{i}.weight` / `layers.{i}.bias`,
    applied in order; `activation: relu` between layers if the head was trained with one."""
    from safetensors.torch import load_file

    if not head_path:
        raise ConfigError("config error: reward.options.head_path: aesthetic needs the head's safetensors file")
    try:
        weights = load_file(head_path)
    except (FileNotFoundError, OSError):
        raise ConfigError(f"config error: reward.options.head_path: {head_path!r} does not exist") from None
    layers = sorted({int(k.split(".")[1]) for k in weights if k.startswith("layers.")})
    import torch

    model, _, processor = _load_clip(model_path, device)

    @torch.no_grad()
    def reward_fn(images, prompts, metadata):
        x = _image_embeddings(model, processor, images, device).float()
        for j, i in enumerate(layers):
            x = x @ weights[f"layers.{i}.weight"].to(device).T + weights[f"layers.{i}.bias"].to(device)
            if activation == "relu" and j < len(layers) - 1:
                x = torch.relu(x)
        return x[:, 0].double().cpu().numpy()

    return reward_fn


@takes("image")
def vqascore(model_path, device, backend: str = "native", normalise: str = "vocabulary", dtype: str = "auto",
             question: str | None = None, yes: str = "Yes", no: str = "No", model: str = "clip-flant5-xxl") -> RewardFn:
    """VQAScore (pgraft/vqascore.py): P("Yes") from an image-text-to-text model at `model_path`, a whole
    batch per forward pass (`backend: native`); `normalise`: vocabulary (the authors') or yes_no;
    `dtype`: auto (bf16 on CUDA, fp32 on CPU), float16, bfloat16 or float32. `backend: t2v_metrics`
    uses the authors' package instead, with its `model` (e.g. clip-flant5-xxl)."""
    from pgraft import vqascore as vqa

    if backend == "t2v_metrics":
        scores = vqa.t2v_metrics_scorer(model, device)
    elif backend == "native":
        if not model_path:
            raise ConfigError("config error: reward.model_path: vqascore needs an image-text-to-text model folder "
                              "(local or s3://)")
        scores = vqa.VQAScorer(model_path, device, dtype, normalise, question or vqa.QUESTION, yes, no).scores
    else:
        raise ConfigError(f"config error: reward.options.backend: {backend!r}; one of ['native', 't2v_metrics']")

    def reward_fn(images, prompts, metadata):
        return scores(images, list(prompts))

    return reward_fn


def _check_vqascore(model_path, options):
    from pgraft.vqascore import check_folder

    check_folder(model_path, options)


vqascore.check_weights = _check_vqascore  # run by the reward stage's driver before any actor starts


# Registry: reward.name -> factory.
REWARDS: dict[str, Callable[..., RewardFn]] = {
    "jpeg_compressibility": jpeg_compressibility,
    "jpeg_incompressibility": jpeg_incompressibility,
    "clip_score": clip_score,
    "aesthetic": aesthetic,
    "vqascore": vqascore,
}


def task_rewards() -> dict[str, Callable[..., RewardFn]]:
    """The rewards the registered tasks bring (pgraft.tasks), by name."""
    from pgraft.tasks import TASKS

    return {name: factory for spec in TASKS.values() for name, factory in spec.rewards.items()}


def reward_takes(name: str) -> str | None:
    """The sample kind the reward `name` scores: a built-in's mark, the kind of the task that
    brings it; None for a plug-in (not imported here, so not checked)."""
    from pgraft.tasks import TASKS

    if name in REWARDS:
        return getattr(REWARDS[name], "takes", None)
    owner = next((spec for spec in TASKS.values() if name in spec.rewards), None)
    return owner.sample_kind if owner is not None else None


def reward_factory(name: str) -> Callable[..., RewardFn]:
    """The factory registered as `name` (here or by a task), or a plug-in `module:function`."""
    if name in REWARDS:
        return REWARDS[name]
    if name in task_rewards():
        return task_rewards()[name]
    if ":" in name:
        return load_plugin(name, "reward.name")
    raise ConfigError(f"config error: reward.name: unknown reward {name!r}; built in: "
                      f"{sorted(REWARDS) + sorted(task_rewards())}, or module:function")


def make_reward(name: str, model_path: str | None, device: torch.device, options: dict) -> RewardFn:
    factory = reward_factory(name)
    try:
        return factory(model_path, device, **options)
    except TypeError as exc:
        raise ConfigError(f"config error: reward.options: {name} does not take these options ({exc})") from None


def as_output(result, count: int) -> RewardOutput:
    """Normalise a reward function's return value and check its length."""
    out = result if isinstance(result, RewardOutput) else RewardOutput(np.asarray(result))
    out.rewards = np.asarray(out.rewards, dtype=np.float64).reshape(-1)
    if len(out.rewards) != count:
        raise ValueError(f"returned {len(out.rewards)} rewards for {count} images")
    for name, column in out.columns.items():
        if len(column) != count:
            raise ValueError(f"extra column {name!r} has {len(column)} values for {count} images")
    return out
