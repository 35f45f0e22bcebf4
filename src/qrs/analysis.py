"""Statistics of QRS (docs/method.md#statistics): defective vs non-defective tests, localisation metrics,
and the distribution plot. Pure functions over arrays/tensors, plus the plot writer."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import stats
from sklearn.metrics import roc_auc_score
from torch import Tensor

POINTING_TOLERANCE_AT_224 = 15.0
"""Pointing-game tolerance in pixels at 224 x 224 (scaled with the image size at other sizes)."""


def tolerance_px(height: int, width: int) -> float:
    """The pointing-game tolerance (and the mask term's default dilation) at an H x W input: 15 px at
    224 x 224, scaled with sqrt(H W), the side of a square of the same area, so that it is the same
    share of the image at every size and does not depend on the aspect ratio."""
    return POINTING_TOLERANCE_AT_224 * math.sqrt(height * width) / 224.0


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
    :func:`tolerance_px` of the defect mask), ``energy_in_boxes`` (share of sum M inside the boxes)
    and ``iou`` of {M >= tau} with the defect mask.
    """
    b, h, w = maps.shape
    tol = tolerance_px(h, w)
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


AGREEMENT_ROWS = (("caught", 1, 1), ("missed", 1, 0), ("passed", 0, 0), ("flagged", 0, 1))
"""The agreement table's rows: (name, label, prediction): caught and missed defective parts, passed
and flagged good parts."""


def _auroc(labels: np.ndarray, scores: np.ndarray) -> float | None:
    return float(roc_auc_score(labels, scores)) if len(np.unique(labels)) == 2 else None


def _verdict_table(labels: np.ndarray, prediction: np.ndarray, above: np.ndarray) -> dict[str, dict[str, int]]:
    return {name: {"qrs_0": int(((labels == lab) & (prediction == pred) & ~above).sum()),
                   "qrs_above_0": int(((labels == lab) & (prediction == pred) & above).sum())}
            for name, lab, pred in AGREEMENT_ROWS}


def _share(row: dict[str, int], key: str) -> float | None:
    n = row["qrs_0"] + row["qrs_above_0"]
    return row[key] / n if n else None


def agreement(labels: np.ndarray, prediction: np.ndarray, p_defective: np.ndarray, qrs: np.ndarray,
              peak: np.ndarray, p_cut: float | None = None) -> dict[str, Any]:
    """Does QRS say what the classifier says? Caught / missed defective and passed / flagged good
    parts, each split by QRS = 0 and QRS > 0; the share of caught defective parts with QRS > 0 and of
    passed good parts at 0; AUROC of p_defective, of the raw map's peak and of QRS side by side (the
    peak bounds what a calibrated threshold on the map can separate).

    ``p_cut`` (the good-anchored calibration's :func:`qrs.score.classifier_cut`) adds the ceiling: the
    same figures for a map that ranks parts exactly as the classifier does, i.e. with QRS > 0 where
    p_defective >= p_cut and parts ordered by p_defective above it. The map accounts for the distance
    from the figures to the ceiling, the rule and its anchor parts for the distance from the ceiling to
    the classifier."""
    labels, prediction = np.asarray(labels).astype(int), np.asarray(prediction).astype(int)
    p = np.asarray(p_defective, dtype=np.float64)
    table = _verdict_table(labels, prediction, np.asarray(qrs, dtype=np.float64) > 0)
    ceiling = None
    if p_cut is not None:
        lifted = p >= p_cut
        ceiling_table = _verdict_table(labels, prediction, lifted)
        ceiling = {"p_cut": float(p_cut), "caught_with_qrs": _share(ceiling_table["caught"], "qrs_above_0"),
                   "passed_at_0": _share(ceiling_table["passed"], "qrs_0"),
                   "auroc_qrs": _auroc(labels, np.where(lifted, p, 0.0))}
    return {"table": table, "caught_with_qrs": _share(table["caught"], "qrs_above_0"),
            "passed_at_0": _share(table["passed"], "qrs_0"),
            "auroc_p_defective": _auroc(labels, p),
            "auroc_peak": _auroc(labels, np.asarray(peak, dtype=np.float64)),
            "auroc_qrs": _auroc(labels, np.asarray(qrs, dtype=np.float64)), "ceiling": ceiling}


SWEEP_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
"""The thresholds tau of the threshold sweep."""


def threshold_sweep(qrs: np.ndarray, labels: np.ndarray, thresholds: list[float]) -> list[dict[str, Any]]:
    """Per threshold: QRS AUROC, Mann-Whitney p and the shares of zeros, from the QRS of every part
    at every threshold (N x T, column t at ``thresholds[t]``)."""
    rows = []
    for t, tau in enumerate(thresholds):
        st = qrs_statistics(qrs[:, t], labels)
        rows.append({"threshold": float(tau), **{k: st[k] for k in ("auroc", "mann_whitney_p", "zero_share_good",
                                                                     "zero_share_defective", "median_defective")}})
    return rows


def _save_figure(fig: Any, out_base: str | os.PathLike[str], formats: tuple[str, ...] = ("png", "svg")) -> list[Path]:
    """Write a matplotlib figure as ``out_base``.png and .svg (or ``formats``), atomically, and close it."""
    import matplotlib.pyplot as plt

    from qrs.atomic import write_with

    paths = []
    for ext in formats:
        path = Path(f"{out_base}.{ext}")
        write_with(path, lambda tmp, ext=ext: fig.savefig(tmp, format=ext))
        paths.append(path)
    plt.close(fig)
    return paths


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


CLASS_NAMES = {0: "non-defective", 1: "defective"}
CLASS_COLOURS = {"non-defective": "tab:blue", "defective": "tab:red"}


def zero_shares(qrs: np.ndarray, labels: np.ndarray) -> dict[str, tuple[int, int]]:
    """Per class name: (parts at exactly QRS 0, parts), for the classes present."""
    qrs, labels = np.asarray(qrs, dtype=np.float64), np.asarray(labels).astype(int)
    return {name: (int((qrs[labels == c] == 0).sum()), int((labels == c).sum()))
            for c, name in CLASS_NAMES.items() if (labels == c).any()}


def distribution_plot(qrs: np.ndarray, labels: np.ndarray, arch: str, out_base: str | os.PathLike[str],
                      *, method_label: str = "Grad-CAM++", subtitle: str = "") -> list[Path]:
    """The paper's figure, a histogram with KDE of QRS per class, with the share of each class at exactly
    QRS 0 written on it; beside it the parts with QRS > 0 alone (on a log QRS axis when their values span
    more than a factor 10), which the spike at 0 would otherwise hide. Writes ``out_base``.png and .svg."""
    plt = _pyplot()
    import pandas as pd
    import seaborn as sns
    from matplotlib.ticker import MaxNLocator

    x = "QRS (Quality Risk Score)"
    frame = pd.DataFrame({x: np.asarray(qrs, dtype=np.float64),
                          "class": [CLASS_NAMES[int(v)] for v in np.asarray(labels).astype(int)]})
    order = [n for n in CLASS_NAMES.values() if (frame["class"] == n).any()]
    fig, (ax, pos_ax) = plt.subplots(1, 2, figsize=(11.5, 4.2), dpi=110, gridspec_kw={"width_ratios": [1, 1]})
    use_kde = all(frame[frame["class"] == c][x].nunique() > 1 for c in order)
    sns.histplot(frame, x=x, hue="class", hue_order=order, kde=use_kde, bins=30, ax=ax, palette=CLASS_COLOURS,
                 element="bars", stat="count")
    ax.set_title(f"{arch} & {method_label}" + (f"\n{subtitle}" if subtitle else ""))
    ax.set_xlabel(x)
    ax.set_ylabel("Count")
    ax.set_ylim(0, 1.15 * max(bar.get_height() for bar in ax.patches))  # a KDE of a spike at 0 would dwarf the bars
    shares = "\n".join(f"{name}: {zero / n:.1%} ({zero} of {n})"
                       for name, (zero, n) in zero_shares(qrs, labels).items())
    ax.text(0.97, 0.55, f"at QRS = 0\n{shares}", transform=ax.transAxes, ha="right", va="top", fontsize=8,
            bbox={"boxstyle": "round", "facecolor": "white", "alpha": 0.85})
    positive = frame[frame[x] > 0]
    pos_ax.set_title(f"parts with QRS > 0 only (n = {len(positive)})")
    pos_ax.set_ylabel("Count")
    pos_ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    if positive.empty:
        pos_ax.text(0.5, 0.5, "no part has QRS > 0", transform=pos_ax.transAxes, ha="center", va="center")
        pos_ax.set_xlabel(x)
    else:
        log = bool(positive[x].max() > 10 * positive[x].min())
        sns.histplot(positive, x=x, hue="class", hue_order=[n for n in order if (positive["class"] == n).any()],
                     bins=30, ax=pos_ax, palette=CLASS_COLOURS, element="bars", stat="count", log_scale=log)
        pos_ax.set_xlabel(f"{x}{', log scale' if log else ''}")
    fig.tight_layout()
    return _save_figure(fig, out_base)


def sweep_plot(sweep: list[dict[str, Any]], chosen: float, out_base: str | os.PathLike[str], *,
               title: str = "") -> list[Path]:
    """QRS AUROC and the share of good parts at 0 (left), Mann-Whitney p on a log scale (right)
    against tau, the chosen tau marked; PNG only (the report's figure, kept cheap)."""
    plt = _pyplot()
    taus = [r["threshold"] for r in sweep]
    fig, (left, right) = plt.subplots(1, 2, figsize=(8.4, 3.6), dpi=110)
    for key, label, colour in (("auroc", "QRS AUROC", "tab:red"), ("zero_share_good", "good parts at QRS 0",
                                                                   "tab:blue")):
        left.plot(taus, [np.nan if r[key] is None else r[key] for r in sweep], "o-", color=colour, label=label)
    left.set_ylim(-0.02, 1.02)
    left.legend(loc="lower left")
    right.semilogy(taus, [np.nan if r["mann_whitney_p"] is None else max(r["mann_whitney_p"], 1e-300) for r in sweep],
                   "o-", color="tab:purple")
    right.set_ylabel("Mann-Whitney p")
    for ax in (left, right):
        ax.axvline(chosen, color="grey", linestyle="--")
        ax.set_xlabel(f"threshold tau (chosen: {chosen:g}, dashed)")
    fig.suptitle(title)
    fig.tight_layout()
    return _save_figure(fig, out_base, ("png",))


def agreement_plot(p_defective: np.ndarray, qrs: np.ndarray, labels: np.ndarray, out_base: str | os.PathLike[str],
                   *, title: str = "") -> list[Path]:
    """p_defective (x) against QRS (y, linear up to 1e-4 then logarithmic, so QRS = 0 stays visible) per
    part, coloured by class, with the classifier's 0.5 cut; PNG only."""
    plt = _pyplot()
    labels = np.asarray(labels).astype(int)
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    for lab, name, colour in ((0, "non-defective", "tab:blue"), (1, "defective", "tab:red")):
        chosen = labels == lab
        ax.scatter(np.asarray(p_defective)[chosen], np.asarray(qrs)[chosen], s=14, alpha=0.6, color=colour,
                   label=f"{name} (n = {int(chosen.sum())})")
    ax.set_yscale("symlog", linthresh=1e-4)
    ax.axvline(0.5, color="grey", linestyle="--")
    ax.set_xlim(-0.02, 1.02)
    ax.set_xlabel("p_defective (dashed: the classifier's cut, 0.5)")
    ax.set_ylabel("QRS")
    ax.legend(loc="upper left")
    ax.set_title(title)
    fig.tight_layout()
    return _save_figure(fig, out_base, ("png",))


def deletion_plot(summary: dict[str, Any], out_base: str | os.PathLike[str], *, title: str = "") -> list[Path]:
    """Mean drop of p_defective against the share of pixels removed, most and least relevant first,
    for the defective (solid) and good (dashed) parts."""
    plt = _pyplot()
    xs = [0.0, *summary["fractions"]]
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    for name, style in (("defective", "-"), ("good", "--")):
        part = summary[name]
        if not part["n"]:
            continue
        ax.plot(xs, [0.0, *part["morf_mean_drop"]], style, marker="o", color="tab:red",
                label=f"{name}: most relevant first")
        ax.plot(xs, [0.0, *part["lerf_mean_drop"]], style, marker="o", color="tab:blue",
                label=f"{name}: least relevant first")
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.set_xlabel("share of pixels removed (noisy linear imputation)")
    ax.set_ylabel("mean drop of p_defective")
    ax.legend()
    ax.set_title(title)
    fig.tight_layout()
    return _save_figure(fig, out_base)



CURVE_STYLES = {
    "train_loss": ("loss", "--", "tab:blue", "training loss"),
    "val_loss": ("loss", "-", "tab:orange", "validation loss"),
    "val_acc": ("accuracy", "-", "tab:green", "accuracy"),
    "val_f1": ("accuracy", ":", "tab:purple", "F1"),
    "train_mask_loss": ("mask", "-", "tab:red", "mask term"),
    "mask_weight": ("weight", "--", "tab:brown", "weight lambda"),
    "lr": ("lr", "-", "tab:gray", "learning rate"),
}
"""The per-epoch values of ``log.csv`` that the training curves show: panel, line style, colour, label."""
CURVE_SERIES = tuple(CURVE_STYLES)


def best_epochs(history: Sequence[Mapping[str, Any]]) -> tuple[int, int]:
    """(best-loss epoch, best-accuracy epoch) of a run's log rows: the first epoch of lowest validation
    loss and the first of highest validation accuracy, as training keeps ``best_loss.pt`` and ``best_acc.pt``."""
    loss = min(history, key=lambda r: (r["val_loss"], r["epoch"]))
    acc = max(history, key=lambda r: (r["val_acc"], -r["epoch"]))
    return int(loss["epoch"]), int(acc["epoch"])


def training_curves_plot(runs: Mapping[str, Sequence[Mapping[str, Any]]], out_base: str | os.PathLike[str], *,
                         title: str = "") -> list[Path]:
    """The training curves of one run or of several (label -> the run's log rows, one per epoch): training
    and validation loss, validation accuracy and F1, the learning rate and, when a run was mask-guided, the
    mask term and its weight; each run's best-loss (star) and best-accuracy (diamond) epochs marked, with
    dotted lines across the panels for a single run. One colour per series, or per run for several. PNG
    and SVG."""
    from matplotlib.ticker import MaxNLocator

    plt = _pyplot()
    runs = {label: list(rows) for label, rows in runs.items() if rows}
    guided = any("train_mask_loss" in rows[0] for rows in runs.values())
    if guided:
        fig, axes = plt.subplots(2, 2, figsize=(10, 7), dpi=110)
        panel = dict(zip(("loss", "accuracy", "mask", "lr"), axes.flat))
        panel["weight"] = panel["mask"].twinx()
    else:
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.9), dpi=110)
        panel = dict(zip(("loss", "accuracy", "lr"), axes.flat))
    single = len(runs) == 1
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, (label, rows) in enumerate(runs.items()):
        epochs = [int(r["epoch"]) for r in rows]
        prefix = "" if single else f"{label}: "
        for key, (where, style, colour, name) in CURVE_STYLES.items():
            if key in rows[0]:
                values = [np.nan if r.get(key) is None else float(r[key]) for r in rows]
                panel[where].plot(epochs, values, style, color=colour if single else cycle[k % len(cycle)],
                                  label=f"{prefix}{name}")
        best_loss, best_acc = best_epochs(rows)
        at = {int(r["epoch"]): r for r in rows}
        for where, epoch, key, marker, colour, name in (
                ("loss", best_loss, "val_loss", "*", "tab:orange", "best loss"),
                ("accuracy", best_acc, "val_acc", "D", "tab:green", "best accuracy")):
            panel[where].plot([epoch], [at[epoch][key]], marker, markersize=11, markeredgecolor="black",
                              color=colour if single else cycle[k % len(cycle)],
                              label=f"{prefix}{name} (epoch {epoch})")
            if single:
                for ax in panel.values():
                    ax.axvline(epoch, color=colour, linestyle=":", linewidth=1)
    panel["loss"].set_title("loss (cross-entropy" + (" + weight x mask term)" if guided else ")"))
    panel["accuracy"].set_title("validation accuracy and F1 (defective = positive)")
    panel["lr"].set_title("learning rate (end of epoch)")
    for where, keys, span in (("lr", ("lr",), 10), ("loss", ("train_loss", "val_loss"), 100)):
        values = [float(r[k]) for rows in runs.values() for r in rows for k in keys if float(r[k]) > 0]
        if values and max(values) > span * min(values):  # e.g. a first validation loss of 20, later ones of 0.01
            panel[where].set_yscale("log")
    if guided:
        panel["mask"].set_title("mask term (solid) and its weight (dashed)")
        panel["mask"].set_ylabel("1 - share of the map on the defect")
        panel["weight"].set_ylabel("weight lambda")
        panel["weight"].set_ylim(bottom=0)
    for where, ax in panel.items():
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if where == "weight":
            continue
        ax.set_xlabel("epoch")
        handles, labels = ax.get_legend_handles_labels()
        if where == "mask":
            more = panel["weight"].get_legend_handles_labels()
            handles, labels = handles + more[0], labels + more[1]
        ax.legend(handles, labels, fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    return _save_figure(fig, out_base)
