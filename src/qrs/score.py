"""Quality Risk Score math (docs/method.md#calibration, #quality-risk-score): tensors in, tensors out, no I/O.

Maps are raw class activation maps C (B x H x W, usually upsampled to the input size); the ROI R is
a boolean mask of the inspected part. M is the normalised map in [0, 1] and tau the threshold.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from qrs.choices import AGGREGATIONS, NORMS


def normalize_maps(maps: Tensor, *, norm: str = "dataset", scale: float | None = None, clip: bool = True) -> Tensor:
    """M from raw maps C (B x H x W).

    ``dataset``: clip(C / scale, 0, 1) with the calibration scale (> 0, see calibration_scale), so a
    threshold means the same evidence strength on every image. ``image``: per-image min-max, 0 where
    the map is constant (the pytorch-grad-cam convention). ``clip=False`` keeps C / scale above 1
    (the evidence strength, which the overlay shows where M saturates).
    """
    if maps.dim() != 3:
        raise ValueError(f"maps must be B x H x W, got shape {tuple(maps.shape)}")
    if norm == "dataset":
        if scale is None or not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"norm='dataset' needs a finite calibration scale > 0, got {scale!r}")
        strength = (maps / float(scale)).clamp(min=0)
        return strength.clamp(max=1) if clip else strength
    if norm == "image":
        low = maps.amin(dim=(1, 2), keepdim=True)
        span = maps.amax(dim=(1, 2), keepdim=True) - low
        return torch.where(span > 0, (maps - low) / torch.where(span > 0, span, 1), 0)
    raise ValueError(f"unknown norm {norm!r}; valid: {', '.join(NORMS)}")


def _roi_mask(maps: Tensor, roi: Tensor | None) -> Tensor:
    """The ROI as a B x H x W bool mask on the maps' device: None = whole image, H x W = every image."""
    if roi is None:
        return torch.ones(maps.shape, dtype=torch.bool, device=maps.device)
    if roi.dtype != torch.bool:
        raise ValueError(f"roi must be a bool mask, got {roi.dtype}")
    if roi.shape not in (maps.shape, maps.shape[1:]):
        raise ValueError(
            f"roi shape {tuple(roi.shape)} matches neither B x H x W nor H x W of maps {tuple(maps.shape)}"
        )
    return roi.to(maps.device).expand(maps.shape)


def _check_threshold(threshold: float) -> None:
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must be in (0, 1], got {threshold!r}")


def _check_quantile(quantile: float) -> None:
    if not 0 < quantile <= 1:
        raise ValueError(f"the calibration quantile must be in (0, 1], got {quantile:g}")


def _normalized_region(maps: Tensor, roi: Tensor | None, scale: float | None, norm: str) -> tuple[Tensor, Tensor, Tensor]:
    """(M, R, |R| as float): the shared core of every QRS output."""
    m = normalize_maps(maps, norm=norm, scale=scale)
    region = _roi_mask(maps, roi)
    return m, region, region.sum(dim=(1, 2)).to(m.dtype)


def _share(total: Tensor, count: Tensor) -> Tensor:
    """total / count per image, 0 where count is 0 (an empty ROI, or no pixel over tau)."""
    return torch.where(count > 0, total / count.clamp(min=1), 0)


def quality_risk_scores(
    maps: Tensor,
    roi: Tensor | None,
    *,
    thresholds: Sequence[float],
    scale: float | None = None,
    norm: str = "dataset",
    aggregation: str = "mass",
) -> Tensor:
    """QRS per image at each threshold (B x T), from one pass over the maps: the threshold sweep.

    Column t equals ``quality_risk_score`` at ``thresholds[t]`` up to rounding (sums in float64):
    each pixel of R that reaches the lowest threshold (pixels outside R are set to 0, below every
    tau > 0) is put in the bucket of the thresholds it reaches, the buckets are summed per image,
    and the sum over tau_t is the sum of the buckets at and above it. One pass instead of one per
    threshold, and only over the pixels that count.
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {aggregation!r}; valid: {', '.join(AGGREGATIONS)}")
    if not thresholds:
        raise ValueError("thresholds must name at least one threshold")
    for threshold in thresholds:
        _check_threshold(threshold)
    m = normalize_maps(maps, norm=norm, scale=scale)
    b = m.shape[0]
    if roi is None:
        values, n_roi = m.reshape(b, -1), torch.full((b,), float(m[0].numel()), dtype=torch.float64)
    else:
        region = _roi_mask(maps, roi)
        values = torch.where(region, m, 0).reshape(b, -1)
        n_roi = region.sum(dim=(1, 2)).to(torch.float64)
    levels, order = torch.sort(torch.tensor([float(t) for t in thresholds], dtype=m.dtype, device=m.device))
    image, pixel = torch.nonzero(values >= levels[0], as_tuple=True)
    over = values[image, pixel]
    bucket = torch.bucketize(over, levels, right=True)
    weights = over.to(torch.float64) if aggregation == "mass" else torch.ones_like(over, dtype=torch.float64)
    sums = torch.zeros(b, len(levels) + 1, dtype=torch.float64, device=m.device)
    sums.index_put_((image, bucket), weights, accumulate=True)
    at_or_above = sums.flip(1).cumsum(1).flip(1)[:, 1:]
    out = torch.empty_like(at_or_above)
    out[:, order] = at_or_above
    return _share(out, n_roi[:, None].to(m.device)).to(m.dtype)


def quality_risk_score(
    maps: Tensor,
    roi: Tensor | None,
    *,
    scale: float | None = None,
    threshold: float = 0.9,
    norm: str = "dataset",
    aggregation: str = "mass",
) -> Tensor:
    """QRS per image (B,), in [0, 1].

    mass: (1 / |R|) * sum of M(p) over p in R with M(p) >= tau. area: share of R with M(p) >= tau.
    An image whose ROI is empty gets 0 (no part, no evidence) rather than an error, so one bad ROI
    does not stop a batch.
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {aggregation!r}; valid: {', '.join(AGGREGATIONS)}")
    _check_threshold(threshold)
    m, region, n_roi = _normalized_region(maps, roi, scale, norm)
    over = region & (m >= threshold)
    total = (m * over).sum(dim=(1, 2)) if aggregation == "mass" else over.sum(dim=(1, 2)).to(m.dtype)
    return _share(total, n_roi)


def qrs_details(
    maps: Tensor,
    roi: Tensor | None,
    *,
    scale: float | None = None,
    threshold: float = 0.9,
    norm: str = "dataset",
) -> dict[str, Tensor]:
    """The per-image outputs of docs/method.md#quality-risk-score, each a tensor of shape (B,).

    qrs (mass aggregation), area (share of R over tau), n_over (int64 count of R pixels over tau),
    mean_over and max_over (of M over tau inside R, 0 when none), peak (max of the raw map).
    """
    _check_threshold(threshold)
    m, region, n_roi = _normalized_region(maps, roi, scale, norm)
    over = region & (m >= threshold)
    n_over = over.sum(dim=(1, 2))
    mass = (m * over).sum(dim=(1, 2))
    return {
        "qrs": _share(mass, n_roi),
        "area": _share(n_over.to(m.dtype), n_roi),
        "n_over": n_over,
        "mean_over": _share(mass, n_over.to(m.dtype)),
        "max_over": torch.where(over, m, 0).amax(dim=(1, 2)),
        "peak": maps.amax(dim=(1, 2)),
    }


DEFAULT_QUANTILE = {"good": 0.99, "defective": 0.5}
"""The peak quantile q per calibration anchor (docs/method.md#calibration)."""


def calibration_scale(peaks: Tensor | Sequence[float], *, anchor: str = "good", quantile: float | None = None,
                      threshold: float = 0.9) -> float:
    """The dataset-norm scale s from the raw-map peaks of the anchor parts (docs/method.md#calibration).

    ``good`` (peaks of good parts): s = P_q / tau, so M reaches tau exactly where the map is stronger
    than a share q of good parts ever show (q defaults to 0.99). ``defective`` (peaks of defective
    training parts, the first version's rule): s = P_q (q defaults to 0.5, the median). P_q is the
    q-quantile with linear interpolation.
    """
    if anchor not in DEFAULT_QUANTILE:
        raise ValueError(f"unknown calibration anchor {anchor!r}; valid: {', '.join(DEFAULT_QUANTILE)}")
    q = DEFAULT_QUANTILE[anchor] if quantile is None else float(quantile)
    _check_quantile(q)
    _check_threshold(threshold)
    values = torch.as_tensor(peaks, dtype=torch.float64).flatten()
    if values.numel() == 0:
        raise ValueError(f"calibration needs the map peaks of at least one {anchor} part")
    if not torch.isfinite(values).all() or (values < 0).any():
        raise ValueError("map peaks must be finite and >= 0")
    if not (values > 0).any():
        signed = ("" if anchor == "defective" else " With a signed map such as --method evidence, no good part "
                  "showing any evidence of a defect is possible: calibrate with --anchor defective instead")
        raise ValueError(f"the class activation maps of all {values.numel()} {anchor} parts are zero everywhere "
                         f"(is the model trained?{signed})")
    peak_q = float(torch.quantile(values, q))
    if peak_q == 0:
        raise ValueError(f"the {q:g} quantile of the map peaks of the {values.numel()} {anchor} parts is 0 (at least "
                         f"that share of them has an all-zero map): raise the quantile (up to 1)")
    return peak_q / threshold if anchor == "good" else peak_q


def classifier_cut(p_defective: Tensor | Sequence[float], quantile: float) -> float:
    """The classifier's counterpart of the good anchor's P_q: the ``quantile`` of p_defective over the
    same good parts (linear interpolation). A part at or above it is one the good-anchored rule would
    lift above QRS 0 if the map ranked parts exactly as the classifier does: the agreement's ceiling
    (docs/method.md#agreement-with-the-classifier)."""
    values = torch.as_tensor(p_defective, dtype=torch.float64).flatten()
    if values.numel() == 0:
        raise ValueError("the classifier's cut needs p_defective of at least one good part")
    _check_quantile(quantile)
    return float(torch.quantile(values, quantile))


MIN_DEFECTIVE_FOR_CUTS = 5
LOW_CUT_RECALL_PCT = 99
"""Share of defective parts (percent) the low cut must keep at or above it."""
HIGH_CUT_PRECISION_PCT = 95
"""Share of defective parts (percent) among all parts at or above the high cut."""


def risk_cuts(qrs: Tensor | Sequence[float],
              labels: Tensor | Sequence[int]) -> tuple[tuple[float, float] | None, str]:
    """Cuts (low, high) on QRS from a validation split (labels: 1 = defective, 0 = good), and a line
    that says how they came about and what they do to the validation parts (or why there are none).

    QRS below low is low risk (release), at or above high is high risk (reject), between is medium
    (a person looks at the part). Candidate cuts are the observed QRS values:

    - the recall cut R: the highest cut that keeps >= 99% of the defective parts at or above it;
    - the precision cut P: the lowest cut at or above which >= 95% of the parts are defective.

    low = min(R, P): below it lie at most 1% of the defective parts. high = the lowest cut at or above R
    where >= 95% of the parts are defective (P itself when P >= R): at or above it the parts are
    defective and hold almost all the defects. Where the classes overlap (R < P) medium holds the
    mixed parts; where they separate (P < R) it holds the few parts between them. Where R = P (the
    split separates exactly there) low is halfway between the highest QRS below that cut and the cut,
    so that the gap no validation part falls in becomes medium in its upper half; only when no part
    scores below the cut are there two levels (low = high). None when there are fewer than 5
    defective parts or no cut reaches 95%.
    """
    scores = torch.as_tensor(qrs, dtype=torch.float64).flatten()
    defective = torch.as_tensor(labels).flatten().to(torch.bool)
    if scores.shape != defective.shape:
        raise ValueError(f"qrs and labels differ in length: {scores.numel()} vs {defective.numel()}")
    n_defective = int(defective.sum())
    if n_defective < MIN_DEFECTIVE_FOR_CUTS:
        return None, (f"too few defective validation parts ({n_defective}, fewer than {MIN_DEFECTIVE_FOR_CUTS}): "
                      "no risk levels")
    cuts = torch.unique(scores)
    at_or_above = scores[None, :] >= cuts[:, None]
    kept_defective = (at_or_above & defective[None, :]).sum(dim=1)
    kept = at_or_above.sum(dim=1)
    enough_recall = 100 * kept_defective >= LOW_CUT_RECALL_PCT * n_defective
    precise = 100 * kept_defective >= HIGH_CUT_PRECISION_PCT * kept
    recall_cut = float(cuts[enough_recall].max())
    if not (precise & (cuts >= recall_cut)).any():
        return None, (f"no QRS cut at or above which >= {HIGH_CUT_PRECISION_PCT}% of the validation parts are "
                      "defective: no risk levels")
    precision_cut = float(cuts[precise].min())
    high = float(cuts[precise & (cuts >= recall_cut)].min())
    low = min(recall_cut, precision_cut)
    how = ""
    if low == high:
        below = scores[scores < high]
        if below.numel() == 0:
            return (high, high), (f"low = high = {high:.4g}: no validation part scores below it, so there are two "
                                  f"levels only; at or above it {_share_defective(scores, defective, high)}")
        gap_low = float(below.max())
        low = (gap_low + high) / 2
        how = (f"the validation parts separate at {high:.4g} with none between {gap_low:.4g} and it, so low is "
               "halfway across that gap and a new part nearer the high cut is medium; ")
    level = torch.where(scores >= high, 2, torch.where(scores < low, 0, 1))
    count = {(k, d): int(((level == k) & (defective == d)).sum()) for k in (0, 1, 2) for d in (False, True)}
    return (low, high), (f"{how}low {low:.4g}: below it {count[0, True]} of the {n_defective} defective validation "
                         f"parts (at most {100 - LOW_CUT_RECALL_PCT}%) and {count[0, False]} good ones; high "
                         f"{high:.4g}: at or above it {_share_defective(scores, defective, high)}; medium between: "
                         f"{count[1, False]} good and {count[1, True]} defective validation parts")


def _share_defective(scores: Tensor, defective: Tensor, cut: float) -> str:
    """'N of the M validation parts are defective (P%)' for the parts at or above ``cut``."""
    kept = scores >= cut
    n, bad = int(kept.sum()), int((kept & defective).sum())
    return f"{bad} of the {n} validation parts are defective ({bad / n:.0%})"


def risk_level(qrs: Tensor | Sequence[float], cuts: tuple[float, float] | None) -> list[str]:
    """"low" below the low cut, "high" at or above the high cut, "medium" between."""
    if cuts is None:
        raise ValueError("no risk cuts (risk_cuts returned None): risk levels are undefined")
    low, high = cuts
    values = torch.as_tensor(qrs, dtype=torch.float64).flatten().tolist()
    return ["high" if q >= high else "low" if q < low else "medium" for q in values]
