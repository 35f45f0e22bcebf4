"""Stratified bootstrap intervals: scipy's intervals against a plain numpy bootstrap, the class
counts of every resample, the point statistics against scikit-learn, formatting and edge cases."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, f1_score, precision_score, recall_score, roc_auc_score

from qrs.bootstrap import (CLASSIFICATION_METRICS, BootstrapOptions, auroc_statistic, classification_intervals,
                           classification_statistic, qrs_intervals, qrs_statistic, stratified_intervals,
                           with_interval)


def _parts(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """60 good and 20 defective parts: p_defective with overlap, QRS with ties at 0 among good parts."""
    rng = np.random.default_rng(seed)
    labels = np.array([0] * 60 + [1] * 20)
    p = np.concatenate([rng.uniform(0, 0.7, 60), rng.uniform(0.3, 1, 20)])
    qrs = np.concatenate([np.where(rng.uniform(size=60) < 0.7, 0.0, rng.uniform(0, 0.2, 60)), rng.uniform(0, 0.5, 20)])
    return labels, p, qrs


def _numpy_bootstrap(labels: np.ndarray, metric, n: int, seed: int) -> tuple[float, float]:  # noqa: ANN001
    """The textbook stratified percentile bootstrap, written without scipy."""
    rng = np.random.default_rng(seed)
    good, bad = np.flatnonzero(labels == 0), np.flatnonzero(labels == 1)
    values = [metric(np.concatenate([rng.choice(good, good.size), rng.choice(bad, bad.size)])) for _ in range(n)]
    return tuple(np.percentile(values, [2.5, 97.5]))


def test_qrs_intervals_match_a_plain_numpy_bootstrap() -> None:
    labels, _, qrs = _parts()
    got = qrs_intervals(labels, qrs, BootstrapOptions(n_resamples=4000, seed=1))
    auroc = _numpy_bootstrap(labels, lambda i: roc_auc_score(labels[i], qrs[i]), 4000, seed=2)
    zeros = _numpy_bootstrap(labels, lambda i: np.mean(qrs[i][labels[i] == 0] == 0), 4000, seed=3)
    # Two independent Monte Carlo estimates of the same quantiles: they agree to ~0.005 at 4000 resamples,
    # and a share of 60 good parts moves in steps of 1/60, so its quantiles may differ by one step.
    assert got["auroc"] == pytest.approx(auroc, abs=0.015)
    assert got["zero_share_good"] == pytest.approx(zeros, abs=1.01 / 60)
    assert got["auroc"][0] < roc_auc_score(labels, qrs) < got["auroc"][1]


def test_classification_intervals_match_a_plain_numpy_bootstrap() -> None:
    labels, p, _ = _parts(1)
    got = classification_intervals(labels, p, BootstrapOptions(n_resamples=1000, seed=4))
    pred = (p > 0.5).astype(int)
    metrics = {"f1": lambda i: f1_score(labels[i], pred[i]), "precision": lambda i: precision_score(labels[i], pred[i]),
               "recall": lambda i: recall_score(labels[i], pred[i]), "auroc": lambda i: roc_auc_score(labels[i], p[i]),
               "ap": lambda i: average_precision_score(labels[i], p[i])}
    # Monte Carlo error of a 2.5% quantile at 1000 resamples: ~0.01 here; recall moves in steps of 1/20.
    for name, metric in metrics.items():
        tolerance = 1.01 / 20 if name == "recall" else 0.03
        assert got[name] == pytest.approx(_numpy_bootstrap(labels, metric, 1000, seed=5), abs=tolerance), name


def test_point_statistics_equal_scikit_learn() -> None:
    labels, p, qrs = _parts(2)
    good, bad = np.flatnonzero(labels == 0)[None], np.flatnonzero(labels == 1)[None]
    pred = p > 0.5
    expected = [f1_score(labels, pred), precision_score(labels, pred), recall_score(labels, pred),
                roc_auc_score(labels, p), average_precision_score(labels, p)]
    assert classification_statistic(labels, p)(good, bad)[:, 0] == pytest.approx(expected, abs=1e-12)
    assert qrs_statistic(qrs)(good, bad)[:, 0] == pytest.approx([roc_auc_score(labels, qrs),
                                                                 np.mean(qrs[labels == 0] == 0)], abs=1e-12)
    nothing_predicted = np.zeros_like(p)
    assert classification_statistic(labels, nothing_predicted)(good, bad)[:3, 0].tolist() == [0.0, 0.0, 0.0]


def test_counted_auroc_equals_scikit_learn_on_resamples_with_ties() -> None:
    labels, _, qrs = _parts(3)
    rng = np.random.default_rng(7)
    good = rng.choice(np.flatnonzero(labels == 0), (50, 60))
    bad = rng.choice(np.flatnonzero(labels == 1), (50, 20))
    got = auroc_statistic(qrs)(good, bad)
    expected = [roc_auc_score(np.r_[np.zeros(60), np.ones(20)], qrs[np.r_[g, b]]) for g, b in zip(good, bad)]
    np.testing.assert_allclose(got, expected, atol=1e-12)
    assert (qrs[labels == 0] == 0).sum() > 10  # many ties at 0, counted as halves


def test_every_resample_keeps_the_class_counts() -> None:
    labels = np.array([0] * 30 + [1] * 10)
    share = stratified_intervals(lambda g, b: labels[np.concatenate([g, b], axis=-1)].mean(axis=-1)[None], labels,
                                 ["defective share"], BootstrapOptions(n_resamples=500))
    assert share == {"defective share": [0.25, 0.25]}
    rng = np.random.default_rng(0)
    draws = [labels[rng.choice(40, 40)].mean() for _ in range(500)]
    assert np.ptp(draws) > 0.1  # an unstratified bootstrap would not keep it


def test_same_seed_same_interval_and_a_perfect_separation() -> None:
    labels, p, _ = _parts()
    assert classification_intervals(labels, p) == classification_intervals(labels, p)
    assert classification_intervals(labels, p, BootstrapOptions(seed=1)) != classification_intervals(labels, p)
    perfect = qrs_intervals(labels, labels * 0.5)
    assert perfect == {"auroc": [1.0, 1.0], "zero_share_good": [1.0, 1.0]}


def test_no_interval_without_both_classes_or_resamples() -> None:
    labels, p, _ = _parts()
    assert classification_intervals(np.zeros(5), p[:5]) == {name: None for name in CLASSIFICATION_METRICS}
    assert qrs_intervals(labels, p, BootstrapOptions(n_resamples=0)) == {"auroc": None, "zero_share_good": None}
    with pytest.raises(ValueError, match="bootstrap resamples must be >= 0, got -1"):
        BootstrapOptions(n_resamples=-1)
    with pytest.raises(ValueError, match=r"confidence level must be in \(0, 1\), got 95"):
        BootstrapOptions(confidence=95)
    assert BootstrapOptions().describe() == {"n_resamples": 1000, "confidence": 0.95, "seed": 0,
                                             "method": "percentile", "stratified": True}


def test_with_interval_formats_value_and_bounds() -> None:
    assert with_interval(0.96412, [0.9413, 0.98151]) == "0.964 [0.941, 0.982]"
    assert with_interval(0.5, None) == "0.500"
    assert with_interval(None, [0.1, 0.2]) == "-"
