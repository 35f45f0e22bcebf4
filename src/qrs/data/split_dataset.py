"""One split of a prepared dataset as a torch Dataset: images, labels and, on the prepared grid,
the ROI, defect and box masks. Apart from :mod:`qrs.data.dataset` so that reading a prepared
dataset does not import torch."""

from __future__ import annotations

from functools import cached_property
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from qrs.data.dataset import DatasetError, PreparedDataset
from qrs.data.regions import FULL_ROI, rasterize, to_prepared


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
