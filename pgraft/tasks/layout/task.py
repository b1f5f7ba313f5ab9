"""The `layout` task (docs/DESIGN.md §6d): page layouts generated from their element classes
("C → S + P": the classes in reading order are given, positions and sizes are generated).

- Corpus: real pages (pgraft/tasks/layout/data.py), from the PDFs under `--source` (default: the
  manuals of Debian's texlive-latex-base-doc) or a PubLayNet-style COCO file, built by
  `pgraft pretrain page_layout` into `<task.dir>/corpus/layouts.json`, deterministic for a source.
- Model space: a layout is MAX_ELEMENTS rows of (x_centre, y_centre, width, height) × 2 − 1; rows
  past the last element are zeros, and their condition is the PAD class.
- Prompt: the element classes in reading order, e.g. "title text text figure"; the empty prompt
  is unconditional (every position the NULL class).
- Decoded sample (sample kind `layout`): {"classes": [...], "boxes": [[x0, y0, x1, y1], ...]}.
- Rewards: `layout_quality` (−overlap − 10·alignment − out_of_page, each a column) and the terms
  alone; Fréchet distance in the feature space of a small encoder trained on the corpus to tell
  each element's class from the boxes alone.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from functools import lru_cache
from pathlib import Path

import numpy as np

from pgraft.errors import PgraftError
from pgraft.tasks.layout.data import CLASSES, MAX_ELEMENTS, Layout, LayoutDataError, extract_pdf, load_coco
from pgraft.tasks.layout.quality import QUALITY_TERMS, layout_quality

PAD_CLASS = len(CLASSES)  # condition of the rows past the last element
NULL_CLASS = len(CLASSES) + 1  # the unconditional condition (classifier-free guidance)
DEFAULT_SOURCE = "/usr/share/doc/texlive-doc/latex"  # Debian: apt-get install texlive-latex-base-doc
CORPUS = "corpus/layouts.json"
NUM_PROMPTS = 8  # how many of the corpus's most common class sequences the summary and the card record


class LayoutTaskError(PgraftError):
    """The layout task cannot do what was asked; the message names the file or setting."""


# Corpus --------------------------------------------------------------------------------------

def read_source(source: str | Path, pages_per_file: int | None = None) -> tuple[list[Layout], dict]:
    """Layouts of a COCO file, or of every PDF under a folder (sorted, so the corpus is
    deterministic; `pages_per_file` spread over each PDF, or all); and a record of what was read."""
    source = Path(source)
    if source.is_file() and source.suffix == ".json":
        layouts = load_coco(source)
        record = {"source": str(source), "kind": "coco", "files": 1}
    elif source.is_dir():
        pdfs = sorted(source.rglob("*.pdf"))
        if not pdfs:
            raise LayoutTaskError(f"no PDFs under {source} (Debian: apt-get install texlive-latex-base-doc; or "
                                  "--source a folder of PDFs or a COCO .json file)")
        layouts, unreadable = [], []
        for pdf in pdfs:
            try:
                layouts += extract_pdf(pdf, pages_per_file)
            except LayoutDataError as exc:
                unreadable.append(str(exc))
        record = {"source": str(source), "kind": "pdf", "files": len(pdfs), "pages_per_file": pages_per_file,
                  "unreadable": unreadable}
    else:
        raise LayoutTaskError(f"layout source {source} is neither a folder of PDFs nor a COCO .json file "
                              "(Debian: apt-get install texlive-latex-base-doc)")
    if not layouts:
        raise LayoutTaskError(f"layout source {source} gave no layout (an empty corpus); nothing was written")
    record["layouts"] = len(layouts)
    return layouts, record


def save_corpus(layouts: list[Layout], record: dict, out: Path) -> None:
    """Write the corpus whole or not at all (a temporary file renamed into place)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    body = {"classes": list(CLASSES), "record": record,
            "layouts": [{"classes": list(lay.classes), "boxes": [list(b) for b in lay.boxes], "source": lay.source}
                        for lay in layouts]}
    partial = out.with_name(out.name + ".partial")
    partial.write_text(json.dumps(body))
    partial.replace(out)


@lru_cache(maxsize=4)
def _load_corpus(path: str) -> tuple[Layout, ...]:
    data = json.loads(Path(path).read_text())
    return tuple(Layout(tuple(d["classes"]), tuple(tuple(b) for b in d["boxes"]), d["source"]) for d in data["layouts"])


def corpus_file(task_dir: str | None) -> str:
    """This node's copy of the corpus under task.dir (fetched once from storage)."""
    from pgraft.models.fetch import child, fetch_model, is_remote, local_folder

    if task_dir is None:
        raise LayoutTaskError("the layout task reads its corpus from task.dir; set task.dir")
    folder = child(task_dir, "corpus")
    local = Path(fetch_model(folder)) if is_remote(folder) else local_folder(folder)
    path = local / "layouts.json"
    if not path.is_file():
        raise LayoutTaskError(f"no layout corpus at {child(task_dir, CORPUS)}; run `pgraft pretrain page_layout --out "
                              f"{task_dir}`")
    return str(path)


def split_of(layouts: tuple[Layout, ...], split: str, seed: int) -> list[Layout]:
    """A fixed 90/10 split by the seed; `all` is everything."""
    if split == "all":
        return list(layouts)
    order = np.random.default_rng(seed).permutation(len(layouts))
    cut = int(round(0.9 * len(layouts)))
    chosen = order[:cut] if split == "train" else order[cut:]
    return [layouts[i] for i in sorted(chosen)]


# Model space -------------------------------------------------------------------------------

def prompt_of(classes) -> str:
    return " ".join(CLASSES[c] for c in classes)


def encode(layouts: list[Layout]):
    """(x (N, MAX_ELEMENTS, 4) in [-1, 1], condition (N, MAX_ELEMENTS) class ids with PAD)."""
    import torch

    x = torch.zeros(len(layouts), MAX_ELEMENTS, 4)
    y = torch.full((len(layouts), MAX_ELEMENTS), PAD_CLASS, dtype=torch.long)
    for i, lay in enumerate(layouts):
        classes, boxes = lay.as_arrays()
        centre_size = np.stack([(boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2,
                                boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]], axis=1)
        x[i, :len(classes)] = torch.from_numpy(centre_size * 2 - 1).float()
        y[i, :len(classes)] = torch.from_numpy(classes)
    return x, y


def boxes_of(x) -> np.ndarray:
    """Model-space rows (..., 4) → boxes (x0, y0, x1, y1) on the unit page (sizes clipped at 0)."""
    v = (np.asarray(x, np.float64) + 1) / 2
    w, h = np.clip(v[..., 2], 0, None), np.clip(v[..., 3], 0, None)
    return np.stack([v[..., 0] - w / 2, v[..., 1] - h / 2, v[..., 0] + w / 2, v[..., 1] + h / 2], axis=-1)


def decode(x0, prompts: list[str]) -> list[dict]:
    """x_0 (N, MAX_ELEMENTS, 4) and the prompts that conditioned it → layout samples (the prompt's
    elements, in order; an empty prompt keeps no element)."""
    boxes = boxes_of(x0.float().cpu().numpy())
    out = []
    for rows, prompt in zip(boxes, prompts):
        names = prompt.split()
        out.append({"classes": names, "boxes": [[round(float(v), 6) for v in row] for row in rows[:len(names)]]})
    return out


def real_data(split: str = "train", seed: int = 0, task_dir: str | None = None):
    layouts = split_of(_load_corpus(corpus_file(task_dir)), split, seed)
    x, _ = encode(layouts)
    return x, [prompt_of(lay.classes) for lay in layouts]


def real_samples(split: str = "test", seed: int = 0, task_dir: str | None = None) -> list[dict]:
    return [{"classes": [CLASSES[c] for c in lay.classes], "boxes": [list(b) for b in lay.boxes]}
            for lay in split_of(_load_corpus(corpus_file(task_dir)), split, seed)]


def common_prompts(layouts, count: int = NUM_PROMPTS) -> list[str]:
    """The `count` most common class sequences (ties by the sequence), the default prompts."""
    counts = Counter(prompt_of(lay.classes) for lay in layouts)
    return [p for p, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:count]]


# Rewards and metrics ---------------------------------------------------------------------------

def _boxes(sample: dict) -> np.ndarray:
    return np.asarray(sample["boxes"], np.float64).reshape(-1, 4)


def quality_reward(model_path, device):
    """layout_quality = −(overlap + 10·alignment + out_of_page); each term is a reward-table column."""
    from pgraft.rewards import RewardOutput

    def reward_fn(samples, prompts, metadata):
        scored = [layout_quality(_boxes(s)) for s in samples]
        columns = {name: np.array([terms[name] for _, terms in scored]) for name in QUALITY_TERMS}
        return RewardOutput(np.array([r for r, _ in scored], np.float64), columns)

    return reward_fn


def term_reward(name: str):
    """−term as a reward, for one quality term alone."""

    def factory(model_path, device):
        def reward_fn(samples, prompts, metadata):
            return -np.array([QUALITY_TERMS[name](_boxes(s)) for s in samples], np.float64)

        return reward_fn

    return factory


overlap_reward = term_reward("overlap")
alignment_reward = term_reward("alignment")


def sample_metrics(samples: list[dict], seed: int = 0) -> dict:
    """The three quality terms, averaged over the samples (lower is better), as evaluate reports them."""
    return {name: float(np.mean([fn(_boxes(s)) for s in samples])) for name, fn in QUALITY_TERMS.items()}


def layout_hash(sample: dict, metadata: dict) -> str:
    """The classes and boxes rounded to 1/100 of the page: near-identical layouts share a hash."""
    key = json.dumps([sample["classes"], np.round(_boxes(sample), 2).tolist()])
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def show(sample: dict) -> np.ndarray:
    """The layout drawn as coloured boxes on a white page (uint8 RGB, 96×128)."""
    from PIL import Image, ImageDraw

    colours = {"text": (66, 133, 244), "title": (219, 68, 55), "list": (15, 157, 88), "table": (244, 160, 0),
               "figure": (171, 71, 188)}
    w, h = 96, 128
    page = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(page)
    for name, (x0, y0, x1, y1) in zip(sample["classes"], sample["boxes"]):
        draw.rectangle([x0 * w, y0 * h, max(x0 * w, x1 * w), max(y0 * h, y1 * h)],
                       outline=colours.get(name, (0, 0, 0)), width=2)
    return np.asarray(page).copy()


# Layout encoder (the feature space of the Fréchet distance) --------------------------------------

def encoder_config(width: int = 64, layers: int = 2) -> dict:
    # Condition-free: the class labels are what it learns to tell; its classes are the element classes + PAD.
    return dict(sample_length=MAX_ELEMENTS, embed_dim=4, width=width, layers=layers, heads=4,
                num_class_embeds=NULL_CLASS + 1)


def train_encoder(x, y, seed: int, steps: int, progress: bool = False):
    """A SequenceDenoiser body trained to tell each element's class (or PAD) from the boxes alone;
    its pooled last hidden state is the layout feature. Returns (encoder, its classification head)."""
    import torch
    import torch.nn.functional as F

    from pgraft.models.sequence import SequenceDenoiser
    from pgraft.progress import progress_bar

    torch.manual_seed(seed)
    net = SequenceDenoiser(**encoder_config())
    head = torch.nn.Linear(net.config.width, PAD_CLASS + 1)
    opt = torch.optim.AdamW(list(net.parameters()) + list(head.parameters()), lr=1e-3)
    gen = torch.Generator().manual_seed(seed + 7)
    bar = progress_bar(steps, "pretrain layout encoder", "step", enabled=progress)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (128,), generator=gen)
        loss = F.cross_entropy(head(hidden(net, x[idx])).reshape(-1, PAD_CLASS + 1), y[idx].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        bar.update(1)
    bar.close()
    net.eval()
    return net, head


def encoder_accuracy(net, head, x, y) -> float:
    """The fraction of real elements (PAD rows aside) whose class the encoder tells from the boxes."""
    import torch

    with torch.no_grad():
        right = head(hidden(net, x)).argmax(-1) == y
    real = y != PAD_CLASS
    return float(right[real].float().mean())


def hidden(net, x):
    """The encoder's per-element hidden states (B, MAX_ELEMENTS, width): no timestep, no condition."""
    return net.norm_out(net.encoder(net.in_proj(x) + net.position))  # no time or class input: a plain encoder


def feature_extractor(weights: str | None):
    """The layout encoder's mean element feature (its folder `weights`, a path or storage URI
    fetched once per node)."""
    import torch

    from pgraft.models.fetch import fetch_model, is_remote
    from pgraft.models.sequence import SequenceDenoiser

    if weights is None:
        raise LayoutTaskError("page_layout features need the layout encoder (task.dir/encoder)")
    net = SequenceDenoiser.from_pretrained(fetch_model(weights) if is_remote(weights) else weights).eval()

    def extract(samples: list[dict]) -> np.ndarray:
        layouts = [Layout(tuple(CLASSES.index(c) for c in s["classes"]), tuple(map(tuple, s["boxes"])), "")
                   for s in samples]
        x, y = encode(layouts)
        with torch.no_grad():
            h = hidden(net, x)
        mask = (y != PAD_CLASS).float()[..., None]
        return ((h * mask).sum(1) / mask.sum(1).clamp(min=1)).double().numpy()

    return extract


# Pretraining ------------------------------------------------------------------------------------

def denoiser_config(width: int = 64, layers: int = 3) -> dict:
    return dict(sample_length=MAX_ELEMENTS, embed_dim=4, width=width, layers=layers, heads=4,
                num_class_embeds=NULL_CLASS + 1)


def save_base(net, scheduler, out: Path, prompts: list[str]) -> None:
    from pgraft.models.adapters import MODEL_CARD

    out.mkdir(parents=True, exist_ok=True)
    net.save_pretrained(out / "unet")
    scheduler.save_pretrained(out / "scheduler")
    card = {"task": "page_layout", "base": "ddpm", "prompts": {p: i for i, p in enumerate(prompts)},
            "element_classes": list(CLASSES), "pad_class": PAD_CLASS, "null_class": NULL_CLASS,
            "sample_kind": "layout", "x0": "rows of (x_centre, y_centre, width, height) × 2 − 1 (pgraft.tasks.layout)"}
    (out / MODEL_CARD).write_text(json.dumps(card, indent=1))


def pretrain_layout(out: str | Path, seed: int = 0, source: str = DEFAULT_SOURCE, pages_per_file: int = 12,
                    steps: int = 3000, width: int = 64, layers: int = 3, encoder_steps: int = 1500,
                    progress: bool = True) -> dict:
    """Build the corpus from `source`, train the DDPM base `ddpm/` and the encoder `encoder/` on
    its train split, and write `summary.json` (last)."""
    import torch

    from pgraft.models.sequence import SequenceDenoiser
    from pgraft.tasks.training import train_class_denoiser

    out = Path(out)
    start = time.perf_counter()
    layouts, record = read_source(source, pages_per_file)
    save_corpus(layouts, record, out / CORPUS)
    corpus = _load_corpus(str(out / CORPUS))
    train = split_of(corpus, "train", seed)
    x, y = encode(train)
    torch.manual_seed(seed)
    net = SequenceDenoiser(**denoiser_config(width, layers))
    net, sampler, loss = train_class_denoiser(net, x, y, NULL_CLASS, "ddpm", steps, seed, progress=progress,
                                              label="pretrain layout", prediction_type="sample", clip_sample=False)
    common = common_prompts(train)
    save_base(net, sampler, out / "ddpm", common)
    encoder, head = train_encoder(x, y, seed, encoder_steps, progress)
    encoder.save_pretrained(out / "encoder")
    held_out = split_of(corpus, "test", seed)
    counts = Counter(CLASSES[c] for lay in corpus for c in lay.classes)
    summary = {"seed": seed, "source": record, "layouts": len(corpus), "train_layouts": len(train),
               "held_out": len(held_out), "elements": dict(sorted(counts.items())),
               "common_sequences": common, "steps": steps, "ddpm_final_loss": loss,
               "encoder_accuracy_train": encoder_accuracy(encoder, head, x, y),
               "encoder_accuracy_held_out": encoder_accuracy(encoder, head, *encode(held_out)),
               "seconds": round(time.perf_counter() - start, 1)}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def pretrain_and_publish(location: str, seed: int = 0, threads: int | None = None, **options) -> dict:
    from pgraft.tasks.training import publish

    return publish(location, lambda out, **kw: pretrain_layout(out, seed=seed, **kw), ("corpus", "ddpm", "encoder"),
                   threads, **options)
