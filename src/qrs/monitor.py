"""What a user watches while ``qrs train`` runs: the training curves beside ``log.csv`` and, on request,
TensorBoard.

Every epoch rank 0 rewrites ``curves.png`` and ``curves.svg`` in the run directory (atomically, so a
viewer never reads half a file). With ``--tensorboard DIR`` it also writes TensorBoard event files to
DIR: per optimiser step the training loss, the learning rate and, when mask-guided, the mask term and
its weight (rank 0's batches); per epoch the values of the log row that the curves show; and every
epoch the Grad-CAM++ overlays of a fixed handful of validation parts, so the maps can be watched
moving onto the defects while a guided model trains. All TensorBoard events are indexed by the global
optimiser step (an epoch's values at the step that ends it), so that a resumed run hides the
interrupted epoch's steps (``purge_step``) instead of drawing them twice.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from qrs.analysis import CURVE_SERIES, training_curves_plot
from qrs.cam import compute_cams
from qrs.data.split_dataset import SplitDataset
from qrs.distributed import DistContext
from qrs.errors import QrsError
from qrs.extract import ScoreOptions, score_maps
from qrs.model import normalize
from qrs.overlay import render_overlay

TENSORBOARD_INSTALL = "pip install tensorboard (in a qrs clone: pip install -e '.[tensorboard]')"
PARTS_PER_CLASS = 3
"""Validation parts of each class whose overlays go to TensorBoard every epoch."""
OVERLAY_OPTIONS = ScoreOptions(norm="image")
"""How the overlays normalise their maps: no calibration scale exists while the model trains, so each map
is min-max scaled on its own (as ``qrs score`` does for an uncalibrated checkpoint), and the white outline
is where it reaches 0.9 of its own peak."""


def summary_writer_class() -> type:
    """torch's ``SummaryWriter``, or a QrsError naming the install command when tensorboard is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise QrsError(f"--tensorboard needs the package tensorboard, which is not installed: "
                       f"{TENSORBOARD_INSTALL}") from None
    return SummaryWriter


def overlay_parts(labels: Sequence[int], per_class: int = PARTS_PER_CLASS) -> list[int]:
    """The fixed handful of parts to draw: the first ``per_class`` defective then the first ``per_class``
    good ones, in split order (the same parts every epoch and after a resume)."""
    defective = [i for i, lab in enumerate(labels) if lab == 1][:per_class]
    good = [i for i, lab in enumerate(labels) if lab == 0][:per_class]
    return defective + good


@torch.no_grad()
def explanation_overlays(model: nn.Module, meta: Mapping[str, Any], split: SplitDataset,
                         indices: Sequence[int]) -> list[np.ndarray]:
    """The Grad-CAM++ overlays (S x S x 3 uint8) of the parts ``indices`` of ``split`` as the model in eval
    mode sees them now: scored through :func:`qrs.extract.score_maps` like every other map, drawn by
    :func:`qrs.overlay.render_overlay` with the defect outline (magenta) where the part has one."""
    items = [split[i] for i in indices]
    images = torch.stack([it["image"] for it in items])
    roi = torch.stack([it["roi"] for it in items])
    device = next(model.parameters()).device
    cams = compute_cams(model, normalize(images.to(device), meta), method=OVERLAY_OPTIONS.method)
    m = score_maps(cams, roi, scale=None, options=OVERLAY_OPTIONS)["normalized"].cpu().numpy()
    out = []
    for k, it in enumerate(items):
        region = it["roi"].numpy()
        out.append(render_overlay(it["image"].permute(1, 2, 0).numpy(), m[k], OVERLAY_OPTIONS.threshold, region,
                                  defect=it["defect"].numpy()))
    return out


class TrainMonitor:
    """The curves (always) and TensorBoard (with a log directory) of one training run; only the main
    process writes."""

    def __init__(self, run_dir: Path, ctx: DistContext, *, title: str, tensorboard: Path | None = None,
                 val_split: SplitDataset | None = None, meta: Mapping[str, Any] | None = None,
                 purge_step: int | None = None) -> None:
        self.run_dir = run_dir
        self.is_main = ctx.is_main
        self.title = title
        self.writer = None
        self.parts: list[int] = []
        self.val_split = val_split
        self.meta = meta
        if tensorboard is None:
            return
        writer_class = summary_writer_class()
        if not ctx.is_main:
            return
        self.writer = writer_class(log_dir=str(tensorboard), purge_step=purge_step)
        if val_split is not None:
            self.parts = overlay_parts(val_split.labels.tolist())

    def step(self, step: int, scalars: Mapping[str, float]) -> None:
        """One optimiser step's values (``step`` counts from 1 over the whole run)."""
        if self.writer is None:
            return
        for key, value in scalars.items():
            if math.isfinite(value):
                self.writer.add_scalar(f"step/{key}", value, step)

    def epoch(self, history: Sequence[Mapping[str, Any]], step: int, model: nn.Module) -> None:
        """After an epoch's log row: rewrite the curves, and log the row and the overlays at ``step``."""
        if not self.is_main:
            return
        training_curves_plot({"": history}, self.run_dir / "curves", title=self.title)
        if self.writer is None:
            return
        row = history[-1]
        for key in CURVE_SERIES:
            if key in row and math.isfinite(row[key]):
                self.writer.add_scalar(f"epoch/{key}", row[key], step)
        if self.parts:
            overlays = explanation_overlays(model, self.meta, self.val_split, self.parts)
            for i, picture in zip(self.parts, overlays):
                kind = "defective" if int(self.val_split.labels[i]) else "good"
                self.writer.add_image(f"gradcam/{kind}/{self.val_split.rows['id'].iat[i]}", picture, step,
                                      dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        """Flush and close the event file."""
        if self.writer is not None:
            self.writer.close()
