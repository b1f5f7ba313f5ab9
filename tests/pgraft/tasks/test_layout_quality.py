"""Layout quality terms against hand-computed layouts."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pgraft.tasks.layout.quality import alignment, layout_quality, out_of_page, overlap


def test_overlap_of_identical_disjoint_and_half_covered_boxes():
    box = [0.1, 0.1, 0.5, 0.3]
    assert overlap(np.array([box, box])) == pytest.approx(1.0)
    assert overlap(np.array([[0, 0, 0.2, 0.2], [0.5, 0.5, 0.7, 0.7]])) == 0.0
    # B covers the right half of A (A: 0.4×0.2); A covers all of B's left... B is 0.2×0.2 inside A's right half.
    a, b = [0.0, 0.0, 0.4, 0.2], [0.2, 0.0, 0.4, 0.2]
    assert overlap(np.array([a, b])) == pytest.approx((0.5 + 1.0) / 2)
    assert overlap(np.array([a])) == 0.0


def test_alignment_is_zero_for_a_shared_left_edge_and_minus_log_otherwise():
    shared_left = np.array([[0.1, 0.1, 0.5, 0.2], [0.1, 0.4, 0.3, 0.6]])
    assert alignment(shared_left) == 0.0
    # Nothing shared: left edges 0.25 apart, x-centres 0.375, right edges 0.5, top 0.4, y-centres
    # 0.575, bottom 0.75: each element's nearest alignment is the left edge, d = 0.25.
    apart = np.array([[0.10, 0.10, 0.30, 0.20], [0.35, 0.50, 0.80, 0.95]])
    assert alignment(apart) == pytest.approx(-math.log(1 - 0.25))
    assert alignment(apart[:1]) == 0.0


def test_out_of_page_and_the_combined_reward():
    inside = np.array([[0.1, 0.1, 0.5, 0.3]])
    half_out = np.array([[0.8, 0.1, 1.2, 0.3]])  # half of its width beyond the right edge
    assert out_of_page(inside) == 0.0 and out_of_page(half_out) == pytest.approx(0.5)
    clean = np.array([[0.1, 0.1, 0.9, 0.2], [0.1, 0.3, 0.9, 0.5]])  # aligned left and right, disjoint, inside
    reward, terms = layout_quality(clean)
    assert reward == 0.0 and terms == {"overlap": 0.0, "alignment": 0.0, "out_of_page": 0.0}
    worse, _ = layout_quality(np.array([[0.1, 0.1, 0.9, 0.4], [0.15, 0.3, 1.1, 0.5]]))
    assert worse < reward
