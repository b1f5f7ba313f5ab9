"""Layout quality without a reference (docs/DESIGN.md §6d): overlap, alignment and out-of-page
area of one layout, each a small pure function of its boxes.

A layout is N elements, each a box (x0, y0, x1, y1) on the unit page (x right, y down), given as
an (N, 4) array; padding elements are left out before these are called.

- overlap (after LayoutGAN++, Kikuchi et al. 2021): the mean over elements of the fraction of
  an element's area that the other elements cover, summed over them:
  (1/N) Σ_i Σ_{j≠i} |b_i ∩ b_j| / |b_i|. Two identical boxes: 1 each, so 1. Disjoint boxes: 0.
- alignment (Lee et al. 2020, as LayoutGAN++ computes it): for each element the smallest
  distance, over the six alignments (left, centre and right edges in x; top, centre and bottom in
  y) and over the other elements, of its coordinate to theirs; passed through −log(1 − d) and
  averaged over elements. Boxes sharing a left edge: 0 (perfectly aligned). One element: 0.
- out_of_page: the fraction of the elements' total area that lies outside the unit page.
"""

from __future__ import annotations

import numpy as np

EPS = 1e-9


def _areas(boxes: np.ndarray) -> np.ndarray:
    return np.clip(boxes[:, 2] - boxes[:, 0], 0, None) * np.clip(boxes[:, 3] - boxes[:, 1], 0, None)


def intersections(boxes: np.ndarray) -> np.ndarray:
    """(N, N) areas of pairwise intersection (the diagonal is each box's own area)."""
    x0 = np.maximum(boxes[:, None, 0], boxes[None, :, 0])
    y0 = np.maximum(boxes[:, None, 1], boxes[None, :, 1])
    x1 = np.minimum(boxes[:, None, 2], boxes[None, :, 2])
    y1 = np.minimum(boxes[:, None, 3], boxes[None, :, 3])
    return np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)


def _pairs(boxes) -> np.ndarray | None:
    """The boxes as float64, or None when there is no pair to compare (the term is then 0)."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    return boxes if len(boxes) >= 2 else None


def overlap(boxes: np.ndarray) -> float:
    boxes = _pairs(boxes)
    if boxes is None:
        return 0.0
    inter = intersections(boxes)
    np.fill_diagonal(inter, 0.0)
    return float((inter.sum(axis=1) / np.maximum(_areas(boxes), EPS)).mean())


def alignment_coordinates(boxes: np.ndarray) -> np.ndarray:
    """(N, 6): left, x-centre, right, top, y-centre, bottom."""
    x0, y0, x1, y1 = boxes.T
    return np.stack([x0, (x0 + x1) / 2, x1, y0, (y0 + y1) / 2, y1], axis=1)


def alignment(boxes: np.ndarray) -> float:
    boxes = _pairs(boxes)
    if boxes is None:
        return 0.0
    n = len(boxes)
    coords = alignment_coordinates(boxes)
    distance = np.abs(coords[:, None, :] - coords[None, :, :])  # (N, N, 6)
    distance[np.arange(n), np.arange(n), :] = np.inf
    nearest = np.clip(distance.min(axis=(1, 2)), 0.0, 1.0 - EPS)
    return float((-np.log(1.0 - nearest)).mean())


def out_of_page(boxes: np.ndarray) -> float:
    boxes = np.asarray(boxes, np.float64)
    total = _areas(boxes).sum()
    if total <= 0:
        return 0.0
    inside = _areas(np.clip(boxes, 0.0, 1.0)).sum()
    return float((total - inside) / total)


# Weights of layout_quality: every term is 0 for a clean layout and grows with the defect.
QUALITY_WEIGHTS = {"overlap": 1.0, "alignment": 10.0, "out_of_page": 1.0}
QUALITY_TERMS = {"overlap": overlap, "alignment": alignment, "out_of_page": out_of_page}


def layout_quality(boxes: np.ndarray) -> tuple[float, dict[str, float]]:
    """−Σ w_k term_k (higher is better; 0 is a clean layout) and the terms."""
    terms = {name: fn(boxes) for name, fn in QUALITY_TERMS.items()}
    return -sum(QUALITY_WEIGHTS[name] * value for name, value in terms.items()), terms
