"""The explanation picture: the colour scale below and over the threshold, and the outlines."""

from __future__ import annotations

import numpy as np
import pytest

from qrs.overlay import OVER_COLOUR, ROI_COLOUR, THRESHOLD_COLOUR, evidence_view, render_overlay


def test_below_threshold_is_linear_and_never_reaches_the_threshold_colour() -> None:
    strength = np.array([[0.0, 0.3], [0.6, 0.89]])
    view = evidence_view(strength, 0.9)
    np.testing.assert_allclose(view, strength * THRESHOLD_COLOUR / 0.9)
    assert view.max() < THRESHOLD_COLOUR


def test_saturated_region_is_graded_up_to_its_strongest_pixel() -> None:
    # Calibrated M = clip(strength, 0, 1) is 1 on the whole 3 x 3 block: one flat colour before.
    strength = np.zeros((6, 6))
    strength[1:4, 1:4] = [[1.2, 1.5, 1.2], [1.5, 3.0, 1.5], [0.95, 1.5, 1.2]]
    view = evidence_view(strength, 0.9)
    assert np.unravel_index(view.argmax(), view.shape) == (2, 2) and view[2, 2] == pytest.approx(1.0)
    over = strength >= 0.9
    expected = THRESHOLD_COLOUR + (1 - THRESHOLD_COLOUR) * (strength - 0.9) / (3.0 - 0.9)
    np.testing.assert_allclose(view[over], expected[over])
    assert len(np.unique(view[over])) == 4
    assert view[~over].max() == 0.0


def test_a_flat_over_threshold_region_takes_the_top_colour() -> None:
    strength = np.where(np.eye(4, dtype=bool), 0.95, 0.1)
    view = evidence_view(strength, 0.95)
    np.testing.assert_allclose(view[np.eye(4, dtype=bool)], 1.0)


def test_outlines_of_the_roi_and_of_the_roi_pixels_over_threshold() -> None:
    rgb = np.zeros((8, 8, 3), dtype=np.uint8)
    strength = np.zeros((8, 8))
    strength[2:5, 2:5] = 2.0
    strength[6, 6] = 2.0  # over tau but outside the ROI: no outline
    roi = np.zeros((8, 8), dtype=bool)
    roi[1:6, 1:6] = True
    out = render_overlay(rgb, strength, 0.9, roi)
    assert (out[1, 1] == ROI_COLOUR).all() and (out[2, 2] == OVER_COLOUR).all()
    assert (out[3, 3] != OVER_COLOUR).any() and (out[6, 6] != OVER_COLOUR).any()
