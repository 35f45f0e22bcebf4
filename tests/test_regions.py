"""Regions: mask components -> boxes, resize transforms, rasterisation, automatic ROI."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from skimage.measure import label, regionprops

from qrs.data.regions import (
    auto_roi, mask_to_boxes, pixel_box_to_relative, rasterize, to_prepared, validate_region,
)
from qrs.images import pad_geometry


def test_mask_to_boxes_uses_pixel_edges_and_8_connectivity() -> None:
    mask = np.zeros((20, 10), dtype=bool)
    mask[2:5, 3:6] = True
    mask[5, 6] = True  # diagonal neighbour: same component
    mask[10:12, 0:2] = True
    assert mask_to_boxes(mask) == [[0.3, 0.1, 0.7, 0.3], [0.0, 0.5, 0.2, 0.6]]


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 30), st.integers(0, 30), st.integers(1, 8), st.integers(1, 8)), max_size=5))
def test_mask_to_boxes_matches_skimage(rects: list[tuple[int, int, int, int]]) -> None:
    mask = np.zeros((40, 40), dtype=bool)
    for y, x, h, w in rects:
        mask[y:y + h, x:x + w] = True
    ours = sorted(tuple(round(v * 40, 6) for v in b) for b in mask_to_boxes(mask))
    theirs = sorted((float(r.bbox[1]), float(r.bbox[0]), float(r.bbox[3]), float(r.bbox[2]))
                    for r in regionprops(label(mask, connectivity=2)))
    assert ours == theirs


def test_rasterize_box_round_trips_a_mask_component() -> None:
    mask = np.zeros((30, 20), dtype=bool)
    mask[4:9, 7:15] = True
    assert np.array_equal(rasterize(mask_to_boxes(mask), 30, 20), mask)


def test_rasterize_polygon_uses_pixel_centres() -> None:
    triangle = [[0.0, 0.0], [1.0, 0.0], [0.0, 0.9]]
    out = rasterize([triangle], 4, 4)
    centres = (np.arange(4) + 0.5) / 4
    expected = centres[None, :] + centres[:, None] / 0.9 < 1.0
    assert np.array_equal(out, expected)


def test_pad_transform_maps_box_into_letterbox() -> None:
    # 200 x 100 image padded into 64: scale 0.32, image 64 x 32 centred at y offset 16.
    assert pad_geometry(200, 100, 64) == (0.32, 0.0, 16.0)
    box = pixel_box_to_relative([50, 20, 150, 80], 200, 100)
    assert box == [0.25, 0.2, 0.75, 0.8]
    assert to_prepared(box, (200, 100), "pad", 64) == pytest.approx([0.25, (20 * 0.32 + 16) / 64, 0.75, (80 * 0.32 + 16) / 64])
    assert to_prepared(box, (200, 100), "stretch", 64) == box


def test_validate_region_messages() -> None:
    with pytest.raises(ValueError, match="x0 >= x1"):
        validate_region([0.5, 0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="box .* or a polygon"):
        validate_region("0,0,1,1")
    assert validate_region([[0, 0], [1, 0], [1, 1]]) == [[0.0, 0.0], [1.0, 0.0], [1.0, 1.0]]


def test_auto_roi_finds_bright_band_and_dark_part() -> None:
    img = np.full((60, 40, 3), 30, dtype=np.uint8)
    img[:, 10:30] = 200
    band = rasterize(auto_roi(img), 60, 40)
    assert band.sum() == 60 * 20 and band[:, 10:30].all()
    inverted = 255 - img
    assert np.array_equal(rasterize(auto_roi(inverted), 60, 40), band)
    assert auto_roi(np.zeros((8, 8, 3), np.uint8)) == [[0.0, 0.0, 1.0, 1.0]]
