"""Sample kinds: what a decoded sample is, how a shard stores it, how a report shows it.

A task says which kind its samples are (TaskSpec.sample_kind); generate stores each decoded
sample as the kind's shard member, and reward, evaluate and report read it back through the
kind. Kinds store data only (PNG pixels, a JSON string), never code, so reading a shard runs
nothing it holds. Import-light (no torch): the config checks sample kinds of rewards and hashes.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from pgraft.errors import ConfigError


def encode_png(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img).copy()


def encode_smiles(smiles: str) -> bytes:
    if not isinstance(smiles, str):
        raise TypeError(f"a smiles sample is a str, not {type(smiles).__name__}")
    return json.dumps({"smiles": smiles}).encode()


def decode_smiles(data: bytes) -> str:
    value = json.loads(data)
    if not isinstance(value, dict) or not isinstance(value.get("smiles"), str):
        raise ValueError("not a JSON object with a string 'smiles'")
    return value["smiles"]


def encode_layout(layout: dict) -> bytes:
    if not isinstance(layout, dict) or set(layout) != {"classes", "boxes"}:
        raise TypeError("a layout sample is a dict with 'classes' and 'boxes'")
    return json.dumps({"classes": list(layout["classes"]), "boxes": [list(map(float, b)) for b in layout["boxes"]]}).encode()


def decode_layout(data: bytes) -> dict:
    value = json.loads(data)
    if (not isinstance(value, dict) or not isinstance(value.get("classes"), list) or not isinstance(value.get("boxes"), list)
            or len(value["classes"]) != len(value["boxes"]) or any(len(b) != 4 for b in value["boxes"])):
        raise ValueError("not a JSON object with as many 'classes' as 4-number 'boxes'")
    return value


@dataclass(frozen=True)
class SampleKind:
    name: str  # what TaskSpec.sample_kind, a reward's and a hash's sample kind say
    ext: str  # the shard member that holds the decoded sample (`<key>.<ext>`)
    encode: Callable[[Any], bytes]  # decoded sample -> the member's bytes
    decode: Callable[[bytes], Any]  # the member's bytes -> decoded sample
    stacks: bool  # decoded samples of one shape stack into one array (images) rather than a list (strings)


IMAGE = SampleKind("image", "png", encode_png, decode_png, stacks=True)
SMILES = SampleKind("smiles", "smiles.json", encode_smiles, decode_smiles, stacks=False)
# A page layout: element class names and boxes (x0, y0, x1, y1) on the unit page.
LAYOUT = SampleKind("layout", "layout.json", encode_layout, decode_layout, stacks=False)

# Dispatch table: sample kind name -> kind.
SAMPLE_KINDS: dict[str, SampleKind] = {kind.name: kind for kind in (IMAGE, SMILES, LAYOUT)}

# A shard member of a non-image sample may carry a PNG rendering beside it, for viewing only.
VIEW_EXT = IMAGE.ext
SAMPLE_EXTS = tuple(kind.ext for kind in SAMPLE_KINDS.values())


def get_sample_kind(name: str) -> SampleKind:
    if name not in SAMPLE_KINDS:
        raise ConfigError(f"config error: task.name: unknown sample kind {name!r}; known: {sorted(SAMPLE_KINDS)}")
    return SAMPLE_KINDS[name]


def kind_of_ext(ext: str) -> SampleKind | None:
    return next((kind for kind in SAMPLE_KINDS.values() if kind.ext == ext), None)


def collect(samples: list, kind: SampleKind):
    """Decoded samples as the rewards and features take them: one array for images, a list otherwise."""
    return np.stack(samples) if kind.stacks and samples else list(samples)


def check_takes(what: str, name: str, takes: str | None, kind: str) -> None:
    """One line when `what` (reward.name, reward.hash) scores samples of another kind than the task makes."""
    if takes is not None and takes != kind:
        raise ConfigError(f"config error: {what}: {name} takes {takes} samples, but the task makes {kind} samples; "
                          f"choose a {what.split('.')[-1]} for {kind} samples")
