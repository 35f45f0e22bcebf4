"""The picture of an explanation: the heat map over the part, the ROI outline and the region over tau.

Shared by the report's galleries, ``qrs score --overlay`` and the service.
"""

from __future__ import annotations

import io

import numpy as np
from matplotlib import colormaps
from PIL import Image
from scipy import ndimage

ROI_COLOUR = np.array([0, 255, 255], dtype=np.float32)
OVER_COLOUR = np.array([255, 255, 255], dtype=np.float32)
DEFECT_COLOUR = np.array([255, 0, 255], dtype=np.float32)


def _outline(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def render_overlay(rgb: np.ndarray, m: np.ndarray, roi: np.ndarray | None = None, over: np.ndarray | None = None,
                   *, defect: np.ndarray | None = None, alpha: float = 0.45) -> np.ndarray:
    """Blend the normalised map ``m`` (HxW in [0, 1], jet colours) over ``rgb`` (HxWx3 uint8), then
    draw the ROI outline (cyan), the outline of a known defect mask (magenta) and the outline of the
    over-threshold region (white)."""
    heat = colormaps["jet"](np.clip(m, 0.0, 1.0))[:, :, :3] * 255.0
    out = (1.0 - alpha) * rgb.astype(np.float32) + alpha * heat
    if roi is not None and not roi.all():
        out[_outline(roi)] = ROI_COLOUR
    if defect is not None and defect.any():
        out[_outline(defect)] = DEFECT_COLOUR
    if over is not None and over.any():
        out[_outline(over)] = OVER_COLOUR
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def png_bytes(rgb: np.ndarray, *, scale: int = 1) -> bytes:
    """Encode an HxWx3 uint8 array as PNG bytes, optionally enlarged ``scale`` times (nearest)."""
    img = Image.fromarray(rgb)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()
