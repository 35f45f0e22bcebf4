"""Synthetic visual-inspection datasets, written in the raw layouts of docs/method.md#dataset-layouts.

Why: the whole pipeline (prepare, train, extract, analyze) needs data with exactly known defect
masks to be tested and demonstrated without downloading KolektorSDD2 or Sensum SODF. Each image is
a brushed-metal-like part (the region of interest) on a darker background; defective images carry
1-3 scratches, spots, cracks or dents drawn only inside the part, and the mask marks exactly the
pixels each defect drew. Defects are sized and contrasted to stay visible after the image is
stretched to 64x64 or 96x96, and per-image brightness and contrast vary so that the class cannot
be read from the global brightness.
"""

from __future__ import annotations

import math
import os
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage
from tqdm import tqdm

from qrs.atomic import atomic_dir
from qrs.errors import QrsError

DEFECT_KINDS = ("scratch", "spot", "crack", "dent")
MIN_SIDE = 32
REFERENCE_SIDE = 230
"""Defect sizes are stated for images whose short side is this long (KSDD2's width) and scale with it."""
KSDD2_FIRST_ID = 10000
PNG_COMPRESS_LEVEL = 1
"""Fast zlib level: noisy textures barely compress more at higher levels."""
_EDGE_CUT = 0.25
"""Profile level below which a defect leaves a pixel untouched, so that its mask is exact."""
_SIZE_PATTERN = re.compile(r"\s*(\d+)\s*[xX]\s*(\d+)\s*")


class SynthError(QrsError, ValueError):
    """Bad arguments to the generator, or an output folder that is already in use."""


Box = tuple[slice, slice]
Drawn = tuple[Box, np.ndarray, np.ndarray]
"""A defect: its bounding box in the image, the intensity change there and its support (the mask)."""


def parse_size(text: str) -> tuple[int, int]:
    """Read an image size written ``WIDTHxHEIGHT`` (e.g. ``230x630``) as ``(width, height)``."""
    match = _SIZE_PATTERN.fullmatch(text)
    if match is None:
        raise SynthError(f"size must be written WIDTHxHEIGHT in pixels, e.g. 230x630; got {text!r}")
    return int(match.group(1)), int(match.group(2))


# Part shapes: each returns the signed distance to the part outline (negative inside, in pixels)
# and a shading factor (broadcastable to HxW) that gives the part its relief.


def _axes(rng: np.random.Generator, w: int, h: int, tilt: float) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates along and across the long image side, from a slightly shifted centre."""
    ys, xs = _box_grid((slice(0, h), slice(0, w)))
    cy = h / 2 + rng.uniform(-0.04, 0.04) * h
    cx = w / 2 + rng.uniform(-0.04, 0.04) * w
    angle = (0.0 if h >= w else math.pi / 2) + rng.uniform(-tilt, tilt)
    dy, dx = math.cos(angle), math.sin(angle)
    along = (ys - cy) * dy + (xs - cx) * dx
    across = (xs - cx) * dy - (ys - cy) * dx
    return along, across


def _band(rng: np.random.Generator, w: int, h: int) -> tuple[np.ndarray, np.ndarray]:
    """A strip along the long image side (vertical, as in KSDD2) over 55-80 % of the short side.

    Its edges drift by at most 3 % of the short side: a slight tilt plus a slow wave.
    """
    across, along = (w, h) if h >= w else (h, w)
    width = rng.uniform(0.55, 0.80) * across
    left = (across - width) * rng.uniform(0.3, 0.7)
    t = np.linspace(-1.0, 1.0, along, dtype=np.float32)
    wave = np.sin(math.pi * rng.uniform(0.5, 2.0) * t + rng.uniform(0.0, 2 * math.pi))
    drift = (rng.uniform(-0.02, 0.02) * t + rng.uniform(0.0, 0.01) * wave) * across
    x0 = (left + drift)[:, None]
    xs = np.arange(across, dtype=np.float32)[None, :]
    sdf = np.maximum(x0 - xs, xs - (x0 + width))
    return (sdf if h >= w else sdf.T), np.ones((1, 1), np.float32)


def _capsule(rng: np.random.Generator, w: int, h: int) -> tuple[np.ndarray, np.ndarray]:
    """An elongated pill (a stadium) along the long image side, domed across its width."""
    length = rng.uniform(0.6, 0.8) * max(w, h)
    radius = min(length * rng.uniform(0.16, 0.22), 0.36 * min(w, h))
    half = max(length / 2 - radius, 0.0)
    along, across = _axes(rng, w, h, tilt=0.08)
    dist = np.hypot(along - np.clip(along, -half, half), across)
    shading = 1.0 - 0.35 * np.minimum(dist / radius, 1.0) ** 2
    return dist - radius, shading


def _softgel(rng: np.random.Generator, w: int, h: int) -> tuple[np.ndarray, np.ndarray]:
    """A rounder oval blob, domed towards its rim."""
    across_radius = rng.uniform(0.30, 0.40) * min(w, h)
    along_radius = min(across_radius * rng.uniform(1.1, 1.45), 0.45 * max(w, h))
    along, across = _axes(rng, w, h, tilt=0.25)
    rho = np.hypot(along / along_radius, across / across_radius)
    shading = 1.0 - 0.35 * np.minimum(rho, 1.0) ** 2
    return (rho - 1.0) * min(across_radius, along_radius), shading


SHAPES: dict[str, Callable[[np.random.Generator, int, int], tuple[np.ndarray, np.ndarray]]] = {
    "band": _band,
    "capsule": _capsule,
    "softgel": _softgel,
}


# Surfaces.


def _illumination(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Smooth light falloff: a random linear gradient plus one broad wave, about +-15 %."""
    ys = np.linspace(-0.5, 0.5, h, dtype=np.float32)[:, None]
    xs = np.linspace(-0.5, 0.5, w, dtype=np.float32)[None, :]
    gy, gx = (float(g) for g in rng.uniform(-0.15, 0.15, size=2))
    fy, fx = (float(f) for f in rng.uniform(0.3, 1.2, size=2) * rng.choice([-1.0, 1.0], size=2))
    amplitude = rng.uniform(0.0, 0.06)
    phase_y = 2 * np.pi * fy * ys + rng.uniform(0, 2 * np.pi)
    phase_x = 2 * np.pi * fx * xs
    # cos(a + b) written separably, so only products are computed per pixel.
    wave = np.cos(phase_y) * np.cos(phase_x) - np.sin(phase_y) * np.sin(phase_x)
    return (1.0 + gy * ys + amplitude * wave) + gx * xs


def _brushed(rng: np.random.Generator, h: int, w: int, contrast: float) -> np.ndarray:
    """Zero-mean brushed-metal texture: long streaks along the long side, broad stripes, grain."""
    axis = 0 if h >= w else 1
    long_side, short_side = (h, w) if axis == 0 else (w, h)
    streak = max(3, int(long_side * rng.uniform(0.1, 0.3)))
    streaks = ndimage.uniform_filter1d(rng.standard_normal((h, w), dtype=np.float32), streak, axis=axis)
    stripes = ndimage.gaussian_filter1d(rng.standard_normal(short_side, dtype=np.float32), 2.0)
    stripes /= max(float(stripes.std()), 1e-6)
    stripes = stripes[None, :] if axis == 0 else stripes[:, None]
    grain = rng.standard_normal((h, w), dtype=np.float32)
    return contrast * (0.035 * math.sqrt(streak) * streaks + 0.03 * stripes + 0.018 * grain)


def _tint(rng: np.random.Generator, spread: float) -> np.ndarray:
    """A near-grey RGB factor with mean 1."""
    tint = 1.0 + rng.uniform(-spread, spread, size=3)
    return (tint / tint.mean()).astype(np.float32)


# Defects: each draws around a centre inside the part and returns its box, change and support.


def _box(cy: float, cx: float, ry: float, rx: float, shape: tuple[int, int]) -> Box:
    h, w = shape
    y0, y1 = max(int(cy - ry) - 1, 0), min(int(cy + ry) + 2, h)
    x0, x1 = max(int(cx - rx) - 1, 0), min(int(cx + rx) + 2, w)
    return slice(y0, y1), slice(x0, x1)


def _box_grid(box: Box) -> tuple[np.ndarray, np.ndarray]:
    ys = np.arange(box[0].start, box[0].stop, dtype=np.float32)[:, None]
    xs = np.arange(box[1].start, box[1].stop, dtype=np.float32)[None, :]
    return ys, xs


def _finish(box: Box, profile: np.ndarray, change: float | np.ndarray) -> Drawn:
    """Cut the profile's faint fringe so the support is exactly the pixels the defect changes."""
    support = profile >= _EDGE_CUT
    return box, np.where(support, change * profile, 0.0).astype(np.float32), support


def _walk(start: np.ndarray, headings: np.ndarray, step: float) -> np.ndarray:
    """Polyline vertices (y, x) from ``start``, one step of ``step`` pixels per heading (radians)."""
    moves = np.column_stack([np.sin(headings), np.cos(headings)]) * step
    return np.vstack([start, start + np.cumsum(moves, axis=0)])


def _stroke(paths: list[tuple[np.ndarray, np.ndarray]], shape: tuple[int, int]) -> tuple[Box, np.ndarray]:
    """Anti-aliased thick polylines: profile 1 on the stroke, falling to 0 over a pixel at its edge.

    ``paths`` holds (vertices Nx2 as y, x; half-widths N) per polyline. The centre lines are
    rasterised every half pixel and the distance transform gives each pixel its nearest centre
    point, whose half-width sets the local thickness.
    """
    dense = []
    for vertices, radii in paths:
        lengths = np.hypot(*np.diff(vertices, axis=0).T)
        t = np.concatenate([[0.0], np.cumsum(lengths)])
        s = np.arange(0.0, t[-1] + 0.5, 0.5)
        columns = (vertices[:, 0], vertices[:, 1], radii)
        dense.append(np.column_stack([np.interp(s, t, column) for column in columns]))
    points = np.concatenate(dense)
    pad = float(points[:, 2].max()) + 2.0
    lo, hi = points[:, :2].min(axis=0), points[:, :2].max(axis=0)
    centre, half = (lo + hi) / 2, (hi - lo) / 2 + pad
    box = _box(centre[0], centre[1], half[0], half[1], shape)
    iy = np.rint(points[:, 0]).astype(int) - box[0].start
    ix = np.rint(points[:, 1]).astype(int) - box[1].start
    crop = (box[0].stop - box[0].start, box[1].stop - box[1].start)
    keep = (iy >= 0) & (iy < crop[0]) & (ix >= 0) & (ix < crop[1])
    line = np.zeros(crop, dtype=bool)
    radius = np.zeros(crop, dtype=np.float32)
    line[iy[keep], ix[keep]] = True
    radius[iy[keep], ix[keep]] = points[keep, 2]
    dist, (ny, nx) = ndimage.distance_transform_edt(~line, return_indices=True)
    return box, np.clip(radius[ny, nx] + 0.5 - dist, 0.0, 1.0).astype(np.float32)


def _amplitude(rng: np.random.Generator, base: float) -> float:
    """Defect contrast: 0.5x to 1.5x a clearly visible base (intensity units in [0, 1])."""
    return base * rng.uniform(0.5, 1.5)


def _scratch(rng: np.random.Generator, centre: np.ndarray, scale: float, shape: tuple[int, int]) -> Drawn:
    """A thin long line (3.5-6 px, 80-260 px at the reference size), straight or gently curved."""
    length = rng.uniform(80, 260) * scale
    steps = 32
    bend = rng.uniform(-1.2, 1.2) * np.linspace(-0.5, 0.5, steps)
    vertices = _walk(np.zeros(2), rng.uniform(0, np.pi) + bend, length / steps)
    vertices += centre - vertices[steps // 2]
    radii = np.full(steps + 1, max(rng.uniform(1.75, 3.0) * scale, 1.0))
    box, profile = _stroke([(vertices, radii)], shape)
    sign = 1.0 if rng.random() < 0.6 else -1.0
    return _finish(box, profile, sign * _amplitude(rng, 0.30))


def _crack(rng: np.random.Generator, centre: np.ndarray, scale: float, shape: tuple[int, int]) -> Drawn:
    """A jagged dark line (70-200 px, 3-6.5 px wide at the reference size) with 1-3 branches, narrowing."""
    length = rng.uniform(70, 200) * scale
    steps = 16
    step = length / steps
    heading = rng.uniform(0, 2 * np.pi)
    main = _walk(np.zeros(2), heading + rng.normal(0.0, 0.45, steps), step)
    main += centre - main[steps // 2]
    width = max(rng.uniform(2.0, 3.25) * scale, 1.0)
    paths = [(main, width * np.linspace(1.0, 0.75, steps + 1))]
    for _ in range(rng.integers(1, 4)):
        fork = rng.integers(2, steps - 1)
        turn = rng.choice([-1.0, 1.0]) * rng.uniform(0.5, 1.1)
        branch_steps = 6
        branch = _walk(main[fork], heading + turn + rng.normal(0.0, 0.45, branch_steps), step * rng.uniform(0.5, 0.9))
        paths.append((branch, np.full(branch_steps + 1, 0.8 * width)))
    box, profile = _stroke(paths, shape)
    return _finish(box, profile, -_amplitude(rng, 0.32))


def _spot(rng: np.random.Generator, centre: np.ndarray, scale: float, shape: tuple[int, int]) -> Drawn:
    """An irregular blob (18-48 px across at the reference size), darker or brighter, soft-edged."""
    radius = rng.uniform(9, 24) * scale
    aspect = rng.uniform(0.6, 1.0)
    angle = rng.uniform(0, np.pi)
    box = _box(centre[0], centre[1], 1.4 * radius, 1.4 * radius, shape)
    ys, xs = _box_grid(box)
    dy, dx = ys - centre[0], xs - centre[1]
    u = dy * math.cos(angle) + dx * math.sin(angle)
    v = (dx * math.cos(angle) - dy * math.sin(angle)) / aspect
    theta = np.arctan2(v, u)
    edge = np.ones_like(theta)
    for k, amp, phase in zip((2, 3, 4), rng.uniform(0, 0.12, 3), rng.uniform(0, 2 * np.pi, 3)):
        edge += amp * np.cos(k * theta + phase)
    profile = np.clip((radius * edge - np.hypot(u, v)) / (0.35 * radius), 0.0, 1.0)
    sign = -1.0 if rng.random() < 0.7 else 1.0
    return _finish(box, profile, sign * _amplitude(rng, 0.25))


def _dent(rng: np.random.Generator, centre: np.ndarray, scale: float, shape: tuple[int, int]) -> Drawn:
    """A soft elliptical depression (28-72 px long at the reference size), shadow on one side, highlight opposite.

    Its mask is the whole dent footprint, including the line where shadow turns into highlight.
    """
    major = rng.uniform(14, 36) * scale
    minor = major * rng.uniform(0.55, 1.0)
    angle, light = rng.uniform(0, np.pi), rng.uniform(0, 2 * np.pi)
    box = _box(centre[0], centre[1], major, major, shape)
    ys, xs = _box_grid(box)
    dy, dx = ys - centre[0], xs - centre[1]
    u = (dy * math.cos(angle) + dx * math.sin(angle)) / major
    v = (dx * math.cos(angle) - dy * math.sin(angle)) / minor
    window = np.clip((1.0 - np.hypot(u, v)) / 0.3, 0.0, 1.0)
    shade = 1.2 * (u * math.cos(light) + v * math.sin(light)) - 0.3
    return _finish(box, window, _amplitude(rng, 0.30) * shade)


DEFECTS: dict[str, Callable[[np.random.Generator, np.ndarray, float, tuple[int, int]], Drawn]] = {
    "scratch": _scratch,
    "spot": _spot,
    "crack": _crack,
    "dent": _dent,
}


def render_part(
    rng: np.random.Generator, size: tuple[int, int], shape: str, defective: bool
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Render one part: (HxWx3 uint8 RGB image, HxW bool defect mask, defect kinds in drawing order).

    ``size`` is (width, height); ``shape`` one of :data:`SHAPES`. Defects (1-3 when ``defective``)
    lie inside the part and the mask is exactly the pixels they changed. They are drawn last, so the
    same generator state renders the same part with and without them.
    """
    if shape not in SHAPES:
        raise SynthError(f"unknown part shape {shape!r}; valid shapes: {', '.join(SHAPES)}")
    w, h = size
    sdf, shading = SHAPES[shape](rng, w, h)
    level = rng.uniform(0.35, 0.70)
    contrast = rng.uniform(0.7, 1.3)
    part = level * shading * _illumination(rng, h, w) + _brushed(rng, h, w, contrast)
    background = level * rng.uniform(0.25, 0.45) * _illumination(rng, h, w)
    background += 0.012 * rng.standard_normal((h, w), dtype=np.float32)
    part_tint, background_tint = _tint(rng, 0.03), _tint(rng, 0.08)

    mask = np.zeros((h, w), dtype=bool)
    kinds: list[str] = []
    if defective:
        roi = sdf <= 0
        inner = np.flatnonzero(sdf <= max(-0.06 * min(w, h), float(sdf.min())))
        scale = min(w, h) / REFERENCE_SIDE
        for _ in range(rng.integers(1, 4)):
            kind = DEFECT_KINDS[rng.integers(len(DEFECT_KINDS))]
            centre = np.array(divmod(int(inner[rng.integers(inner.size)]), w), dtype=np.float64)
            box, change, support = DEFECTS[kind](rng, centre, scale, (h, w))
            support &= roi[box]
            part[box] += np.where(support, change, 0.0)
            mask[box] |= support
            kinds.append(kind)

    alpha = np.clip(0.5 - sdf, 0.0, 1.0)
    fore, back = alpha * part, (1.0 - alpha) * background
    image = np.empty((h, w, 3), dtype=np.uint8)
    for channel in range(3):
        value = fore * (255.0 * part_tint[channel]) + back * (255.0 * background_tint[channel])
        image[:, :, channel] = np.rint(np.clip(value, 0.0, 255.0, out=value), out=value)
    return image, mask, kinds


# Layouts: a plan lists the images (which are defective, where they go); a writer saves one image.


@dataclass(frozen=True)
class _Item:
    index: int
    """Position in the plan; seeds the image's own generator."""
    group: str
    """Split (ksdd2), category (sodf) or "all" (folder)."""
    name: str
    shape: str
    defective: bool


def _defect_count(n: int, rate: float) -> int:
    """round(rate * n) defective images, at least one when rate > 0 and n >= 2."""
    count = round(rate * n)
    return max(count, 1) if rate > 0 and n >= 2 else count


def _defect_flags(rng: np.random.Generator, n: int, rate: float) -> list[bool]:
    """Exactly :func:`_defect_count` defective positions among ``n``, shuffled by ``rng``."""
    flags = np.zeros(n, dtype=bool)
    flags[rng.permutation(n)[: _defect_count(n, rate)]] = True
    return flags.tolist()


def _save(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format="PNG", compress_level=PNG_COMPRESS_LEVEL)


def _mask_png(mask: np.ndarray) -> np.ndarray:
    return mask.astype(np.uint8) * 255


def _plan_ksdd2(rng: np.random.Generator, n_train: int, n_test: int, rate: float) -> list[_Item]:
    """Integer ids from 10000, train first then test, unique across splits."""
    items: list[_Item] = []
    for split, n in (("train", n_train), ("test", n_test)):
        for flag in _defect_flags(rng, n, rate):
            items.append(_Item(len(items), split, str(KSDD2_FIRST_ID + len(items)), "band", flag))
    return items


def _write_ksdd2(root: Path, item: _Item, image: np.ndarray, mask: np.ndarray, kinds: list[str]) -> int:
    """``<split>/<id>.png`` and, for every image, ``<split>/<id>_GT.png``."""
    _save(root / item.group / f"{item.name}.png", image)
    _save(root / item.group / f"{item.name}_GT.png", _mask_png(mask))
    return 2


def _plan_sodf(rng: np.random.Generator, n_train: int, n_test: int, rate: float) -> list[_Item]:
    """Half the images per category; NNN numbering from 000 per category and class folder."""
    total = n_train + n_test
    items: list[_Item] = []
    for category, n in (("capsule", (total + 1) // 2), ("softgel", total // 2)):
        numbers: Counter[bool] = Counter()
        for flag in _defect_flags(rng, n, rate):
            items.append(_Item(len(items), category, f"{numbers[flag]:03d}", category, flag))
            numbers[flag] += 1
    return items


def _write_sodf(root: Path, item: _Item, image: np.ndarray, mask: np.ndarray, kinds: list[str]) -> int:
    """``<category>/{negative,positive}/data/<NNN>.png``; masks for positives under annotation/."""
    folder = root / item.group / ("positive" if item.defective else "negative")
    _save(folder / "data" / f"{item.name}.png", image)
    if not item.defective:
        return 1
    _save(folder / "annotation" / f"{item.name}.png", _mask_png(mask))
    return 2


def _plan_folder(rng: np.random.Generator, n_train: int, n_test: int, rate: float) -> list[_Item]:
    """All images in one pool named ``part_NNNNN``."""
    flags = _defect_flags(rng, n_train + n_test, rate)
    return [_Item(i, "all", f"part_{i:05d}", "band", flag) for i, flag in enumerate(flags)]


def _write_folder(root: Path, item: _Item, image: np.ndarray, mask: np.ndarray, kinds: list[str]) -> int:
    """``good/<name>.png``, or ``defect/<first defect kind>/<name>.png`` with ``masks/<name>_mask.png``."""
    if not item.defective:
        _save(root / "good" / f"{item.name}.png", image)
        return 1
    _save(root / "defect" / kinds[0] / f"{item.name}.png", image)
    _save(root / "masks" / f"{item.name}_mask.png", _mask_png(mask))
    return 2


@dataclass(frozen=True)
class _Layout:
    groups: tuple[str, ...]
    plan: Callable[[np.random.Generator, int, int, float], list[_Item]]
    write: Callable[[Path, _Item, np.ndarray, np.ndarray, list[str]], int]


LAYOUTS: dict[str, _Layout] = {
    "ksdd2": _Layout(("train", "test"), _plan_ksdd2, _write_ksdd2),
    "sodf": _Layout(("capsule", "softgel"), _plan_sodf, _write_sodf),
    "folder": _Layout(("all",), _plan_folder, _write_folder),
}


def _check_arguments(layout: str, n_train: Any, n_test: Any, defect_rate: Any, size: Any) -> None:
    if layout not in LAYOUTS:
        raise SynthError(f"unknown layout {layout!r}; valid layouts: {', '.join(LAYOUTS)}")
    for name, n in (("n_train", n_train), ("n_test", n_test)):
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
            raise SynthError(f"{name} must be a non-negative integer; got {n!r}")
    if isinstance(defect_rate, bool) or not isinstance(defect_rate, (int, float)) or not 0 <= defect_rate <= 1:
        raise SynthError(f"defect_rate must be a number in [0, 1]; got {defect_rate!r}")
    if (
        not isinstance(size, (tuple, list))
        or len(size) != 2
        or not all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) for s in size)
        or min(size) < MIN_SIDE
    ):
        raise SynthError(f"size must be (width, height) with both sides at least {MIN_SIDE} px; got {size!r}")


def synthesize(
    out: str | os.PathLike[str],
    layout: str = "ksdd2",
    *,
    n_train: int = 200,
    n_test: int = 100,
    defect_rate: float = 0.2,
    size: tuple[int, int] = (230, 630),
    seed: int = 0,
) -> dict[str, Any]:
    """Write a synthetic dataset in a raw ``layout`` (ksdd2, sodf or folder) at ``out``; return a summary.

    Each group (ksdd2 split, sodf category, or the single folder pool) has exactly
    ``round(defect_rate * n)`` defective images (at least one when defect_rate > 0 and n >= 2) at
    seeded positions; sodf splits n_train + n_test between capsule and softgel, folder pools them.
    The same arguments give byte-identical files. ``out`` must not exist or be an empty directory;
    it is built aside and renamed into place, so an interrupted run leaves nothing behind.
    """
    _check_arguments(layout, n_train, n_test, defect_rate, size)
    target = Path(out)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise SynthError(f"{target} already exists and is not empty; choose a new output folder")
    spec = LAYOUTS[layout]
    items = spec.plan(np.random.default_rng(seed), int(n_train), int(n_test), float(defect_rate))
    counts = {group: {"good": 0, "defective": 0} for group in spec.groups}
    kinds_drawn: Counter[str] = Counter()
    files = 0
    with atomic_dir(target, overwrite=True) as root:
        for item in tqdm(items, desc=f"synthesize {layout}", unit="img", disable=None):
            rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(item.index,)))
            image, mask, kinds = render_part(rng, (int(size[0]), int(size[1])), item.shape, item.defective)
            files += spec.write(root, item, image, mask, kinds)
            counts[item.group]["defective" if item.defective else "good"] += 1
            kinds_drawn.update(kinds)
    return {
        "layout": layout,
        "root": str(target),
        "size": [int(size[0]), int(size[1])],
        "seed": seed,
        "defect_rate": float(defect_rate),
        "counts": counts,
        "defect_types": {kind: kinds_drawn[kind] for kind in DEFECT_KINDS},
        "files": files,
    }
