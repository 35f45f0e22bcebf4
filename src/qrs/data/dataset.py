"""The prepared dataset on disk (docs/method.md#prepared-dataset).

Images are decoded once into a uint8 memory map per split (``cache/<split>-<hash>.npy``), so
training epochs never decode PNGs again; the cache is keyed by the index's hash and rebuilt when it
changes. This module does not import torch (``qrs prepare`` ends by reading what it wrote); the
torch view of a split is :class:`qrs.data.split_dataset.SplitDataset`.
"""

from __future__ import annotations

import json
import os
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from PIL import Image
from tqdm.auto import tqdm

from qrs.atomic import atomic_path
from qrs.choices import SPLITS
from qrs.errors import DatasetError
from qrs.files import ignored_dirs_note
from qrs.images import Size, as_size, size_text

if TYPE_CHECKING:
    from qrs.data.split_dataset import SplitDataset

__all__ = ["DatasetError", "PreparedDataset", "load_prepared_image"]


class PreparedDataset:
    """A prepared dataset directory: ``index.csv``, ``meta.json``, images, masks and coordinates."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        for name in ("index.csv", "meta.json"):
            if not (self.root / name).is_file():
                raise DatasetError(
                    f"{self.root} is not a prepared dataset: {name} is missing (run `qrs prepare` first)"
                )
        self.meta: dict[str, Any] = json.loads((self.root / "meta.json").read_text())
        index = pd.read_csv(self.root / "index.csv", dtype={"id": str, "mask": str, "defect_type": str},
                            keep_default_na=False)
        index["roi"] = index["roi"].map(json.loads)
        index["defects"] = index["defects"].map(json.loads)
        self.index = index

    @property
    def img_size(self) -> Size:
        """(height, width) of the prepared images (datasets of older versions store one side)."""
        return as_size(self.meta["img_size"])

    @property
    def dataset_hash(self) -> str:
        return str(self.meta["dataset_hash"])

    def summary(self) -> str:
        """One line saying what the prepared dataset holds."""
        counts = ", ".join(f"{s}: {c['good']} good / {c['defective']} defective" for s, c in self.meta["counts"].items())
        n_skip = self.meta["n_skipped"]
        skipped = f"skipped {n_skip}" + (f" (see {self.root / 'skipped.csv'})" if n_skip else "")
        ignored = ignored_dirs_note(self.meta.get("n_ignored_dirs", 0))
        return f"prepared dataset {self.root}: {self.meta['n_images']} images ({counts}); {skipped}" + (
            f"; {ignored}" if ignored else "")

    def rows(self, split: str) -> pd.DataFrame:
        """The index rows of one split, in index order; an unknown or empty split is an error."""
        if split not in SPLITS:
            raise DatasetError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
        rows = self.index[self.index["split"] == split].reset_index(drop=True)
        if rows.empty:
            raise DatasetError(f"split {split!r} of {self.root} has no images")
        return rows

    def split(self, split: str, *, coords: dict[str, dict[str, list]] | None = None,
              with_masks: bool = True, with_defect: bool = False) -> "SplitDataset":
        """A torch Dataset over one split (``coords`` overrides the ROI/defect coordinates per id;
        ``with_defect`` without ``with_masks``: the defect mask only)."""
        from qrs.data.split_dataset import SplitDataset

        return SplitDataset(self.rows(split), split=split, root=self.root, img_size=self.img_size,
                            resize=self.meta["resize"], images=partial(self.image_cache, split), coords=coords,
                            with_masks=with_masks, with_defect=with_defect)

    def image_cache(self, split: str, *, progress: bool = True) -> np.ndarray:
        """The split's images as an N x H x W x 3 uint8 memory map, built on first use."""
        rows = self.rows(split)
        size = self.img_size
        path = self.root / "cache" / f"{split}-{self.dataset_hash}.npy"
        shape = (len(rows), *size, 3)
        try:
            cached = np.load(path, mmap_mode="r")
            if cached.shape == shape and cached.dtype == np.uint8:
                return cached
        except (OSError, ValueError):
            pass
        with atomic_path(path) as tmp:
            arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
            for i, rel in enumerate(tqdm(rows["image"], desc=f"cache {split}", unit="img", disable=not progress)):
                arr[i] = load_prepared_image(self.root / rel, size)
            arr.flush()
            del arr
        return np.load(path, mmap_mode="r")


def load_prepared_image(path: Path, size: Size) -> np.ndarray:
    """Read one prepared image, checking it has the dataset's (height, width)."""
    try:
        with Image.open(path) as img:
            arr = np.asarray(img.convert("RGB"))
    except (OSError, ValueError) as exc:
        raise DatasetError(f"cannot read prepared image {path} (corrupted or truncated?): {exc}") from exc
    if arr.shape != (*size, 3):
        raise DatasetError(f"{path} is {size_text(arr.shape[:2])} (height x width), expected {size_text(size)}")
    return arr
