"""Mask-guided training (docs/method.md#mask-guided-training): a training-only term that asks the explained map to
lie on the defect. Tensors in, tensors out.

For a defective training image with a mask, C is the Grad-CAM++ map of class 1 on the target
layer's h x w grid in closed form (:func:`qrs.cam.closed_form_cam`: differentiable in the
activations and the linear weights, no second backward pass). D is the defect mask dilated by
``dilate`` pixels (a square neighbourhood of that radius, scaled from 15 px at 224 x 224 with the
image size), and a grid cell is inside when any pixel of D falls in it. The energy loss is
``1 - sum_inside C / (sum C + 1e-6)``, averaged over the masked defective images of the batch, and
its weight ramps up linearly from 0 over the first part of training.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from qrs.analysis import tolerance_px
from qrs.images import as_size

ENERGY_EPS = 1e-6
"""Keeps the energy share defined where the map is zero everywhere."""


def default_dilation(img_size: int | Sequence[int]) -> int:
    """The dilation radius in pixels at an image size (one side, or (height, width)): the pointing
    game's tolerance, 15 px at 224 x 224 scaled with the size (:func:`qrs.analysis.tolerance_px`)."""
    return round(tolerance_px(*as_size(img_size)))


def grid_mask(defect: Tensor, grid: tuple[int, int], dilate: int) -> Tensor:
    """B x H x W defect masks -> B x h x w bool: cells that hold any pixel of the mask dilated by
    ``dilate`` pixels (square neighbourhood, separable max filter), pooled like adaptive max pooling."""
    if defect.dim() != 3:
        raise ValueError(f"defect masks must be B x H x W, got shape {tuple(defect.shape)}")
    if dilate < 0:
        raise ValueError(f"the dilation must be >= 0 pixels, got {dilate}")
    d = defect.float().unsqueeze(1)
    if dilate:
        k = 2 * dilate + 1
        d = F.max_pool2d(d, (k, 1), stride=1, padding=(dilate, 0))
        d = F.max_pool2d(d, (1, k), stride=1, padding=(0, dilate))
    return F.adaptive_max_pool2d(d, grid).squeeze(1) > 0


def energy_loss(cam: Tensor, inside: Tensor) -> Tensor:
    """Per image 1 - (sum of C over the inside cells) / (sum of C + 1e-6), shape (B,).

    cam: B x h x w non-negative maps; inside: B x h x w bool.
    """
    if cam.shape != inside.shape:
        raise ValueError(f"map {tuple(cam.shape)} and inside mask {tuple(inside.shape)} differ in shape")
    total = cam.sum(dim=(1, 2))
    return 1 - (cam * inside).sum(dim=(1, 2)) / (total + ENERGY_EPS)


def mask_weight(step: int, total_steps: int, weight: float, warmup: float) -> float:
    """lambda at a training step (0-based): linear from 0 to ``weight`` over the first ``warmup``
    share of the steps, then ``weight``."""
    ramp = warmup * total_steps
    if ramp <= 0:
        return weight
    return weight * min(1.0, step / ramp)


def select_masked(labels: Tensor, defect: Tensor, use: Tensor) -> Tensor:
    """(B,) bool: the images the term applies to: defective, chosen for mask supervision (``use``),
    and with at least one defect pixel (a mask or boxes)."""
    return (labels == 1) & use & defect.flatten(1).any(dim=1)
