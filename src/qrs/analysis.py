"""Statistics of QRS (QRS_SPEC section 5): defective vs non-defective tests, localisation metrics,
and the distribution plot. Pure functions over arrays/tensors, plus the plot writer."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import stats
from sklearn.metrics import roc_auc_score
from torch import Tensor

POINTING_TOLERANCE_AT_224 = 15.0
"""Pointing-game tolerance in pixels at 224 x 224 (scaled with the side at other sizes)."""


def _finite(value: float) -> float | None:
    return float(value) if value is not None and math.isfinite(value) else None


def qrs_statistics(qrs: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """Defective vs non-defective QRS: Mann-Whitney U (two-sided, the primary p-value), Welch's t,
    Kolmogorov-Smirnov, AUROC of QRS, medians and shares of exact zeros per class."""
    qrs = np.asarray(qrs, dtype=np.float64)
    labels = np.asarray(labels).astype(int)
    bad, good = qrs[labels == 1], qrs[labels == 0]
    out: dict[str, Any] = {
        "n_defective": int(bad.size), "n_good": int(good.size),
        "median_defective": _finite(np.median(bad)) if bad.size else None,
        "median_good": _finite(np.median(good)) if good.size else None,
        "mean_defective": _finite(bad.mean()) if bad.size else None,
        "mean_good": _finite(good.mean()) if good.size else None,
        "zero_share_defective": _finite((bad == 0).mean()) if bad.size else None,
        "zero_share_good": _finite((good == 0).mean()) if good.size else None,
        "mann_whitney_u": None, "mann_whitney_p": None, "welch_t": None, "welch_p": None,
        "ks_statistic": None, "ks_p": None, "auroc": None,
    }
    if bad.size and good.size:
        mw = stats.mannwhitneyu(bad, good, alternative="two-sided")
        out.update(mann_whitney_u=_finite(mw.statistic), mann_whitney_p=_finite(mw.pvalue))
        if bad.size > 1 and good.size > 1 and (bad.std() > 0 or good.std() > 0):
            welch = stats.ttest_ind(bad, good, equal_var=False)
            out.update(welch_t=_finite(welch.statistic), welch_p=_finite(welch.pvalue))
        ks = stats.ks_2samp(bad, good)
        out.update(ks_statistic=_finite(ks.statistic), ks_p=_finite(ks.pvalue))
        out["auroc"] = float(roc_auc_score(labels, qrs))
    return out


def localisation(maps: Tensor, normalized: Tensor, defect: Tensor, boxes: Tensor, threshold: float) -> dict[str, Tensor]:
    """Per-image localisation against the defect regions (NaN where an image has none).

    maps: B x H x W raw maps (the peak is their argmax); normalized: M in [0, 1]; defect: the defect
    mask; boxes: the rasterised defect boxes. Returns ``pointing_hit`` (1.0 when the peak lies within
    15/224 of the side of the defect mask), ``energy_in_boxes`` (share of sum M inside the boxes)
    and ``iou`` of {M >= tau} with the defect mask.
    """
    b, h, w = maps.shape
    tol = POINTING_TOLERANCE_AT_224 * max(h, w) / 224.0
    flat = maps.reshape(b, -1).argmax(dim=1)
    peak_y, peak_x = (flat // w).float(), (flat % w).float()
    ys = torch.arange(h, device=maps.device, dtype=torch.float32).view(1, h, 1)
    xs = torch.arange(w, device=maps.device, dtype=torch.float32).view(1, 1, w)
    dist2 = (ys - peak_y.view(b, 1, 1)) ** 2 + (xs - peak_x.view(b, 1, 1)) ** 2
    nearest = torch.where(defect, dist2, torch.full_like(dist2, math.inf)).amin(dim=(1, 2))
    has_defect = defect.any(dim=(1, 2))
    has_boxes = boxes.any(dim=(1, 2))
    nan = torch.full((b,), math.nan, device=maps.device)
    total = normalized.sum(dim=(1, 2))
    energy = torch.where(total > 0, (normalized * boxes).sum(dim=(1, 2)) / total.clamp(min=1e-12), 0.0)
    over = normalized >= threshold
    inter = (over & defect).sum(dim=(1, 2)).float()
    union = (over | defect).sum(dim=(1, 2)).float()
    return {
        "pointing_hit": torch.where(has_defect, (nearest <= tol * tol).float(), nan),
        "energy_in_boxes": torch.where(has_boxes, energy, nan),
        "iou": torch.where(has_defect, inter / union.clamp(min=1), nan),
    }


def localisation_summary(rows: Any) -> dict[str, Any]:
    """Means of the per-image localisation columns over the defective images that have regions."""
    out = {}
    for col in ("pointing_hit", "energy_in_boxes", "iou"):
        values = np.asarray(rows[col], dtype=np.float64) if col in rows else np.array([])
        values = values[np.isfinite(values)]
        out[col if col != "pointing_hit" else "pointing_game"] = float(values.mean()) if values.size else None
        out[f"n_{col}"] = int(values.size)
    return out


def distribution_plot(qrs: np.ndarray, labels: np.ndarray, arch: str, out_base: str | os.PathLike[str],
                      *, method_label: str = "Grad-CAM++", subtitle: str = "") -> list[Path]:
    """The paper's figure: a histogram with KDE of QRS per class; writes ``out_base``.png and .svg."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd
    import seaborn as sns

    from qrs.atomic import write_with

    frame = pd.DataFrame({
        "QRS (Quality Risk Score)": np.asarray(qrs, dtype=np.float64),
        "class": np.where(np.asarray(labels).astype(int) == 1, "defective", "non-defective"),
    })
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    use_kde = all(frame[frame["class"] == c]["QRS (Quality Risk Score)"].nunique() > 1 for c in frame["class"].unique())
    sns.histplot(frame, x="QRS (Quality Risk Score)", hue="class", hue_order=["non-defective", "defective"],
                 kde=use_kde, bins=30, ax=ax, palette={"non-defective": "tab:blue", "defective": "tab:red"},
                 element="bars", stat="count")
    ax.set_title(f"{arch} & {method_label}" + (f"\n{subtitle}" if subtitle else ""))
    ax.set_xlabel("QRS (Quality Risk Score)")
    ax.set_ylabel("Count")
    fig.tight_layout()
    paths = []
    for ext in ("png", "svg"):
        path = Path(f"{out_base}.{ext}")
        write_with(path, lambda tmp, ext=ext: fig.savefig(tmp, format=ext))
        paths.append(path)
    plt.close(fig)
    return paths
