"""Tests of the synthetic dataset generator: layouts, masks, determinism, realism and arguments."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from qrs.data.synth import DEFECT_KINDS, SHAPES, SynthError, parse_size, render_part, synthesize

SMALL = (115, 315)


def _files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def _read(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img)


def _check_mask(path: Path, image_path: Path) -> np.ndarray:
    """Open a mask, check it is an 8-bit L image of the image's size with only 0 and 255; return it as bool."""
    with Image.open(path) as mask, Image.open(image_path) as image:
        assert mask.mode == "L"
        assert image.mode == "RGB"
        assert mask.size == image.size == SMALL
        values = np.asarray(mask)
    assert set(np.unique(values).tolist()) <= {0, 255}
    return values == 255


def _band_columns(image: np.ndarray) -> tuple[int, int]:
    """First and last column of the bright band, from the column means of the image."""
    columns = image.astype(float).mean(axis=(0, 2))
    inside = np.flatnonzero(columns > (columns.min() + columns.max()) / 2)
    return int(inside[0]), int(inside[-1])


def _assert_in_band(image: np.ndarray, mask: np.ndarray) -> None:
    left, right = _band_columns(image)
    tolerance = math.ceil(0.03 * image.shape[1]) + 2  # the band edges drift by at most 3 % of the width
    columns = np.flatnonzero(mask.any(axis=0))
    assert columns.min() >= left - tolerance
    assert columns.max() <= right + tolerance
    assert right - left >= 0.5 * image.shape[1]


@pytest.fixture(scope="module")
def ksdd2(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("synth") / "ksdd2"
    return root, synthesize(root, "ksdd2", n_train=20, n_test=10, size=SMALL, seed=3)


@pytest.fixture(scope="module")
def sodf(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("synth") / "sodf"
    return root, synthesize(root, "sodf", n_train=20, n_test=10, size=SMALL, seed=3)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("synth") / "folder"
    return root, synthesize(root, "folder", n_train=20, n_test=10, size=SMALL, seed=3)


def test_ksdd2_files_counts_and_masks(ksdd2: tuple[Path, dict]) -> None:
    root, summary = ksdd2
    expected = set()
    for split, ids in (("train", range(10000, 10020)), ("test", range(10020, 10030))):
        expected |= {f"{split}/{i}.png" for i in ids} | {f"{split}/{i}_GT.png" for i in ids}
    assert _files(root) == expected
    defective = {}
    for split in ("train", "test"):
        images = sorted(p for p in (root / split).glob("*.png") if not p.stem.endswith("_GT"))
        masks = [_check_mask(p.with_name(f"{p.stem}_GT.png"), p) for p in images]
        defective[split] = sum(bool(m.any()) for m in masks)
        for path, mask in zip(images, masks):
            if mask.any():
                _assert_in_band(_read(path), mask)
    assert defective == {"train": 4, "test": 2}
    assert summary["counts"] == {"train": {"good": 16, "defective": 4}, "test": {"good": 8, "defective": 2}}
    assert summary["files"] == 60
    assert summary["layout"] == "ksdd2"
    assert summary["root"] == str(root)
    assert sum(summary["defect_types"].values()) >= 6


def test_sodf_files_counts_and_masks(sodf: tuple[Path, dict]) -> None:
    root, summary = sodf
    expected = set()
    for category in ("capsule", "softgel"):
        expected |= {f"{category}/negative/data/{i:03d}.png" for i in range(12)}
        expected |= {f"{category}/positive/data/{i:03d}.png" for i in range(3)}
        expected |= {f"{category}/positive/annotation/{i:03d}.png" for i in range(3)}
    assert _files(root) == expected
    assert summary["counts"] == {"capsule": {"good": 12, "defective": 3}, "softgel": {"good": 12, "defective": 3}}
    assert summary["files"] == 36
    for path in root.glob("*/positive/data/*.png"):
        mask = _check_mask(path.parent.parent / "annotation" / path.name, path)
        assert mask.any()
        image = _read(path).astype(float).mean(axis=2)
        edge = (slice(0, 5), slice(-5, None))
        corners = np.concatenate([image[rows, cols].ravel() for rows in edge for cols in edge])
        h, w = image.shape
        centre = image[h // 2 - 5 : h // 2 + 5, w // 2 - 5 : w // 2 + 5]
        bright = image > (np.median(corners) + np.median(centre)) / 2
        rows, cols = np.flatnonzero(bright.sum(axis=1) >= 3), np.flatnonzero(bright.sum(axis=0) >= 3)
        mask_rows, mask_cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        assert rows[0] - 2 <= mask_rows[0] and mask_rows[-1] <= rows[-1] + 2
        assert cols[0] - 2 <= mask_cols[0] and mask_cols[-1] <= cols[-1] + 2


def test_folder_files_counts_and_masks(folder: tuple[Path, dict]) -> None:
    root, summary = folder
    files = _files(root)
    good = {f for f in files if f.startswith("good/")}
    defect = {f for f in files if f.startswith("defect/")}
    masks = {f for f in files if f.startswith("masks/")}
    assert files == good | defect | masks
    assert len(good) == 24 and len(defect) == 6 and len(masks) == 6
    assert {Path(f).parent.name for f in defect} <= set(DEFECT_KINDS)
    stems = [Path(f).stem for f in good | defect]
    assert sorted(stems) == [f"part_{i:05d}" for i in range(30)]
    assert masks == {f"masks/{Path(f).stem}_mask.png" for f in defect}
    assert summary["counts"] == {"all": {"good": 24, "defective": 6}}
    assert summary["files"] == 36
    for name in defect:
        mask = _check_mask(root / "masks" / f"{Path(name).stem}_mask.png", root / name)
        assert mask.any()
        _assert_in_band(_read(root / name), mask)


@pytest.mark.parametrize("layout", ["ksdd2", "sodf", "folder"])
def test_same_seed_same_bytes_other_seed_other_images(tmp_path: Path, layout: str) -> None:
    def run(name: str, seed: int) -> dict[str, bytes]:
        root = tmp_path / name
        synthesize(root, layout, n_train=4, n_test=2, defect_rate=0.5, size=(64, 96), seed=seed)
        return {f: (root / f).read_bytes() for f in _files(root)}

    first, again, other = run("a", 5), run("b", 5), run("c", 6)
    assert first == again
    shared = [f for f in first.keys() & other.keys() if "mask" not in f and "_GT" not in f and "annotation" not in f]
    assert shared
    assert all(first[f] != other[f] for f in shared)


@pytest.mark.parametrize(
    ("n_train", "n_test", "rate", "train_defective", "test_defective"),
    [(3, 2, 0.1, 1, 1), (10, 1, 0.1, 1, 0), (5, 4, 0.0, 0, 0), (5, 4, 1.0, 5, 4), (10, 10, 0.25, 2, 2)],
)
def test_defect_counts_are_exact(
    tmp_path: Path, n_train: int, n_test: int, rate: float, train_defective: int, test_defective: int
) -> None:
    summary = synthesize(tmp_path / "out", n_train=n_train, n_test=n_test, defect_rate=rate, size=(32, 48), seed=1)
    assert summary["counts"]["train"] == {"good": n_train - train_defective, "defective": train_defective}
    assert summary["counts"]["test"] == {"good": n_test - test_defective, "defective": test_defective}


def test_global_brightness_does_not_reveal_the_class(tmp_path: Path) -> None:
    root = tmp_path / "pool"
    summary = synthesize(root, "folder", n_train=200, n_test=0, defect_rate=0.5, size=SMALL, seed=0)
    assert summary["counts"]["all"] == {"good": 100, "defective": 100}
    assert all(summary["defect_types"][kind] > 0 for kind in DEFECT_KINDS)
    paths = sorted(root.glob("good/*.png")) + sorted(root.glob("defect/*/*.png"))
    labels = np.array([p.parts[-2] != "good" for p in paths])
    means = np.array([_read(p).mean() for p in paths])
    try:
        from sklearn.metrics import roc_auc_score

        auroc = roc_auc_score(labels, means)
    except ImportError:
        from scipy.stats import rankdata

        ranks = rankdata(means)
        n_pos, n_neg = labels.sum(), (~labels).sum()
        auroc = (ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    assert 0.35 <= auroc <= 0.65


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_mask_is_exactly_what_changed_and_visible_at_96px(shape: str) -> None:
    """The defect-free twin (same generator state) differs only inside the mask, clearly even at 96x96."""
    for index in range(12):
        seed = np.random.SeedSequence(21, spawn_key=(index,))
        bad, mask, kinds = render_part(np.random.default_rng(seed), (230, 630), shape, True)
        good, no_mask, no_kinds = render_part(np.random.default_rng(seed), (230, 630), shape, False)
        assert bad.shape == (630, 230, 3) and bad.dtype == np.uint8
        assert mask.shape == (630, 230) and mask.dtype == bool
        assert not no_mask.any() and no_kinds == []
        assert 1 <= len(kinds) <= 3 and set(kinds) <= set(DEFECT_KINDS)
        change = np.abs(bad.astype(int) - good).max(axis=2)
        assert mask.any()
        assert not change[~mask].any()
        assert (change[mask] >= 3).mean() >= 0.85
        small_bad = np.asarray(Image.fromarray(bad).resize((96, 96), Image.BILINEAR), dtype=float)
        small_good = np.asarray(Image.fromarray(good).resize((96, 96), Image.BILINEAR), dtype=float)
        assert np.abs(small_bad - small_good).mean(axis=2).max() >= 20


def test_parse_size() -> None:
    assert parse_size("230x630") == (230, 630)
    assert parse_size(" 64 X 96 ") == (64, 96)
    for text in ("230", "230x", "230by630", "-5x10", "1.5x2"):
        with pytest.raises(ValueError, match="WIDTHxHEIGHT"):
            parse_size(text)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"layout": "kolektor"}, r"unknown layout 'kolektor'; valid layouts: ksdd2, sodf, folder"),
        ({"n_train": -1}, r"n_train must be a non-negative integer; got -1"),
        ({"n_test": -3}, r"n_test must be a non-negative integer; got -3"),
        ({"n_train": 2.5}, r"n_train must be a non-negative integer"),
        ({"defect_rate": 1.5}, r"defect_rate must be a number in \[0, 1\]; got 1.5"),
        ({"defect_rate": -0.1}, r"defect_rate must be a number in \[0, 1\]"),
        ({"defect_rate": float("nan")}, r"defect_rate must be a number in \[0, 1\]"),
        ({"size": (31, 100)}, r"size must be \(width, height\) with both sides at least 32 px; got \(31, 100\)"),
        ({"size": (100, 20)}, r"at least 32 px"),
        ({"size": (100,)}, r"size must be \(width, height\)"),
    ],
)
def test_bad_arguments_are_refused(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(SynthError, match=message) as caught:
        synthesize(tmp_path / "out", **kwargs)
    assert isinstance(caught.value, ValueError)
    assert not (tmp_path / "out").exists()


def test_unknown_shape_is_refused() -> None:
    with pytest.raises(SynthError, match="unknown part shape 'disc'; valid shapes: band, capsule, softgel"):
        render_part(np.random.default_rng(0), (64, 64), "disc", True)


def test_existing_output_is_not_overwritten(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(SynthError, match="already exists and is not empty"):
        synthesize(tmp_path / "out", n_train=2, n_test=0, size=(32, 32))
    assert _files(tmp_path / "out") == {"keep.txt"}
    (tmp_path / "empty").mkdir()
    synthesize(tmp_path / "empty", n_train=2, n_test=0, size=(32, 32))
    assert _files(tmp_path / "empty") == {f"train/{i}{end}.png" for i in (10000, 10001) for end in ("", "_GT")}
