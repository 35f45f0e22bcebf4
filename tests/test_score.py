"""QRS math on hand-built maps whose expected values are worked out in the comments."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from qrs.score import (
    calibration_scale,
    classifier_cut,
    normalize_maps,
    qrs_details,
    quality_risk_score,
    quality_risk_scores,
    risk_cuts,
    risk_level,
)

# Image 0: C = 0..15 row by row. Image 1: constant 3. Image 2: all zero.
RAMP = torch.arange(16, dtype=torch.float32).reshape(4, 4)
MAPS = torch.stack([RAMP, torch.full((4, 4), 3.0), torch.zeros(4, 4)])
LEFT_HALF = torch.zeros(4, 4, dtype=torch.bool)
LEFT_HALF[:, :2] = True


def test_dataset_norm_by_hand() -> None:
    # scale 8, tau 0.75: M = min(C/8, 1) = 0, .125, .25, .375 / .5, .625, .75, .875 / 1 x 8.
    # Over tau: .75, .875 and eight 1s -> n_over 10, sum 9.625, |R| = 16.
    d = qrs_details(MAPS, None, scale=8.0, threshold=0.75)
    assert d["qrs"].tolist() == [9.625 / 16, 0.0, 0.0]  # 0.6015625; image 1: 3/8 = .375 < tau
    assert d["area"].tolist() == [10 / 16, 0.0, 0.0]
    assert d["n_over"].tolist() == [10, 0, 0] and d["n_over"].dtype == torch.int64
    assert d["mean_over"].tolist() == pytest.approx([9.625 / 10, 0.0, 0.0])
    assert d["max_over"].tolist() == [1.0, 0.0, 0.0]
    assert d["peak"].tolist() == [15.0, 3.0, 0.0]
    assert quality_risk_score(MAPS, None, scale=8.0, threshold=0.75).tolist() == [0.6015625, 0.0, 0.0]
    assert quality_risk_score(MAPS, None, scale=8.0, threshold=0.75, aggregation="area").tolist() == [0.625, 0, 0]


def test_dataset_norm_small_scale_saturates() -> None:
    # scale 2, tau 0.9: M = min(C/2, 1) is 0, .5 and then 1 for C >= 2: image 0 has 14 ones -> 14/16;
    # image 1 (C = 3) is 1 everywhere -> 1.0.
    q = quality_risk_score(MAPS, None, scale=2.0)
    assert q.tolist() == [14 / 16, 1.0, 0.0]


def test_roi_by_hand() -> None:
    # Left two columns (8 pixels) at scale 8, tau .75: M = 0,.125 / .5,.625 / 1,1 / 1,1 -> four 1s.
    d = qrs_details(MAPS, LEFT_HALF, scale=8.0, threshold=0.75)
    assert d["qrs"][0].item() == 4 / 8
    assert d["area"][0].item() == 4 / 8
    assert d["n_over"][0].item() == 4
    assert d["mean_over"][0].item() == 1.0
    assert d["peak"][0].item() == 15.0  # the peak is of the whole raw map, not the ROI


def test_image_norm_by_hand() -> None:
    # Image 0: M = C/15; tau .75 -> C >= 11.25: 12..15, sum (12+13+14+15)/15 = 3.6 -> QRS 3.6/16 = .225.
    # Images 1 and 2 are constant -> M = 0 everywhere -> 0.
    d = qrs_details(MAPS, None, threshold=0.75, norm="image")
    assert d["qrs"].tolist() == pytest.approx([0.225, 0.0, 0.0])
    assert d["area"].tolist() == [0.25, 0.0, 0.0]
    assert d["max_over"].tolist() == [1.0, 0.0, 0.0]


def test_normalize_maps() -> None:
    maps = torch.tensor([[[-2.0, 0.0], [4.0, 10.0]], [[5.0, 5.0], [5.0, 5.0]]])
    assert normalize_maps(maps, scale=4.0).tolist() == [[[0.0, 0.0], [1.0, 1.0]], [[1.0, 1.0], [1.0, 1.0]]]
    # per image: (C - (-2)) / 12 -> 0, 1/6, 1/2, 1; the constant image gives 0.
    image = normalize_maps(maps, norm="image")
    torch.testing.assert_close(image[0], torch.tensor([[0.0, 1 / 6], [0.5, 1.0]]))
    assert torch.equal(image[1], torch.zeros(2, 2))


def test_roi_none_equals_full_roi_and_2d_roi_broadcasts() -> None:
    full = torch.ones(3, 4, 4, dtype=torch.bool)
    assert torch.equal(quality_risk_score(MAPS, None, scale=8.0), quality_risk_score(MAPS, full, scale=8.0))
    batch_roi = LEFT_HALF.expand(3, 4, 4).clone()
    assert torch.equal(
        quality_risk_score(MAPS, LEFT_HALF, scale=8.0), quality_risk_score(MAPS, batch_roi, scale=8.0)
    )


def test_empty_roi_gives_zero_for_that_image_only() -> None:
    roi = torch.ones(3, 4, 4, dtype=torch.bool)
    roi[0] = False
    d = qrs_details(MAPS, roi, scale=2.0)
    assert d["qrs"].tolist() == [0.0, 1.0, 0.0]
    assert d["area"].tolist() == [0.0, 1.0, 0.0]


@pytest.mark.parametrize("threshold", [0.0, -0.1, 1.5, float("nan")])
def test_threshold_out_of_range(threshold: float) -> None:
    with pytest.raises(ValueError, match=rf"threshold must be in \(0, 1\], got {threshold}"):
        quality_risk_score(MAPS, None, scale=8.0, threshold=threshold)
    with pytest.raises(ValueError, match="threshold must be in"):
        qrs_details(MAPS, None, scale=8.0, threshold=threshold)


def test_several_thresholds_at_once_by_hand() -> None:
    # scale 8 (image 0 of MAPS, see test_dataset_norm_by_hand): tau 1 keeps the eight 1s -> 8/16;
    # tau 0.75 -> 9.625/16; tau 0.5 adds .5, .625 -> 10.75/16. Area: 8, 10 and 12 of 16 pixels.
    q = quality_risk_scores(MAPS, None, thresholds=[1.0, 0.75, 0.5], scale=8.0)
    assert q.shape == (3, 3) and q[0].tolist() == [8 / 16, 9.625 / 16, 10.75 / 16] and q[1:].sum() == 0
    area = quality_risk_scores(MAPS, LEFT_HALF, thresholds=[1.0, 0.75, 0.5], scale=8.0, aggregation="area")
    # Left half (8 pixels): M = 0, .125 / .5, .625 / 1, 1 / 1, 1 -> 4, 4 and 6 pixels over 1, .75 and .5.
    assert area[0].tolist() == [4 / 8, 4 / 8, 6 / 8]
    with pytest.raises(ValueError, match="at least one threshold"):
        quality_risk_scores(MAPS, None, thresholds=[], scale=8.0)
    with pytest.raises(ValueError, match=r"threshold must be in \(0, 1\], got 1.5"):
        quality_risk_scores(MAPS, None, thresholds=[0.5, 1.5], scale=8.0)


def test_threshold_one_is_allowed() -> None:
    # tau = 1 at scale 8: only the eight saturated pixels count -> 8/16.
    assert quality_risk_score(MAPS, None, scale=8.0, threshold=1.0)[0].item() == 0.5


@pytest.mark.parametrize("scale", [None, 0.0, -1.0, float("inf"), float("nan")])
def test_dataset_norm_needs_positive_scale(scale: float | None) -> None:
    with pytest.raises(ValueError, match="calibration scale > 0"):
        quality_risk_score(MAPS, None, scale=scale)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="unknown norm 'global'"):
        normalize_maps(MAPS, norm="global")
    with pytest.raises(ValueError, match="unknown aggregation 'sum'"):
        quality_risk_score(MAPS, None, scale=1.0, aggregation="sum")
    with pytest.raises(ValueError, match="maps must be B x H x W"):
        quality_risk_score(RAMP, None, scale=1.0)
    with pytest.raises(ValueError, match="roi must be a bool mask"):
        quality_risk_score(MAPS, LEFT_HALF.float(), scale=1.0)
    with pytest.raises(ValueError, match=r"roi shape \(4, 3\)"):
        quality_risk_score(MAPS, LEFT_HALF[:, :3], scale=1.0)


raw_maps = arrays("float32", (2, 5, 5), elements=st.floats(0, 20, width=32))
rois = arrays("bool", (2, 5, 5))
taus = st.floats(0.01, 1.0)


@settings(max_examples=60, deadline=None)
@given(maps=raw_maps, roi=rois, scale=st.floats(0.1, 20), tau=taus, norm=st.sampled_from(["dataset", "image"]))
def test_properties(maps, roi, scale: float, tau: float, norm: str) -> None:
    m, r = torch.from_numpy(maps), torch.from_numpy(roi)
    d = qrs_details(m, r, scale=scale, threshold=tau, norm=norm)
    assert ((d["qrs"] >= 0) & (d["qrs"] <= d["area"] + 1e-6) & (d["area"] <= 1)).all()
    assert torch.equal(d["qrs"], quality_risk_score(m, r, scale=scale, threshold=tau, norm=norm))
    n_roi = r.sum(dim=(1, 2))
    assert torch.equal(d["n_over"] <= n_roi, torch.ones(2, dtype=torch.bool))
    has_over = d["n_over"] > 0
    assert (d["max_over"][has_over] >= tau - 1e-6).all() and (d["max_over"] <= 1).all()
    # qrs = mean_over * n_over / |R|
    torch.testing.assert_close(d["qrs"], d["mean_over"] * d["n_over"] / n_roi.clamp(min=1))


@settings(max_examples=60, deadline=None)
@given(maps=raw_maps, scale=st.floats(0.1, 20), taus=st.tuples(taus, taus), norm=st.sampled_from(["dataset", "image"]))
def test_monotone_in_threshold(maps, scale: float, taus: tuple[float, float], norm: str) -> None:
    low, high = sorted(taus)
    m = torch.from_numpy(maps)
    for aggregation in ("mass", "area"):
        q_low = quality_risk_score(m, None, scale=scale, threshold=low, norm=norm, aggregation=aggregation)
        q_high = quality_risk_score(m, None, scale=scale, threshold=high, norm=norm, aggregation=aggregation)
        assert (q_high <= q_low).all()


def test_calibration_scale_defective_anchor_is_the_peak_quantile() -> None:
    assert calibration_scale([1.0, 3.0, 2.0], anchor="defective") == 2.0
    assert calibration_scale(torch.tensor([1.0, 2.0, 3.0, 10.0]), anchor="defective") == 2.5  # mean of 2 and 3
    assert calibration_scale([0.0, 4.0, 4.0], anchor="defective") == 4.0  # zeros among the peaks are allowed
    assert calibration_scale([1.0, 2.0, 3.0, 4.0, 5.0], anchor="defective", quantile=0.25) == 2.0
    assert calibration_scale([1.0, 3.0, 2.0], anchor="defective", threshold=0.5) == 2.0  # tau does not enter


def test_calibration_scale_good_anchor_is_the_peak_quantile_over_tau() -> None:
    peaks = np.arange(101, dtype=np.float64)  # quantile q of 0..100 is 100 q exactly
    assert calibration_scale(peaks) == pytest.approx(99.0 / 0.9)
    assert calibration_scale(peaks, quantile=0.5, threshold=0.8) == pytest.approx(50.0 / 0.8)
    rng = np.random.default_rng(0)
    sample = rng.gamma(2.0, size=57)
    assert calibration_scale(sample, quantile=0.9, threshold=0.7) == pytest.approx(np.quantile(sample, 0.9) / 0.7)
    # a map as strong as the q-quantile of the good peaks lands exactly on tau after normalisation
    s = calibration_scale(sample, quantile=0.9, threshold=0.7)
    assert float(normalize_maps(torch.full((1, 2, 2), float(np.quantile(sample, 0.9))), scale=s)[0, 0, 0]) == \
        pytest.approx(0.7)


def test_classifier_cut_is_the_quantile_of_the_good_parts_p_defective() -> None:
    p = np.arange(101, dtype=np.float64) / 100  # quantile q of 0..1 in steps of 0.01 is q exactly
    assert classifier_cut(p, 0.99) == pytest.approx(0.99) and classifier_cut(p, 0.5) == pytest.approx(0.5)
    sample = np.random.default_rng(1).beta(1.0, 6.0, size=43)
    assert classifier_cut(torch.tensor(sample), 0.95) == pytest.approx(float(np.quantile(sample, 0.95)))
    with pytest.raises(ValueError, match="at least one good part"):
        classifier_cut([], 0.99)
    with pytest.raises(ValueError, match=r"quantile must be in \(0, 1\]"):
        classifier_cut(p, 0.0)


def test_calibration_scale_errors() -> None:
    with pytest.raises(ValueError, match=r"quantile must be in \(0, 1\]"):
        calibration_scale([1.0], quantile=0.0)
    with pytest.raises(ValueError, match="at least one good part"):
        calibration_scale([])
    with pytest.raises(ValueError, match="all 3 defective parts are zero everywhere"):
        calibration_scale([0.0, 0.0, 0.0], anchor="defective")
    with pytest.raises(ValueError, match=r"all 2 good parts are zero everywhere \(is the model trained\? With a signed "
                                         r"map such as --method evidence.*calibrate with --anchor defective instead\)"):
        calibration_scale([0.0, 0.0])
    with pytest.raises(ValueError, match="0.5 quantile of the map peaks of the 3 defective parts is 0"):
        calibration_scale([0.0, 0.0, 5.0], anchor="defective")
    with pytest.raises(ValueError, match="finite and >= 0"):
        calibration_scale([1.0, float("nan")])
    with pytest.raises(ValueError, match="finite and >= 0"):
        calibration_scale([1.0, -2.0])
    with pytest.raises(ValueError, match="unknown calibration anchor 'bad'"):
        calibration_scale([1.0], anchor="bad")


def test_risk_cuts_small_example() -> None:
    defective = [0.10, 0.30, 0.40, 0.50, 0.60, 0.70, 0.80, 0.85, 0.90, 0.95]
    good = [0.0, 0.0, 0.05, 0.05, 0.10, 0.15, 0.20, 0.35, 0.45, 0.02]
    # recall cut: 10 defective, 99% of 10 = 9.9 -> all must be kept -> the lowest defective QRS, 0.10.
    # precision cut: at 0.45, 7 defective + 1 good (7/8 = .875); at 0.40, 8/9; at 0.50, 7/7 = 1 -> 0.50.
    # The classes overlap: low 0.10, high 0.50; between: defective 0.10, 0.30, 0.40, good 0.10 ... 0.45.
    cuts, note = risk_cuts(defective + good, [1] * 10 + [0] * 10)
    assert cuts == pytest.approx((0.10, 0.50))
    assert note == ("low 0.1: below it 0 of the 10 defective validation parts (at most 1%) and 5 good ones; high "
                    "0.5: at or above it 7 of the 7 validation parts are defective (100%); medium between: 5 good "
                    "and 3 defective validation parts")
    assert risk_level([0.05, 0.10, 0.45, 0.50, 0.99], cuts) == ["low", "medium", "medium", "high", "high"]


def test_risk_cuts_drops_one_percent() -> None:
    defective = [i / 100 for i in range(1, 101)]  # 0.01 .. 1.00
    good = [0.0] * 20 + [0.5] * 10
    # recall cut: 99 of 100 may be kept -> drop 0.01 -> 0.02.
    # precision cut: at 0.50, 51 defective + 10 good (51/61 = .84); at 0.51, 50/50 -> 0.51 (below 0.50 it is lower).
    cuts, _ = risk_cuts(torch.tensor(defective + good), torch.tensor([1] * 100 + [0] * 30))
    assert cuts == pytest.approx((0.02, 0.51))


def test_separating_parts_put_the_band_between_the_precision_and_the_recall_cut() -> None:
    defective = [i / 100 for i in range(3, 103)]  # 0.03 .. 1.02
    good = [0.0] * 48 + [0.01, 0.6]
    # precision cut: at 0.01, 100 defective + 2 good (98%); at 0: 100/150 -> 0.01 (a good part's QRS).
    # recall cut: 99 of 100 defective may be kept -> 0.04, where 99 of 100 parts are defective.
    # low 0.01, high 0.04: the good part at 0.01 and the weakest defective part (0.03) are medium.
    cuts, note = risk_cuts(defective + good, [1] * 100 + [0] * 50)
    assert cuts == pytest.approx((0.01, 0.04))
    assert note.endswith("medium between: 1 good and 1 defective validation parts")
    assert risk_level([0.0, 0.005, 0.01, 0.03, 0.04, 0.6], cuts) == ["low", "low", "medium", "medium", "high", "high"]


def test_high_is_never_below_the_recall_cut() -> None:
    # precision 95% already at 0.05 (a good part, 20 of 21), but only from 0.2 on are >= 99% of the
    # defective parts at or above the cut: the good part is medium, not high.
    cuts, _ = risk_cuts([0.2] * 20 + [0.0] * 30 + [0.05], [1] * 20 + [0] * 31)
    assert cuts == pytest.approx((0.05, 0.2))


def test_exact_separation_splits_the_empty_gap_below_the_cut_halfway() -> None:
    # All 20 defective at >= 0.1, every good part at 0: recall and precision cut are both 0.1, and no
    # validation part lies between 0 and 0.1.
    cuts, note = risk_cuts([0.1] * 5 + [0.2] * 15 + [0.0] * 30, [1] * 20 + [0] * 30)
    assert cuts == pytest.approx((0.05, 0.1))
    assert note.startswith("the validation parts separate at 0.1 with none between 0 and it, so low is halfway across "
                           "that gap and a new part nearer the high cut is medium; low 0.05: below it 0 of the 20 "
                           "defective validation parts (at most 1%) and 30 good ones")
    assert risk_level([0.0, 0.04, 0.06, 0.1], cuts) == ["low", "low", "medium", "high"]


def test_two_levels_only_when_no_validation_part_scores_below_the_high_cut() -> None:
    cuts, note = risk_cuts([0.1] * 5 + [0.2] * 15 + [0.5], [1] * 20 + [0])  # 20 / 21 = 95.2% at the lowest QRS
    assert cuts == (0.1, 0.1)
    assert note == ("low = high = 0.1: no validation part scores below it, so there are two levels only; at or above "
                    "it 20 of the 21 validation parts are defective (95%)")


def test_risk_cuts_none() -> None:
    assert risk_cuts([0.9, 0.8, 0.7, 0.6, 0.1], [1, 1, 1, 1, 0]) == (
        None, "too few defective validation parts (4, fewer than 5): no risk levels")
    # Good parts above every defective one: precision never reaches 95%.
    assert risk_cuts([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.6], [1, 1, 1, 1, 1, 0, 0]) == (
        None, "no QRS cut at or above which >= 95% of the validation parts are defective: no risk levels")
    with pytest.raises(ValueError, match="no risk cuts"):
        risk_level([0.5], None)
    with pytest.raises(ValueError, match="differ in length"):
        risk_cuts([0.1, 0.2], [1])


def test_risk_level_without_medium_band() -> None:
    assert risk_level(torch.tensor([0.1, 0.3, 0.2999]), (0.3, 0.3)) == ["low", "high", "low"]


@given(raw_maps, rois, st.lists(taus, min_size=1, max_size=4), st.sampled_from(["mass", "area"]))
@settings(max_examples=40, deadline=None)
def test_each_column_equals_one_threshold_call(maps: np.ndarray, roi: np.ndarray, thresholds: list[float],
                                          aggregation: str) -> None:
    m, r = torch.from_numpy(maps), torch.from_numpy(roi)
    q = quality_risk_scores(m, r, thresholds=thresholds, scale=7.0, aggregation=aggregation)
    for t, tau in enumerate(thresholds):
        single = quality_risk_score(m, r, scale=7.0, threshold=tau, aggregation=aggregation)
        torch.testing.assert_close(q[:, t], single, atol=1e-6, rtol=0)
        assert torch.equal(q[:, t] > 0, single > 0)  # the same pixels reach tau: only the summation order differs
