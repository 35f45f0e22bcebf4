"""One split of a prepared dataset as a torch Dataset: images, labels and, on the prepared grid,
the ROI, defect and box masks.

Apart from :mod:`qrs.data.dataset` so that reading a prepared dataset does not import torch; the
dependency goes one way: ``PreparedDataset.split`` builds a :class:`SplitDataset` from its rows and
image cache, and this module knows nothing of ``PreparedDataset``.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import Dataset

from qrs.data.regions import FULL_ROI, rasterize, to_prepared
from qrs.errors import DatasetError


class SplitDataset(Dataset):
    """One split: items are dicts with ``index``, ``image`` (3xSxS uint8) and ``label``, and with
    ``with_masks`` also ``roi``, ``defect`` and ``boxes`` (SxS bool masks on the prepared grid).

    rows: the split's index rows; root: the prepared dataset's directory (mask paths are relative to
    it); img_size and resize: its square side and resize mode; images: returns the split's N x S x S x 3
    uint8 images (the memory-mapped cache), called once, on first use.
    """

    def __init__(self, rows: pd.DataFrame, *, split: str, root: Path, img_size: int, resize: str,
                 images: Callable[[], np.ndarray], coords: dict[str, dict[str, list]] | None = None,
                 with_masks: bool = True) -> None:
        self.split_name = split
        self.rows = rows
        self.root = root
        self.img_size = img_size
        self.resize = resize
        self._load_images = images
        self.coords = coords
        self.with_masks = with_masks

    def __len__(self) -> int:
        return len(self.rows)

    @cached_property
    def images(self) -> np.ndarray:
        return self._load_images()

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
        s = self.img_size
        mode = self.resize
        orig = (int(row["orig_width"]), int(row["orig_height"]))
        roi_regions, defect_regions = self.regions(i)
        roi = rasterize([to_prepared(r, orig, mode, s) for r in roi_regions], s, s)
        boxes = rasterize([to_prepared(r, orig, mode, s) for r in defect_regions], s, s)
        if row["mask"]:
            with Image.open(self.root / row["mask"]) as img:
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
