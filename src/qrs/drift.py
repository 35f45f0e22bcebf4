"""Drift of a line, from its inspection records: the two control charts of the history view.

Pure statistics on arrays (time, prediction, QRS of the scored parts, oldest first), grouped into
points per hour or per N parts:

- **Share flagged** (a p-chart): the share of parts the model fails, against 3-sigma limits around
  the share in a baseline window (the first records of the model, 500 by default):
  ``p ± 3 sqrt(p (1 - p) / n)`` for a point of n parts. A point outside its limits raises an alarm.
  Until the baseline window is full there are no limits and no alarm.
- **Share of passed parts with QRS > 0**, against what the calibration implies: its scale puts the
  map's threshold at the ``q`` quantile of the good parts' map peaks, so about ``1 - q`` of good parts
  score QRS > 0. For each point, a one-sided binomial test of k such parts among n passed parts
  against ``1 - q`` (``scipy.stats``); p below :data:`ALPHA` (the tail beyond 3 sigma, the same false
  alarm rate as the p-chart's upper limit) raises an alarm. The chart's limit is the largest share
  that does not.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import numpy as np
from scipy import stats

ALPHA = float(stats.norm.sf(3.0))
"""One-sided false alarm rate of a 3-sigma limit (0.00135)."""
SIGMAS = 3.0
DEFAULT_BASELINE = 500
DEFAULT_PER = "hour"


def p_chart_limits(p_bar: float, n: np.ndarray, sigmas: float = SIGMAS) -> tuple[np.ndarray, np.ndarray]:
    """(lower, upper) limits of a p-chart with centre ``p_bar`` for points of ``n`` parts, within [0, 1]."""
    n = np.asarray(n, dtype=np.float64)
    half = sigmas * np.sqrt(p_bar * (1.0 - p_bar) / n)
    return np.clip(p_bar - half, 0.0, 1.0), np.clip(p_bar + half, 0.0, 1.0)


def binomial_p_values(k: np.ndarray, n: np.ndarray, p0: float) -> np.ndarray:
    """One-sided binomial test P(X >= k) for X ~ Binomial(n, p0), per point (what
    ``scipy.stats.binomtest(k, n, p0, alternative="greater")`` gives, vectorised)."""
    return stats.binom.sf(np.asarray(k) - 1, np.asarray(n), p0)


def binomial_limit(n: np.ndarray, p0: float, alpha: float = ALPHA) -> np.ndarray:
    """The largest share k / n whose one-sided binomial p-value stays above ``alpha``."""
    n = np.asarray(n, dtype=np.float64)
    return stats.binom.isf(alpha, n, p0) / n


def point_groups(times: np.ndarray, per: str | int) -> np.ndarray:
    """The point of every record: its UTC hour (``per="hour"``) or its run of ``per`` consecutive records,
    as consecutive group numbers from 0."""
    if per == "hour":
        hours = np.asarray(times).astype("datetime64[h]")
        return np.unique(hours, return_inverse=True)[1].reshape(-1)
    if isinstance(per, (int, np.integer)) and per >= 1:
        return np.arange(len(times)) // int(per)
    raise ValueError(f"per must be 'hour' or a number of parts >= 1, got {per!r}")


def parse_per(text: str) -> str | int:
    """``hour`` or a number of parts (as the API and the page give it)."""
    if text == "hour":
        return text
    if text.isdigit() and int(text) >= 1:
        return int(text)
    raise ValueError(f"per must be 'hour' or a number of parts >= 1, got {text!r}")


def _utc(value: np.datetime64) -> datetime:
    return value.astype("datetime64[us]").item().replace(tzinfo=timezone.utc)


def _when(point: dict[str, Any]) -> str:
    return f"{point['start']:%Y-%m-%d %H:%M} UTC, {point['parts']} parts"


def drift(times: np.ndarray, prediction: np.ndarray, qrs: np.ndarray, *, baseline_prediction: np.ndarray,
          baseline_size: int = DEFAULT_BASELINE, expected_qrs_share: float | None, per: str | int = DEFAULT_PER,
          alpha: float = ALPHA) -> dict[str, Any]:
    """Both charts over the records (``times`` datetime64 UTC, ``prediction`` 0/1, ``qrs``; oldest first).

    ``baseline_prediction``: the predictions of the baseline window (the model's first
    ``baseline_size`` records); ``expected_qrs_share``: 1 - the calibration quantile, or None when the
    calibration gives no such expectation (no test then). Returns the points of each chart with their
    limits and alarms, the alarm messages, and ``alarm``: whether any point is beyond its limit.
    """
    times = np.asarray(times)
    prediction = np.asarray(prediction, dtype=np.int64)
    passed_over = (prediction == 0) & (np.asarray(qrs) > 0)
    group = point_groups(times, per)
    n_points = int(group.max()) + 1 if len(group) else 0
    parts = np.bincount(group, minlength=n_points)
    flagged = np.bincount(group, weights=prediction, minlength=n_points).astype(np.int64)
    passed = np.bincount(group, weights=prediction == 0, minlength=n_points).astype(np.int64)
    over = np.bincount(group, weights=passed_over, minlength=n_points).astype(np.int64)

    baseline_prediction = np.asarray(baseline_prediction)
    complete = len(baseline_prediction) >= baseline_size
    p_bar = float(baseline_prediction.mean()) if len(baseline_prediction) else None
    if complete and p_bar is not None:
        lower, upper = p_chart_limits(p_bar, parts)
    else:
        lower = upper = np.full(n_points, np.nan)
    with np.errstate(invalid="ignore", divide="ignore"):
        share_flagged = flagged / parts
        share_over = np.where(passed > 0, over / np.maximum(passed, 1), np.nan)
    if expected_qrs_share is not None:
        p_values = np.where(passed > 0, binomial_p_values(over, passed, expected_qrs_share), np.nan)
        limit = np.where(passed > 0, binomial_limit(np.maximum(passed, 1), expected_qrs_share, alpha), np.nan)
    else:
        p_values = limit = np.full(n_points, np.nan)

    def value(x: float) -> float | None:
        return None if np.isnan(x) else float(x)

    first = np.searchsorted(group, np.arange(n_points), side="left")
    last = np.searchsorted(group, np.arange(n_points), side="right") - 1
    flagged_points, qrs_points, alarms = [], [], []
    for i in range(n_points):
        span = {"start": _utc(times[first[i]]), "end": _utc(times[last[i]]), "parts": int(parts[i])}
        beyond = bool(complete and (share_flagged[i] > upper[i] or share_flagged[i] < lower[i]))
        point = {**span, "n": int(parts[i]), "k": int(flagged[i]), "share": float(share_flagged[i]),
                 "lower": value(lower[i]), "upper": value(upper[i]), "alarm": beyond}
        flagged_points.append(point)
        if beyond:
            side = "above its upper" if share_flagged[i] > upper[i] else "below its lower"
            bound = upper[i] if share_flagged[i] > upper[i] else lower[i]
            alarms.append(f"share flagged {share_flagged[i]:.3f} {side} limit {bound:.3f} "
                          f"(baseline {p_bar:.3f}; {_when(point)})")
        test_alarm = bool(not np.isnan(p_values[i]) and p_values[i] < alpha)
        qrs_point = {**span, "n": int(passed[i]), "k": int(over[i]), "share": value(share_over[i]),
                     "expected": expected_qrs_share, "upper": value(limit[i]), "p_value": value(p_values[i]),
                     "alarm": test_alarm}
        qrs_points.append(qrs_point)
        if test_alarm:
            alarms.append(f"passed parts with QRS > 0: {over[i]} of {passed[i]} ({share_over[i]:.3f}), expected "
                          f"{expected_qrs_share:.3f}, one-sided binomial p = {p_values[i]:.2g} < {alpha:.3g} "
                          f"({_when(qrs_point)})")
    return {
        "per": per,
        "alpha": alpha,
        "baseline": {"size": baseline_size, "records": int(len(baseline_prediction)), "complete": complete,
                     "share_flagged": p_bar},
        "expected_qrs_share": expected_qrs_share,
        "flagged": flagged_points,
        "qrs_over_zero": qrs_points,
        "alarm": bool(alarms),
        "alarms": alarms,
    }
