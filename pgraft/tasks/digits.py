"""The built-in `digits` task (docs/DESIGN.md §6): data, base models and the alignment classifier.

Everything here trains from scikit-learn's bundled `load_digits` (no download) and saves in
the formats the rest of the pipeline loads: diffusers folders for the base models, a
safetensors file + JSON config for the classifier.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn


NUM_CLASSES = 10
NULL_CLASS = 10  # reserved label for the unconditional branch of classifier-free guidance
LABEL_DROPOUT = 0.1


def prompt_for(digit: int) -> str:
    return f"a handwritten digit {digit}"


def load_data(split: str = "all", seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 1, 8, 8) in [-1, 1] (pixels x/8 − 1) and labels; `train`/`test` is a fixed 80/20 split."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 8.0 - 1.0
    y = torch.tensor(digits.target, dtype=torch.long)
    if split == "all":
        return x, y
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    cut = int(0.8 * len(x))
    idx = order[:cut] if split == "train" else order[cut:]
    return x[idx], y[idx]


def uint8_to_model_space(images: np.ndarray) -> torch.Tensor:
    """Decoded PNG pixels (N, 8, 8) uint8 → (N, 1, 8, 8) in [-1, 1], as the models see them."""
    return torch.as_tensor(np.asarray(images), dtype=torch.float32).reshape(-1, 1, 8, 8) / 127.5 - 1.0


# Classifier (the reward model) -----------------------------------------------------------

@dataclass
class ClassifierConfig:
    channels: int = 32
    hidden: int = 128


class DigitClassifier(nn.Module):
    def __init__(self, config: ClassifierConfig = ClassifierConfig()):
        super().__init__()
        c = config.channels
        self.config = config
        self.features = nn.Sequential(
            nn.Conv2d(1, c, 3, padding=1), nn.ReLU(),
            nn.Conv2d(c, 2 * c, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(2 * c * 16, config.hidden), nn.ReLU(), nn.Dropout(0.2),
                                  nn.Linear(config.hidden, NUM_CLASSES))

    def penultimate(self, x: torch.Tensor) -> torch.Tensor:
        """(N, hidden) activations feeding the final linear layer (after its ReLU and Dropout).

        Named `penultimate` because `features` is already the convolutional trunk, whose name
        fixes the saved state-dict keys (`features.0.weight`, …) of existing classifiers.
        """
        return self.head[:-1](self.features(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Same modules in the same order as head(features(x)): logits (and dropout draws) unchanged.
        return self.head[-1](self.penultimate(x))


def train_classifier(seed: int = 0, epochs: int = 30, batch_size: int = 128) -> tuple[DigitClassifier, float]:
    """Train on the 80 % split; return the model and its test accuracy."""
    torch.manual_seed(seed)
    x_train, y_train = load_data("train", seed)
    x_test, y_test = load_data("test", seed)
    # Train on the PNG grid the reward stage will read, so quantisation is not a domain shift.
    x_train = uint8_to_model_space(((x_train + 1) * 127.5).round().clamp(0, 255).numpy().astype(np.uint8))
    model = DigitClassifier()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(x_train), generator=gen).split(batch_size):
            loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
    return model, accuracy


def save_classifier(model: DigitClassifier, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out / "model.safetensors")
    (out / "config.json").write_text(json.dumps(asdict(model.config), indent=1))


def load_classifier(path: str | Path) -> DigitClassifier:
    path = Path(path)
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"digits classifier not found at {path} (run `pgraft pretrain digits --out DIR`)")
    model = DigitClassifier(ClassifierConfig(**json.loads((path / "config.json").read_text())))
    model.load_state_dict(load_file(path / "model.safetensors"))
    return model.eval()


@torch.no_grad()
def class_probabilities(classifier: DigitClassifier, images: np.ndarray) -> np.ndarray:
    """(N, 10) float64 class probabilities of decoded uint8 images."""
    return classifier(uint8_to_model_space(images)).softmax(-1).double().numpy()


@torch.no_grad()
def classifier_features(classifier: DigitClassifier, images: np.ndarray, batch_size: int = 512) -> np.ndarray:
    """(N, hidden) float64 penultimate-layer activations of decoded uint8 images (N, 8, 8).

    The feature space for a Fréchet distance between image sets (pgraft.metrics). The classifier
    runs in eval mode (dropout off, so features are deterministic) and its mode is restored.
    """
    images = np.asarray(images)
    if images.ndim != 3 or images.shape[1:] != (8, 8):
        raise ValueError(f"images must be (N, 8, 8) uint8, got shape {images.shape}")
    was_training = classifier.training
    classifier.eval()
    try:
        out = [classifier.penultimate(uint8_to_model_space(images[lo:lo + batch_size])).double().numpy()
               for lo in range(0, len(images), batch_size)]
    finally:
        classifier.train(was_training)
    return np.concatenate(out) if out else np.zeros((0, classifier.config.hidden))


def real_images(split: str = "test", seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as decoded uint8 images (N, 8, 8), like generate's samples, and labels (N,).

    Pixels 0…16 map to round(x · 255/16), the same quantisation train_classifier applies, so
    uint8_to_model_space gives load_data's values to within half a grey level (0 and 16 exactly).
    `split` is `all`, `train` or `test` (load_data's fixed 80/20 split for `seed`).
    """
    if split not in ("all", "train", "test"):
        raise ValueError(f"unknown split {split!r}; expected 'all', 'train' or 'test'")
    x, y = load_data(split, seed)
    images = ((x[:, 0] + 1) * 127.5).round().clamp(0, 255).numpy().astype(np.uint8)
    return images, y.numpy()


def real_data(split: str = "train", seed: int = 0, task_dir: str | None = None) -> tuple[torch.Tensor, list[str]]:
    """The real digits as the models see them, (N, 1, 8, 8) in [-1, 1], with each one's prompt:
    what `pgraft invert` pushes back through a flow model."""
    if split not in ("all", "train", "test"):
        raise ValueError(f"unknown split {split!r}; expected 'all', 'train' or 'test'")
    x, y = load_data(split, seed)
    return x, [prompt_for(int(d)) for d in y]


def prompt_alignment(classifier: DigitClassifier, images: np.ndarray, digits: list[int] | np.ndarray) -> np.ndarray:
    """Probability the classifier gives the prompted digit, per image (the digits reward)."""
    probs = class_probabilities(classifier, images)
    return probs[np.arange(len(probs)), np.asarray(digits)]


# What the task registry (pgraft.tasks.builtin) refers to -----------------------------------

_DIGIT_RE = re.compile(r"(\d)\s*$")


def alignment_reward(model_path: str | None, device: torch.device, transform: str = "prob"):
    """Probability the digits classifier gives the prompted digit (`transform: log_prob` for a
    graded signal: best-of-N saturates the nearly binary probability)."""
    from pgraft.errors import ConfigError
    from pgraft.rewards import RewardOutput

    if transform not in ("prob", "log_prob"):
        raise ConfigError(f"config error: reward.options.transform: {transform!r} is not prob or log_prob")
    if model_path is None:
        raise ConfigError("config error: reward.model_path: digits_alignment needs the classifier folder")
    classifier = load_classifier(model_path)

    def reward_fn(images, prompts, metadata):
        digits = []
        for prompt in prompts:
            m = _DIGIT_RE.search(prompt)
            if not m:
                raise ValueError(f"prompt {prompt!r} does not end in a digit")
            digits.append(int(m.group(1)))
        all_probs = class_probabilities(classifier, np.stack(images))
        probs = all_probs[np.arange(len(digits)), digits]
        predicted = all_probs.argmax(-1)
        rewards = np.log(np.clip(probs, 1e-12, None)) if transform == "log_prob" else probs
        return RewardOutput(rewards, {"alignment": probs, "predicted_digit": predicted.astype(np.int64)})

    return reward_fn


def real_samples(split: str = "all", seed: int = 0, task_dir: str | None = None) -> np.ndarray:
    """The real digits as decoded samples (N, 8, 8) uint8: the Fréchet distance's reference set."""
    return real_images(split, seed)[0]


def feature_extractor(weights: str | None):
    """The reward classifier's penultimate activations as features of decoded images (its folder
    `weights`, a local path or storage URI fetched once per node)."""
    from pgraft.models.fetch import fetch_model, is_remote

    if weights is None:
        raise FileNotFoundError("digits features need the classifier folder (task.dir/classifier)")
    classifier = load_classifier(fetch_model(weights) if is_remote(weights) else weights)
    return lambda images: classifier_features(classifier, images)


# Base diffusion / flow models -------------------------------------------------------------

def unet_config(width: int = 32, layers_per_block: int = 2) -> dict:
    """The reference architecture of docs/DESIGN.md §6 (1.0 M parameters); `width` (channels of
    the first block, the second has twice as many) and `layers_per_block` size it down (16 and 1:
    0.18 M parameters, the embedded default's, ~2.6× cheaper a step on CPU)."""
    return dict(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(width, 2 * width),
        layers_per_block=layers_per_block,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        num_class_embeds=NUM_CLASSES + 1, norm_num_groups=8,
    )


def train_base(kind: str, steps: int, seed: int = 0, batch_size: int = 128, lr: float = 5e-4, progress: bool = True,
               width: int = 32, layers_per_block: int = 2):
    """Train the class-conditional base: `ddpm` (ε-prediction) or `flow` (velocity)."""
    import diffusers

    from pgraft.tasks.training import train_class_denoiser

    torch.manual_seed(seed)
    x, y = load_data("all")
    unet = diffusers.UNet2DModel(**unet_config(width, layers_per_block))
    return train_class_denoiser(unet, x, y, NULL_CLASS, kind, steps, seed, batch_size, lr, LABEL_DROPOUT, progress)


def save_base(unet, scheduler, out: Path, kind: str) -> None:
    from pgraft.models.adapters import MODEL_CARD

    out.mkdir(parents=True, exist_ok=True)
    unet.save_pretrained(out / "unet")
    scheduler.save_pretrained(out / "scheduler")
    card = {"task": "digits", "base": kind, "prompts": {prompt_for(d): d for d in range(NUM_CLASSES)},
            "null_class": NULL_CLASS, "pixels": "x/8 - 1, decoded PNG = (x + 1) * 127.5"}
    (out / MODEL_CARD).write_text(json.dumps(card, indent=1))


def measure_alignment(model_dir: Path, classifier: DigitClassifier, samples_per_digit: int, guidance: float,
                      steps: int = 20, seed: int = 12345) -> float:
    """Mean prompt alignment of the model's own samples, through the same adapter generate uses."""
    from pgraft.config import ModelSection
    from pgraft.models.adapters import load_adapter

    adapter = load_adapter(ModelSection(kind="class_unet", path=str(model_dir), num_inference_steps=steps,
                                        guidance_scale=guidance, device="cpu"))
    digits = [d for d in range(NUM_CLASSES) for _ in range(samples_per_digit)]
    seeds = [seed + i for i in range(len(digits))]
    images = []
    for lo in range(0, len(digits), 250):
        batch = digits[lo:lo + 250]
        images.append(adapter.rollout([prompt_for(d) for d in batch], seeds[lo:lo + 250], []).samples)
    return float(prompt_alignment(classifier, np.concatenate(images), digits).mean())


BASES = ("ddpm", "flow")


def pretrain_digits(out: str | Path, seed: int = 0, ddpm_steps: int = 800, flow_steps: int = 500,
                    classifier_epochs: int = 30, eval_samples_per_digit: int = 50, guidance: float = 0.7,
                    progress: bool = True, bases: str = "ddpm,flow", width: int = 32, layers_per_block: int = 2) -> dict:
    """Train and save `classifier/` and the `bases` (comma-separated: `ddpm/`, `flow/`) under
    `out`, plus `summary.json` (which records the options the models were made with)."""
    out = Path(out)
    wanted = [b.strip() for b in bases.split(",") if b.strip()]
    unknown = sorted(set(wanted) - set(BASES))
    if unknown:
        from pgraft.errors import ConfigError

        raise ConfigError(f"--bases: unknown base(s) {', '.join(unknown)}; the digits task trains {', '.join(BASES)}")
    made = [kind for kind in BASES if kind in wanted and {"ddpm": ddpm_steps, "flow": flow_steps}[kind] > 0]
    summary: dict = {"seed": seed, "ddpm_steps": ddpm_steps, "flow_steps": flow_steps, "bases": made,
                     "pretrain_options": {"ddpm_steps": ddpm_steps, "flow_steps": flow_steps,
                                          "classifier_epochs": classifier_epochs, "width": width,
                                          "layers_per_block": layers_per_block}}
    start = time.perf_counter()
    classifier, accuracy = train_classifier(seed, classifier_epochs)
    save_classifier(classifier, out / "classifier")
    summary["classifier_test_accuracy"] = accuracy
    summary["classifier_seconds"] = round(time.perf_counter() - start, 1)
    for kind, steps in (("ddpm", ddpm_steps), ("flow", flow_steps)):
        if kind not in made:
            continue  # not asked for (a run that samples from the other), or 0 steps
        t0 = time.perf_counter()
        unet, sampler, loss = train_base(kind, steps, seed, progress=progress, width=width,
                                         layers_per_block=layers_per_block)
        save_base(unet, sampler, out / kind, kind)
        summary[f"{kind}_final_loss"] = loss
        summary[f"{kind}_seconds"] = round(time.perf_counter() - t0, 1)
        if eval_samples_per_digit:
            summary[f"{kind}_alignment_at_guidance_{guidance}"] = measure_alignment(
                out / kind, classifier, eval_samples_per_digit, guidance)
    summary["total_seconds"] = round(time.perf_counter() - start, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def pretrain_and_publish(location: str, seed: int = 0, threads: int | None = None, **options) -> dict:
    """Pretrain the task on the node this runs on (the round pipeline runs it as a Ray task,
    never in the driver) and publish `ddpm/`, `flow/`, `classifier/` and `summary.json` (last)
    to `location`, a local folder or a storage URI. `options` go to `pretrain_digits`."""
    from pgraft.tasks.training import publish

    return publish(location, lambda out, **kw: pretrain_digits(out, seed=seed, **kw), ("flow", "ddpm", "classifier"),
                   threads, **options)
