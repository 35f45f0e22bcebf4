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
from qrs.images import Size, as_size


class SplitDataset(Dataset):
    """One split: items are dicts with ``index``, ``image`` (3 x H x W uint8) and ``label``, and with
    ``with_masks`` also ``roi``, ``defect`` and ``boxes`` (H x W bool masks on the prepared grid), or
    with ``with_defect`` only ``defect`` (what mask-guided training needs).

    rows: the split's index rows; root: the prepared dataset's directory (mask paths are relative to
    it); img_size and resize: its (height, width) and resize mode; images: returns the split's
    N x H x W x 3 uint8 images (the memory-mapped cache), called once, on first use.
    """

    def __init__(self, rows: pd.DataFrame, *, split: str, root: Path, img_size: Size, resize: str,
                 images: Callable[[], np.ndarray], coords: dict[str, dict[str, list]] | None = None,
                 with_masks: bool = True, with_defect: bool = False) -> None:
        self.split_name = split
        self.rows = rows
        self.root = root
        self.img_size = as_size(img_size)
        self.resize = resize
        self._load_images = images
        self.coords = coords
        self.with_masks = with_masks
        self.with_defect = with_defect

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
        """(ROI, defect mask, defect boxes) of item ``i`` as H x W bool arrays on the prepared grid.

        The defect mask is the prepared mask file where one exists, else the rasterised defect boxes.
        """
        roi_regions, defect_regions = self.regions(i)
        roi = self._rasterize(i, roi_regions)
        boxes = self._rasterize(i, defect_regions)
        return roi, self._mask_file(i) if self.rows["mask"].iat[i] else boxes, boxes

    def defect_mask(self, i: int) -> np.ndarray:
        """The defect mask of item ``i`` (H x W bool): its mask file, else its rasterised defect boxes."""
        if self.rows["mask"].iat[i]:
            return self._mask_file(i)
        return self._rasterize(i, self.regions(i)[1])

    def _rasterize(self, i: int, regions: list) -> np.ndarray:
        orig = (int(self.rows["orig_width"].iat[i]), int(self.rows["orig_height"].iat[i]))
        return rasterize([to_prepared(r, orig, self.resize, self.img_size) for r in regions], *self.img_size)

    def _mask_file(self, i: int) -> np.ndarray:
        with Image.open(self.root / self.rows["mask"].iat[i]) as img:
            return np.asarray(img.convert("L")) > 0

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
        elif self.with_defect:
            item["defect"] = torch.from_numpy(self.defect_mask(i))
        return item
