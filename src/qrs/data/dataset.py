"""The prepared dataset on disk (QRS_SPEC section 7) and its torch datasets per split.

Images are decoded once into a uint8 memory map per split (``cache/<split>.u8``), so training
epochs never decode PNGs again; the cache is keyed by the index's hash and rebuilt when it changes.
"""

from __future__ import annotations

import json
import os
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from qrs.atomic import atomic_path
from qrs.choices import SPLITS
from qrs.data.regions import FULL_ROI, rasterize, to_prepared
from qrs.errors import QrsError


class DatasetError(QrsError, ValueError):
    """A prepared dataset that is missing, incomplete or not what was asked for."""


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
    def img_size(self) -> int:
        return int(self.meta["img_size"])

    @property
    def dataset_hash(self) -> str:
        return str(self.meta["dataset_hash"])

    def summary(self) -> str:
        """One line saying what the prepared dataset holds."""
        counts = ", ".join(f"{s}: {c['good']} good / {c['defective']} defective" for s, c in self.meta["counts"].items())
        n_skip = self.meta["n_skipped"]
        skipped = f"skipped {n_skip}" + (f" (see {self.root / 'skipped.csv'})" if n_skip else "")
        return f"prepared dataset {self.root}: {self.meta['n_images']} images ({counts}); {skipped}"

    def rows(self, split: str) -> pd.DataFrame:
        """The index rows of one split, in index order; an unknown or empty split is an error."""
        if split not in SPLITS:
            raise DatasetError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
        rows = self.index[self.index["split"] == split].reset_index(drop=True)
        if rows.empty:
            raise DatasetError(f"split {split!r} of {self.root} has no images")
        return rows

    def split(self, split: str, *, coords: dict[str, dict[str, list]] | None = None,
              with_masks: bool = True) -> "SplitDataset":
        """A torch Dataset over one split (``coords`` overrides the ROI/defect coordinates per id)."""
        return SplitDataset(self, split, coords=coords, with_masks=with_masks)

    def image_cache(self, split: str, *, progress: bool = True) -> np.ndarray:
        """The split's images as an N x S x S x 3 uint8 memory map, built on first use."""
        rows = self.rows(split)
        s = self.img_size
        path = self.root / "cache" / f"{split}-{self.dataset_hash}.npy"
        shape = (len(rows), s, s, 3)
        try:
            cached = np.load(path, mmap_mode="r")
            if cached.shape == shape and cached.dtype == np.uint8:
                return cached
        except (OSError, ValueError):
            pass
        with atomic_path(path) as tmp:
            arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
            for i, rel in enumerate(tqdm(rows["image"], desc=f"cache {split}", unit="img", disable=not progress)):
                arr[i] = load_prepared_image(self.root / rel, s)
            arr.flush()
            del arr
        return np.load(path, mmap_mode="r")


def load_prepared_image(path: Path, size: int) -> np.ndarray:
    """Read one prepared image, checking it has the dataset's size."""
    try:
        with Image.open(path) as img:
            arr = np.asarray(img.convert("RGB"))
    except (OSError, ValueError) as exc:
        raise DatasetError(f"cannot read prepared image {path} (corrupted or truncated?): {exc}") from exc
    if arr.shape != (size, size, 3):
        raise DatasetError(f"{path} is {arr.shape[1]}x{arr.shape[0]}, expected {size}x{size}")
    return arr


class SplitDataset(Dataset):
    """One split: items are dicts with ``index``, ``image`` (3xSxS uint8) and ``label``, and with
    ``with_masks`` also ``roi``, ``defect`` and ``boxes`` (SxS bool masks on the prepared grid)."""

    def __init__(self, data: PreparedDataset, split: str, *, coords: dict[str, dict[str, list]] | None = None,
                 with_masks: bool = True) -> None:
        self.data = data
        self.split_name = split
        self.rows = data.rows(split)
        self.coords = coords
        self.with_masks = with_masks

    def __len__(self) -> int:
        return len(self.rows)

    @cached_property
    def images(self) -> np.ndarray:
        return self.data.image_cache(self.split_name)

    @cached_property
    def labels(self) -> torch.Tensor:
        return torch.tensor(self.rows["label"].to_list(), dtype=torch.long)

    def regions(self, i: int) -> tuple[list, list]:
        """ROI and defect regions of item ``i``, relative to the original image."""
        row = self.rows.iloc[i]
        if self.coords is not None:
            entry = self.coords.get(row["id"])
            if entry is None:
                raise DatasetError(f"coordinates file has no entry for image id {row['id']!r}")
            return entry.get("roi") or FULL_ROI, entry.get("defects") or []
        return row["roi"], row["defects"]

    def masks(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ROI, defect mask, defect boxes) of item ``i`` as S x S bool arrays on the prepared grid.

        The defect mask is the prepared mask file where one exists, else the rasterised defect boxes.
        """
        row = self.rows.iloc[i]
        s = self.data.img_size
        mode = self.data.meta["resize"]
        orig = (int(row["orig_width"]), int(row["orig_height"]))
        roi_regions, defect_regions = self.regions(i)
        roi = rasterize([to_prepared(r, orig, mode, s) for r in roi_regions], s, s)
        boxes = rasterize([to_prepared(r, orig, mode, s) for r in defect_regions], s, s)
        if row["mask"]:
            with Image.open(self.data.root / row["mask"]) as img:
                defect = np.asarray(img.convert("L")) > 0
        else:
            defect = boxes
        return roi, defect, boxes

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = {
            "index": i,
            "image": torch.from_numpy(np.array(self.images[i])).permute(2, 0, 1),
            "label": self.labels[i],
        }
        if self.with_masks:
            roi, defect, boxes = self.masks(i)
            item["roi"] = torch.from_numpy(roi)
            item["defect"] = torch.from_numpy(defect)
            item["boxes"] = torch.from_numpy(boxes)
        return item
