"""Regions in relative coordinates: masks <-> boxes, the resize transforms, and rasterisation.

A region is either a box ``[x0, y0, x1, y1]`` or a polygon ``[[x, y], [x, y], ...]`` (at least three
points), in coordinates relative to the *original* image: x / width and y / height, so 0 is the left
or top edge and 1 the right or bottom edge. Boxes use pixel edges: a mask pixel at column c spans
``[c, c + 1)``, so a component covering columns 3..5 has x0 = 3 / W and x1 = 6 / W.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image
from matplotlib.path import Path as MplPath
from scipy import ndimage
from scipy.spatial import ConvexHull
from skimage.filters import threshold_otsu

from qrs.choices import RESIZE_MODES, ResizeMode
from qrs.errors import QrsError
from qrs.images import as_size, pad_geometry

Region = list  # a box [x0, y0, x1, y1] or a polygon [[x, y], ...]
FULL_ROI: list[Region] = [[0.0, 0.0, 1.0, 1.0]]
"""The whole image: the default region of interest."""



def is_box(region: Sequence) -> bool:
    """True for a box ``[x0, y0, x1, y1]``, False for a polygon ``[[x, y], ...]``."""
    return len(region) == 4 and all(isinstance(v, (int, float)) for v in region)


def validate_region(region: object) -> Region:
    """Return ``region`` as a list of floats, or raise ValueError saying what is wrong with it."""
    if not isinstance(region, (list, tuple)):
        raise ValueError(f"a region must be a box [x0, y0, x1, y1] or a polygon [[x, y], ...], got {region!r}")
    if is_box(region):
        x0, y0, x1, y1 = (float(v) for v in region)
        if not (x0 < x1 and y0 < y1):
            raise ValueError(f"box {list(region)} has x0 >= x1 or y0 >= y1")
        return [x0, y0, x1, y1]
    if len(region) < 3 or not all(isinstance(p, (list, tuple)) and len(p) == 2 for p in region):
        raise ValueError(f"a region must be a box [x0, y0, x1, y1] or a polygon [[x, y], ...], got {region!r}")
    return [[float(x), float(y)] for x, y in region]


def mask_to_boxes(mask: np.ndarray) -> list[list[float]]:
    """Relative bounding boxes of the 8-connected components of a boolean HxW mask.

    Components are labelled inside the bounding box of all foreground pixels: defects are small,
    and labelling the whole mask cost ``qrs prepare`` a quarter of a defective image's decode.
    """
    h, w = mask.shape
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return []
    top, left = int(rows[0]), int(cols[0])
    crop = mask[top:int(rows[-1]) + 1, left:int(cols[-1]) + 1]
    labels, _ = ndimage.label(crop, structure=np.ones((3, 3), dtype=bool))
    boxes = []
    for sl in ndimage.find_objects(labels):
        if sl is None:
            continue
        ys, xs = sl
        boxes.append([(left + xs.start) / w, (top + ys.start) / h, (left + xs.stop) / w, (top + ys.stop) / h])
    return boxes


def pixel_box_to_relative(box: Sequence[float], width: int, height: int) -> list[float]:
    """Convert a box in pixel edges of a ``width`` x ``height`` image to relative coordinates."""
    x0, y0, x1, y1 = (float(v) for v in box)
    rel = [x0 / width, y0 / height, x1 / width, y1 / height]
    return [min(max(v, 0.0), 1.0) for v in rel]


def to_prepared(region: Region, orig_size: tuple[int, int], mode: ResizeMode, size: int | Sequence[int]) -> Region:
    """Map a region relative to the original image (``orig_size`` = (width, height)) into coordinates
    relative to the prepared image of ``size`` (one side, or (height, width)).

    ``stretch`` leaves relative coordinates unchanged; ``pad`` shrinks them into the letterbox.
    """
    if mode == "stretch":
        return region
    if mode != "pad":
        raise ValueError(f"unknown resize mode {mode!r}; expected one of {RESIZE_MODES}")
    width, height = orig_size
    out_h, out_w = as_size(size)
    scale, off_x, off_y = pad_geometry(width, height, (out_h, out_w))

    def point(x: float, y: float) -> list[float]:
        return [(x * width * scale + off_x) / out_w, (y * height * scale + off_y) / out_h]

    if is_box(region):
        x0, y0, x1, y1 = region
        return point(x0, y0) + point(x1, y1)
    return [point(x, y) for x, y in region]


def rasterize(regions: Sequence[Region], height: int, width: int) -> np.ndarray:
    """Boolean HxW mask of the pixels whose centres lie inside any of the relative regions."""
    out = np.zeros((height, width), dtype=bool)
    cx = (np.arange(width) + 0.5) / width
    cy = (np.arange(height) + 0.5) / height
    polygons = []
    for region in regions:
        if is_box(region):
            x0, y0, x1, y1 = region
            cols = (cx >= x0) & (cx < x1)
            rows = (cy >= y0) & (cy < y1)
            out |= rows[:, None] & cols[None, :]
        else:
            polygons.append(region)
    if polygons:
        centres = np.stack(np.meshgrid(cx, cy), axis=-1).reshape(-1, 2)
        for poly in polygons:
            inside = MplPath(np.asarray(poly, dtype=float)).contains_points(centres)
            out |= inside.reshape(height, width)
    return out


def auto_roi(rgb: np.ndarray | Image.Image) -> list[Region]:
    """The part as a relative polygon: the convex hull of the largest foreground component after
    Otsu thresholding.

    Foreground is the side of the Otsu threshold that touches the image border least, so both a
    bright part on a dark background and a dark part on a bright one are found. Components at least
    a tenth the size of the largest are kept with it, so a part cut in two by a dark crack stays
    whole. Falls back to the whole image when the image is flat.
    """
    gray = np.asarray(rgb, dtype=np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    if float(gray.max()) - float(gray.min()) < 1.0:
        return [[0.0, 0.0, 1.0, 1.0]]
    above = gray > threshold_otsu(gray)
    border = np.concatenate([above[0], above[-1], above[:, 0], above[:, -1]])
    fg = ~above if border.mean() > 0.5 else above
    labels, n = ndimage.label(fg)
    if n == 0:
        return [[0.0, 0.0, 1.0, 1.0]]
    sizes = np.bincount(labels.ravel())[1:]
    keep = np.flatnonzero(sizes >= 0.1 * sizes.max()) + 1
    return [mask_to_hull(np.isin(labels, keep))]


def mask_to_hull(mask: np.ndarray) -> Region:
    """Relative convex-hull polygon around all pixels (as unit squares) of a non-empty mask."""
    h, w = mask.shape
    edge = mask & ~ndimage.binary_erosion(mask)
    ys, xs = np.nonzero(edge)
    corners = np.concatenate([np.stack([xs + dx, ys + dy], axis=1) for dx in (0, 1) for dy in (0, 1)])
    corners = np.unique(corners, axis=0)
    if len(corners) < 3 or np.linalg.matrix_rank(corners - corners[0]) < 2:
        return mask_to_boxes(mask)[0]
    hull = ConvexHull(corners)
    return [[float(x) / w, float(y) / h] for x, y in corners[hull.vertices]]


RoiSpec = Union[str, list, dict]
"""``"full"``, ``"auto"``, regions for every image, or image name -> regions (see :func:`parse_roi`)."""


def parse_roi(value: object, *, source: str = "roi") -> RoiSpec:
    """Check an ROI given as ``"full"``, ``"auto"``, a list of relative regions (boxes or polygons)
    for every image, or an object image name (file name, stem or path) -> list of regions.

    A single box is accepted where a list of regions is expected. Raises QrsError naming ``source``.
    """
    if value in ("full", "auto"):
        return value

    def regions(item: object, where: str) -> list[Region]:
        if isinstance(item, (list, tuple)) and item and is_box(item):
            item = [item]
        if not isinstance(item, (list, tuple)) or not item:
            raise QrsError(f"{where} must be a non-empty list of boxes [x0, y0, x1, y1] or polygons "
                           f"[[x, y], ...] relative to the image, got {item!r}"[:300])
        try:
            return [validate_region(r) for r in item]
        except (TypeError, ValueError) as exc:
            raise QrsError(f"{where}: {exc}"[:300]) from exc

    if isinstance(value, dict):
        if not value:
            raise QrsError(f"{source} is an empty object; expected image name -> list of regions")
        return {str(k): regions(v, f"{source}[{k!r}]") for k, v in value.items()}
    return regions(value, source)


def load_roi(spec: str) -> RoiSpec:
    """``--roi``: ``full``, ``auto`` or the path of a JSON file of regions (see :func:`parse_roi`)."""
    if spec in ("full", "auto"):
        return spec
    path = Path(spec)
    if not path.is_file():
        raise QrsError(f"--roi must be full, auto or a JSON file of relative regions; {spec} is no file")
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise QrsError(f"cannot read ROI file {path}: {exc}") from exc
    return parse_roi(value, source=f"ROI file {path}")


def roi_regions(spec: RoiSpec, name: str, rgb: np.ndarray | Image.Image) -> list[Region]:
    """The relative ROI regions of one image: per-name entries match the name as given, the file
    name or the stem; an image without an entry is inspected whole (as in ``qrs prepare``)."""
    if spec == "full":
        return FULL_ROI
    if spec == "auto":
        return auto_roi(rgb)
    if isinstance(spec, list):
        return spec
    for key in (name, Path(name).name, Path(name).stem):
        if key in spec:
            return spec[key]
    return FULL_ROI
