"""The drift charts: p-chart limits and the one-sided binomial test against independent computations,
grouping per hour and per N parts, and a simulated line (good parts at the calibrated rate, then a
shift) that raises the alarm where it should and not before."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import numpy as np
import pytest
from scipy import stats

from qrs.drift import ALPHA, binomial_limit, binomial_p_values, drift, p_chart_limits, parse_per, point_groups

START = np.datetime64("2025-03-01T06:00:00", "us")


def test_p_chart_limits_are_3_sigma_around_the_baseline() -> None:
    lower, upper = p_chart_limits(0.05, np.array([100, 400]))
    assert upper.tolist() == pytest.approx([0.05 + 3 * (0.05 * 0.95 / 100) ** 0.5, 0.05 + 3 * (0.05 * 0.95 / 400) ** 0.5])
    assert lower.tolist() == pytest.approx([0.0, 0.05 - 3 * (0.05 * 0.95 / 400) ** 0.5])  # clipped at 0
    assert ALPHA == pytest.approx(0.0013499, abs=1e-7)


@pytest.mark.parametrize(("k", "n", "p0"), [(0, 50, 0.01), (3, 50, 0.01), (12, 200, 0.02), (7, 7, 0.5)])
def test_binomial_p_values_are_scipys_one_sided_test(k: int, n: int, p0: float) -> None:
    assert binomial_p_values(np.array([k]), np.array([n]), p0)[0] == pytest.approx(
        stats.binomtest(k, n, p0, alternative="greater").pvalue, rel=1e-9)


def test_the_binomial_limit_is_the_largest_share_that_passes_the_test() -> None:
    for n in (10, 57, 200, 1000):
        limit = int(round(binomial_limit(np.array([n]), 0.01)[0] * n))
        assert stats.binomtest(limit, n, 0.01, alternative="greater").pvalue >= ALPHA
        assert stats.binomtest(limit + 1, n, 0.01, alternative="greater").pvalue < ALPHA


def test_points_per_hour_and_per_n_parts() -> None:
    times = START + np.array([0, 10, 59, 60, 61, 180], dtype="timedelta64[m]")
    assert point_groups(times, "hour").tolist() == [0, 0, 0, 1, 1, 2]  # an empty hour makes no point
    assert point_groups(times, 4).tolist() == [0, 0, 0, 0, 1, 1]
    assert parse_per("hour") == "hour" and parse_per("50") == 50
    for bad in ("0", "day", "-3"):
        with pytest.raises(ValueError, match="per must be 'hour' or a number of parts >= 1"):
            parse_per(bad)


def simulated_line(seed: int = 0) -> dict[str, np.ndarray]:
    """A line of 6000 parts, one every 30 s (120 per hour): 3% flagged and, by the calibration, 1% of the
    passed parts with QRS > 0. From part 4000 (hour 33:20) the camera drifts: 5% of the passed parts
    carry QRS > 0; from part 5000 (hour 41:40) the share flagged rises to 9%."""
    rng = np.random.default_rng(seed)
    n = 6000
    index = np.arange(n)
    flag_rate = np.where(index >= 5000, 0.09, 0.03)
    prediction = (rng.random(n) < flag_rate).astype(np.int64)
    over_rate = np.where(index >= 4000, 0.05, 0.01)
    qrs = np.where(rng.random(n) < over_rate, rng.uniform(0.001, 0.2, n), 0.0)
    qrs[prediction == 1] = rng.uniform(0.05, 0.9, int(prediction.sum()))
    return {"time": START + index * np.timedelta64(30, "s"), "prediction": prediction, "qrs": qrs}


@pytest.mark.parametrize("per", ["hour", 240])
def test_a_simulated_shift_raises_the_alarms_where_it_should_and_not_before(per: str | int) -> None:
    line = simulated_line()
    report = drift(line["time"], line["prediction"], line["qrs"], baseline_prediction=line["prediction"][:500],
                   baseline_size=500, expected_qrs_share=0.01, per=per)
    parts_per_point = 120 if per == "hour" else 240
    assert len(report["flagged"]) == len(report["qrs_over_zero"]) == 6000 // parts_per_point
    assert report["baseline"] == {"size": 500, "records": 500, "complete": True,
                                  "share_flagged": float(line["prediction"][:500].mean())}

    def first_alarm(points: list[dict]) -> int:
        return next(i for i, p in enumerate(points) if p["alarm"])

    qrs_shift, flag_shift = 4000 // parts_per_point, 5000 // parts_per_point
    # Not before the shift, and within a few points after it (each point has 120-240 parts).
    assert qrs_shift <= first_alarm(report["qrs_over_zero"]) <= qrs_shift + 3
    assert flag_shift <= first_alarm(report["flagged"]) <= flag_shift + 3
    assert report["alarm"] and any("QRS > 0" in a for a in report["alarms"])
    assert any(a.startswith("share flagged") and "above its upper limit" in a for a in report["alarms"])

    point = report["qrs_over_zero"][2]
    in_point = slice(2 * parts_per_point, 3 * parts_per_point)
    passed = line["prediction"][in_point] == 0
    k, n = int((line["qrs"][in_point][passed] > 0).sum()), int(passed.sum())
    assert (point["k"], point["n"]) == (k, n)
    assert point["p_value"] == pytest.approx(stats.binomtest(k, n, 0.01, alternative="greater").pvalue)
    assert point["start"] == datetime(2025, 3, 1, 6, 0, tzinfo=timezone.utc) + timedelta(
        seconds=30 * 2 * parts_per_point)


def test_a_steady_line_raises_no_alarm() -> None:
    line = simulated_line()
    steady = slice(0, 4000)
    report = drift(line["time"][steady], line["prediction"][steady], line["qrs"][steady],
                   baseline_prediction=line["prediction"][:500], expected_qrs_share=0.01, per="hour")
    assert not report["alarm"] and report["alarms"] == []


def test_no_limits_until_the_baseline_is_full_and_no_test_without_expectation() -> None:
    line = simulated_line()
    part = slice(0, 300)
    report = drift(line["time"][part], np.ones(300, dtype=int), line["qrs"][part],
                   baseline_prediction=line["prediction"][:300], baseline_size=500, expected_qrs_share=None,
                   per=100)
    assert report["baseline"]["complete"] is False and report["baseline"]["records"] == 300
    assert all(p["upper"] is None and not p["alarm"] for p in report["flagged"])
    assert all(p["p_value"] is None and p["share"] is None and p["n"] == 0 for p in report["qrs_over_zero"])
    assert report["alarm"] is False
    empty = drift(line["time"][:0], line["prediction"][:0], line["qrs"][:0], baseline_prediction=[],
                  expected_qrs_share=0.01)
    assert empty["flagged"] == [] and empty["baseline"]["share_flagged"] is None
