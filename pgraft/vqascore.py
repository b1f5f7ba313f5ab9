"""VQAScore (docs/DESIGN.md §6c): the probability that an image-text-to-text model answers "Yes"
to `Does this figure show "{prompt}"? Please answer yes or no.` about an image.

Native and batched: any `transformers` model that `AutoModelForImageTextToText` and
`AutoProcessor` load from a folder (LLaVA-1.5, LLaVA-NeXT, Qwen2-VL, InstructBLIP, …) scores a
whole batch in one forward pass. The prompt is the processor's chat template around an image and
the question, with the generation prompt appended, so the next token is the answer. The score is
read from the logits at that position (the last real token of each row: rows are right-padded, so
a row's tokens keep their positions whatever the batch holds) with one of two normalisations:

- `vocabulary` (default, as the VQAScore authors do): softmax over the whole vocabulary, read at
  the "Yes" token: P(Yes). "No" and every other token share the rest.
- `yes_no`: softmax over the two logits {Yes, No} only: P(Yes) / (P(Yes) + P(No)).

The answer words are tokenised on their own (`tokenizer.encode(word, add_special_tokens=False)`)
and must be one token each; a tokenizer that splits them is refused with the pieces named.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pgraft.errors import ConfigError

if TYPE_CHECKING:
    import torch

QUESTION = 'Does this figure show "{prompt}"? Please answer yes or no.'
NORMALISATIONS = ("vocabulary", "yes_no")


def answer_probability(logits: "torch.Tensor", yes_id: int, no_id: int, normalise: str = "vocabulary") -> np.ndarray:
    """P(Yes) per row of next-token `logits` (B, V), computed in float64: the softmax over the
    whole vocabulary at `yes_id`, or over {yes_id, no_id} only (`yes_no`)."""
    import torch

    logits = logits.double()
    if normalise == "vocabulary":
        return torch.softmax(logits, dim=-1)[:, yes_id].cpu().numpy()
    if normalise == "yes_no":
        return torch.softmax(logits[:, [yes_id, no_id]], dim=-1)[:, 0].cpu().numpy()
    raise ConfigError(f"config error: reward.options.normalise: {normalise!r}; one of {list(NORMALISATIONS)}")


def answer_positions(attention_mask: "torch.Tensor") -> "torch.Tensor":
    """The index of each row's last real token (where the next-token logits are the answer's)."""
    import torch

    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (attention_mask.bool() * (positions + 1)).argmax(dim=1)


def check_images(images) -> None:
    """Each image must be H×W (grey) or H×W×3 (RGB) uint8: one line naming the first that is not."""
    for i, image in enumerate(images):
        array = np.asarray(image)
        if array.dtype != np.uint8 or not (array.ndim == 2 or array.ndim == 3 and array.shape[2] == 3):
            raise ValueError(f"vqascore takes H×W or H×W×3 uint8 images; image {i} is {array.dtype} of shape "
                             f"{tuple(array.shape)}")


def image_text_to_text_types() -> dict[str, str]:
    """model_type -> class name of every architecture AutoModelForImageTextToText knows."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    return dict(MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES)


def check_model_type(config: dict, where: str) -> None:
    """One line when the folder's config.json is not an image-text-to-text architecture."""
    model_type = config.get("model_type")
    known = image_text_to_text_types()
    if model_type not in known:
        raise ConfigError(f"config error: reward.model_path: {where} holds a {model_type!r} model, not an "
                          f"image-text-to-text model (AutoModelForImageTextToText loads e.g. llava, "
                          f"llava_next, qwen2_vl, instructblip)")


def check_folder(model_path: str | None, options: dict) -> None:
    """Before any actor starts (reads config.json only, locally or from storage): the native backend's
    model exists and is an image-text-to-text architecture."""
    from pgraft.models.fetch import is_remote, local_folder, model_file_exists
    from pgraft.storage import open_storage

    if options.get("backend", "native") != "native":
        return
    if not model_path:
        raise ConfigError("config error: reward.model_path: vqascore needs an image-text-to-text model folder "
                          "(local or s3://)")
    if not model_file_exists(model_path, "config.json"):
        raise ConfigError(f"config error: reward.model_path: {model_path!r} has no config.json (vqascore needs an "
                          "image-text-to-text model folder)")
    raw = open_storage(model_path).get_bytes("config.json") if is_remote(model_path) else \
        (local_folder(model_path) / "config.json").read_bytes()
    check_model_type(json.loads(raw), repr(model_path))


def single_token(tokenizer, word: str, option: str) -> int:
    """The id of `word` when the tokenizer keeps it as one token; otherwise one line naming the pieces."""
    ids = tokenizer.encode(word, add_special_tokens=False)
    if len(ids) != 1:
        pieces = tokenizer.convert_ids_to_tokens(ids)
        raise ConfigError(f"config error: reward.options.{option}: the tokenizer splits {word!r} into {len(ids)} "
                          f"tokens {pieces}; VQAScore reads one answer token (set reward.options.{option} to a "
                          "word it keeps whole, e.g. with a leading space)")
    return ids[0]


def default_dtype(device: "torch.device") -> str:
    return "bfloat16" if device.type == "cuda" else "float32"


class VQAScorer:
    """An image-text-to-text model and its processor, loaded once; `scores` runs one forward per call."""

    def __init__(self, folder: str, device: "torch.device", dtype: str = "auto", normalise: str = "vocabulary",
                 question: str = QUESTION, yes: str = "Yes", no: str = "No"):
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        if normalise not in NORMALISATIONS:
            raise ConfigError(f"config error: reward.options.normalise: {normalise!r}; one of {list(NORMALISATIONS)}")
        if "{prompt}" not in question:
            raise ConfigError(f"config error: reward.options.question: {question!r} has no {{prompt}} to fill in")
        path = Path(folder)
        if not (path / "config.json").is_file():
            what = "does not exist" if not path.exists() else "has no config.json"
            raise ConfigError(f"config error: reward.model_path: {folder!r} {what} (vqascore needs an "
                              "image-text-to-text model folder)")
        check_model_type(json.loads((path / "config.json").read_text()), repr(folder))
        self.device, self.normalise, self.question = device, normalise, question
        dtype = default_dtype(device) if dtype == "auto" else dtype
        self.processor = AutoProcessor.from_pretrained(folder)
        tokenizer = getattr(self.processor, "tokenizer", None)
        if tokenizer is None or getattr(self.processor, "chat_template", None) is None:
            raise ConfigError(f"config error: reward.model_path: the processor at {folder!r} has no tokenizer or no "
                              "chat template, so the question cannot be put to the model")
        tokenizer.padding_side = "right"  # a row's tokens keep their positions whatever the batch holds
        self.yes_id = single_token(tokenizer, yes, "yes")
        self.no_id = single_token(tokenizer, no, "no")
        self.model = AutoModelForImageTextToText.from_pretrained(folder, dtype=getattr(torch, dtype)).to(device).eval()
        self.keeps_logits = "logits_to_keep" in inspect.signature(self.model.forward).parameters

    def prompt_text(self, prompt: str) -> str:
        """The chat-formatted question about `prompt`, ending where the answer starts."""
        messages = [{"role": "user", "content": [{"type": "image"},
                                                 {"type": "text", "text": self.question.format(prompt=prompt)}]}]
        return self.processor.apply_chat_template(messages, add_generation_prompt=True)

    def scores(self, images, prompts: list[str]) -> np.ndarray:
        """P(Yes) for each (image, prompt) pair, in one forward pass."""
        import torch
        from PIL import Image

        check_images(images)
        batch = self.processor(images=[Image.fromarray(np.asarray(im)).convert("RGB") for im in images],
                               text=[self.prompt_text(p) for p in prompts], padding=True, return_tensors="pt")
        batch = {k: v.to(self.device) for k, v in batch.items()}
        if "pixel_values" in batch:
            batch["pixel_values"] = batch["pixel_values"].to(self.model.dtype)
        answer_at = answer_positions(batch["attention_mask"])
        with torch.no_grad():
            if self.keeps_logits:  # logits at the answer positions only, not (B, L, V)
                keep, rows = torch.unique(answer_at, return_inverse=True)
                logits = self.model(**batch, logits_to_keep=keep).logits
                last = logits[torch.arange(len(rows), device=logits.device), rows]
            else:
                logits = self.model(**batch).logits
                last = logits[torch.arange(len(answer_at), device=logits.device), answer_at]
        return answer_probability(last.float(), self.yes_id, self.no_id, self.normalise)


def t2v_metrics_scorer(model: str, device: "torch.device"):
    """The optional backend: the VQAScore authors' `t2v_metrics` package (CLIP-FlanT5 and others),
    one (image, prompt) pair per call as that package takes file paths. Not installable here, so
    not exercised by the tests."""
    try:
        import t2v_metrics
    except ImportError:
        raise ConfigError("config error: reward.options.backend: t2v_metrics is not installed "
                          "(pip install t2v_metrics; it downloads its own weights)") from None
    scorer = t2v_metrics.VQAScore(model=model, device=str(device))

    def scores(images, prompts: list[str]) -> np.ndarray:
        import tempfile

        from PIL import Image

        check_images(images)
        out = []
        with tempfile.TemporaryDirectory() as tmp:
            for i, (image, prompt) in enumerate(zip(images, prompts)):
                path = f"{tmp}/{i}.png"
                Image.fromarray(np.asarray(image)).convert("RGB").save(path)
                out.append(float(scorer(images=[path], texts=[prompt])))
        return np.array(out, dtype=np.float64)

    return scores
