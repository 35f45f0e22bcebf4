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


def _outline(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def render_overlay(rgb: np.ndarray, m: np.ndarray, roi: np.ndarray | None = None, over: np.ndarray | None = None,
                   *, alpha: float = 0.45) -> np.ndarray:
    """Blend the normalised map ``m`` (HxW in [0, 1], jet colours) over ``rgb`` (HxWx3 uint8), then
    draw the ROI outline (cyan) and the outline of the over-threshold region (white)."""
    heat = colormaps["jet"](np.clip(m, 0.0, 1.0))[:, :, :3] * 255.0
    out = (1.0 - alpha) * rgb.astype(np.float32) + alpha * heat
    if roi is not None and not roi.all():
        out[_outline(roi)] = ROI_COLOUR
    if over is not None and over.any():
        out[_outline(over)] = OVER_COLOUR
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def png_bytes(rgb: np.ndarray, *, scale: int = 1) -> bytes:
    """Encode an HxWx3 uint8 array as PNG bytes, optionally enlarged ``scale`` times (nearest).

    zlib level 1: a 187x512 overlay encodes in 8 ms to 118 KB, against 44 ms and 103 KB at Pillow's default
    level 6; the service draws one per flagged part it keeps, in the inference thread.
    """
    img = Image.fromarray(rgb)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()
