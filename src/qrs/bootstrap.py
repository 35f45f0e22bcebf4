"""Stratified bootstrap confidence intervals (``scipy.stats.bootstrap``) for the metrics of a split.

Stratified by class: the good and the defective parts are resampled separately, each with
replacement to its own count, so every resample keeps the split's class balance (a resample without
defective parts would have no recall and no AUROC). scipy does the resampling and the interval: the
two classes' index arrays are its two independent (unpaired) samples, and a statistic maps the
resampled indices to the metrics, vectorised over the resamples.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import stats
from sklearn.metrics import average_precision_score

IndexStatistic = Callable[[np.ndarray, np.ndarray], np.ndarray]
"""(good indices, defective indices), each R x n_class for R resamples -> K x R metric values."""


@dataclass(frozen=True)
class BootstrapOptions:
    """How the intervals are drawn: resamples, confidence level and seed (percentile intervals: they
    stay defined when every resample gives the same value, e.g. an AUROC of 1, where BCa is not)."""

    n_resamples: int = 1000
    confidence: float = 0.95
    seed: int = 0

    def __post_init__(self) -> None:
        if self.n_resamples < 0:
            raise ValueError(f"the number of bootstrap resamples must be >= 0, got {self.n_resamples}")
        if not 0 < self.confidence < 1:
            raise ValueError(f"the confidence level must be in (0, 1), got {self.confidence:g}")

    def describe(self) -> dict[str, Any]:
        """The options as stored beside the intervals in JSON."""
        return {**asdict(self), "method": "percentile", "stratified": True}


def stratified_intervals(statistic: IndexStatistic, labels: np.ndarray, names: list[str],
                         options: BootstrapOptions = BootstrapOptions()) -> dict[str, list[float] | None]:
    """[low, high] per metric name (None for all when a class is missing or resampling is off)."""
    labels = np.asarray(labels).astype(int)
    good, bad = np.flatnonzero(labels == 0), np.flatnonzero(labels == 1)
    if options.n_resamples == 0 or not good.size or not bad.size:
        return {name: None for name in names}

    def vectorised(good_idx: np.ndarray, bad_idx: np.ndarray, axis: int = -1) -> np.ndarray:
        return statistic(np.atleast_2d(good_idx), np.atleast_2d(bad_idx)).reshape(len(names), *good_idx.shape[:-1])

    result = stats.bootstrap((good, bad), vectorised, paired=False, vectorized=True, n_resamples=options.n_resamples,
                             confidence_level=options.confidence, method="percentile",
                             rng=np.random.default_rng(options.seed))
    low = np.atleast_1d(result.confidence_interval.low)
    high = np.atleast_1d(result.confidence_interval.high)
    return {name: [float(lo), float(hi)] for name, lo, hi in zip(names, low, high)}


def _counts(codes: np.ndarray, idx: np.ndarray, n_values: int) -> np.ndarray:
    """R x n_values: how often each distinct value occurs in each resample (rows of ``idx``)."""
    rows = idx.shape[0]
    flat = codes[idx] + n_values * np.arange(rows)[:, None]
    return np.bincount(flat.ravel(), minlength=rows * n_values).reshape(rows, n_values)


def auroc_statistic(scores: np.ndarray) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """AUROC per resample, defective over good, as the Mann-Whitney U / (n_bad n_good), counted on
    the distinct scores: U = sum over values v of (defective at v) x (good below v + half the good
    at v). Linear in the number of parts per resample, where ranking every resample would sort it."""
    values, codes = np.unique(np.asarray(scores, dtype=np.float64), return_inverse=True)

    def statistic(good_idx: np.ndarray, bad_idx: np.ndarray) -> np.ndarray:
        good = _counts(codes, good_idx, values.size)
        bad = _counts(codes, bad_idx, values.size)
        below = np.cumsum(good, axis=1) - good
        u = (bad * (below + 0.5 * good)).sum(axis=1)
        return u / (bad_idx.shape[-1] * good_idx.shape[-1])

    return statistic


CLASSIFICATION_METRICS = ["f1", "precision", "recall", "auroc", "ap"]


def classification_statistic(labels: np.ndarray, p_defective: np.ndarray) -> IndexStatistic:
    """F1, precision, recall (prediction p_defective > 0.5, 0 where undefined as in scikit-learn's
    zero_division=0), AUROC and AP of p_defective, per resample of the parts' indices."""
    labels = np.asarray(labels).astype(int)
    p = np.asarray(p_defective, dtype=np.float64)
    pred = p > 0.5
    auroc = auroc_statistic(p)

    def statistic(good_idx: np.ndarray, bad_idx: np.ndarray) -> np.ndarray:
        tp = pred[bad_idx].sum(axis=-1)
        fn = bad_idx.shape[-1] - tp
        fp = pred[good_idx].sum(axis=-1)
        precision = np.divide(tp, tp + fp, out=np.zeros(tp.shape), where=(tp + fp) > 0)
        recall = tp / (tp + fn)
        f1 = 2 * tp / (2 * tp + fp + fn)
        idx = np.concatenate([good_idx, bad_idx], axis=-1)
        ap = np.array([average_precision_score(labels[row], p[row]) for row in idx])
        return np.stack([f1, precision, recall, auroc(good_idx, bad_idx), ap])

    return statistic


def classification_intervals(labels: np.ndarray, p_defective: np.ndarray,
                             options: BootstrapOptions = BootstrapOptions()) -> dict[str, list[float] | None]:
    """Intervals of the CLASSIFICATION_METRICS of one checkpoint on one split."""
    return stratified_intervals(classification_statistic(labels, p_defective), labels, CLASSIFICATION_METRICS,
                                options)


QRS_METRICS = ["auroc", "zero_share_good"]


def qrs_statistic(qrs: np.ndarray) -> IndexStatistic:
    """The QRS AUROC (defective vs good) and the share of good parts at QRS 0, per resample."""
    qrs = np.asarray(qrs, dtype=np.float64)
    auroc = auroc_statistic(qrs)

    def statistic(good_idx: np.ndarray, bad_idx: np.ndarray) -> np.ndarray:
        return np.stack([auroc(good_idx, bad_idx), (qrs[good_idx] == 0).mean(axis=-1)])

    return statistic


def qrs_intervals(labels: np.ndarray, qrs: np.ndarray,
                  options: BootstrapOptions = BootstrapOptions()) -> dict[str, list[float] | None]:
    """Intervals of the QRS_METRICS of one split."""
    return stratified_intervals(qrs_statistic(qrs), labels, QRS_METRICS, options)


def with_interval(value: float | None, interval: list[float] | None, digits: int = 3) -> str:
    """``0.964 [0.941, 0.982]``; the bare value without an interval, ``-`` without a value."""
    if value is None:
        return "-"
    text = f"{value:.{digits}f}"
    return text if interval is None else f"{text} [{interval[0]:.{digits}f}, {interval[1]:.{digits}f}]"
