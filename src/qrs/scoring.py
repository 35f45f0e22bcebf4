"""How a checkpoint says to score: its calibration read as options, scale, risk cuts and a note.

The one home of this reading, below both front ends that need it: :mod:`qrs.predict` (the torch
backend, ``qrs score`` and the service) and :mod:`qrs.runtime` (the onnx backend, whose file carries
the checkpoint's metadata). Neither imports the other for it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from qrs.extract import ScoreOptions

UNCALIBRATED_NOTE = ("the checkpoint is not calibrated (run `qrs calibrate`): QRS uses per-image min-max maps "
                     "(norm=image), not comparable across images, and there are no risk levels")


@dataclass(frozen=True)
class Scoring:
    """How a model's checkpoint says to score: options, calibration scale, risk cuts and a note."""

    options: ScoreOptions
    scale: float | None
    cuts: tuple[float, float] | None
    note: str


def scoring(meta: dict[str, Any]) -> Scoring:
    """A calibrated checkpoint scores with its calibration's method, threshold, norm, aggregation, scale
    and risk cuts; an uncalibrated one with norm=image, no risk levels, and a note that says so."""
    calibration = meta.get("calibration")
    if not calibration:
        return Scoring(ScoreOptions(norm="image"), None, None, UNCALIBRATED_NOTE)
    options = ScoreOptions(method=calibration["method"], threshold=calibration["threshold"],
                           norm=calibration["norm"], aggregation=calibration["aggregation"])
    cuts = calibration.get("risk_cuts")
    note = "" if cuts else str(calibration.get("risk_note") or "no risk cuts: no risk levels")
    return Scoring(options, float(calibration["scale"]), (float(cuts["low"]), float(cuts["high"])) if cuts else None,
                   note)
