"""``qrs analyze``: statistics, distribution plots and the self-contained HTML report of an extraction.

Reads what ``qrs extract`` wrote (``<prefix>_<mode>.npz`` and ``.csv``), writes ``stats.json``, one
distribution plot per mode (PNG and SVG) and ``report.html`` with every image embedded. "How sure
are these numbers": stratified bootstrap intervals of QRS AUROC and of the share of good parts at 0,
a threshold sweep recomputed from the stored raw maps and ROI (the scale held fixed), and on request
the deletion test of :mod:`qrs.faithfulness` (which needs the checkpoint and the prepared data).
"""

from __future__ import annotations

import base64
import html
import json
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from qrs.analysis import (SWEEP_THRESHOLDS, agreement, agreement_plot, deletion_plot, distribution_plot,
                          localisation_summary, qrs_statistics, sweep_plot, threshold_sweep)
from qrs.atomic import write_json, write_text
from qrs.bootstrap import BootstrapOptions, qrs_intervals, with_interval
from qrs.cam import maps_from_raw
from qrs.choices import SPLITS
from qrs.data.dataset import PreparedDataset
from qrs.errors import QrsError
from qrs.extract import ScoreOptions, unpack_roi
from qrs.faithfulness import DELETION_FRACTIONS, check_fractions, deletion_drops, deletion_summary
from qrs.images import as_size
from qrs.model import load_checkpoint, resolve_device
from qrs.overlay import png_bytes, render_overlay
from qrs.score import normalize_maps, quality_risk_scores, risk_level

GALLERY_SIZE = 8
METHOD_LABELS = {"gradcam": "Grad-CAM", "gradcam++": "Grad-CAM++", "evidence": "class evidence",
                 "xgradcam": "XGrad-CAM", "layercam": "LayerCAM", "hirescam": "HiResCAM"}


@dataclass
class ModeOutputs:
    """What ``qrs extract`` wrote for one mode (split)."""

    mode: str
    rows: pd.DataFrame
    raw_maps: np.ndarray
    options: dict[str, Any]
    roi_bits: np.ndarray | None = None
    """The packed ROI masks (``qrs.extract.pack_roi``); None in an npz written before they were stored."""

    @property
    def score_options(self) -> ScoreOptions:
        return ScoreOptions(**{f.name: self.options[f.name] for f in fields(ScoreOptions)})


@dataclass
class AnalyzeResult:
    """Where the analysis went and its numbers."""

    out: Path
    report: Path
    stats: dict[str, Any]
    plots: list[Path] = field(default_factory=list)
    metrics: dict[str, Any] | None = None

    def headline(self) -> str:
        """The F1 table (when metrics were given) and the p-values, as a few lines of text."""
        lines = []
        if self.metrics:
            lines.append(f"{'checkpoint':<22} {'F1':<20}  {'AP':<20}  AUROC")
            for name, m in self.metrics.items():
                ci = m.get("ci") or {}
                lines.append(f"{name:<22} " + "  ".join(f"{with_interval(m.get(k), ci.get(k)):<20}"
                                                        for k in ("f1", "ap", "auroc")).rstrip())
        for mode, st in self.stats["modes"].items():
            q = st["qrs"]
            lines.append(f"{mode}: QRS Mann-Whitney p = {_fmt_p(q['mann_whitney_p'])}, Welch p = {_fmt_p(q['welch_p'])}, "
                         f"KS p = {_fmt_p(q['ks_p'])}, QRS AUROC = {with_interval(q['auroc'], st['qrs_ci']['auroc'])}, "
                         f"pointing game = {_fmt(st['localisation']['pointing_game'])}")
            ag = st["agreement"]
            ceiling = ag.get("ceiling") or {}
            lines.append(f"{mode}: agreement: caught defective parts with QRS > 0 {_fmt(ag['caught_with_qrs'])}"
                         + (f" (ceiling {_fmt(ceiling['caught_with_qrs'])})" if ceiling else "")
                         + f"; AUROC of p_defective {_fmt(ag['auroc_p_defective'])}, of the map peak "
                         f"{_fmt(ag['auroc_peak'])}, of QRS {_fmt(ag['auroc_qrs'])}"
                         + (f" (ceiling {_fmt(ceiling['auroc_qrs'])})" if ceiling else ""))
            if "faithfulness" in st:
                lines.append(f"{mode}: deletion test: {st['faithfulness']['defective']['verdict']}")
        lines.append(f"report: {self.report}")
        return "\n".join(lines)


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.4f}"


def _fmt_p(v: float | None) -> str:
    return "-" if v is None else f"{v:.3g}"


def load_mode(extract_dir: Path, prefix: str, mode: str) -> ModeOutputs:
    """Read one mode's npz and csv, checking they belong together."""
    npz_path, csv_path = extract_dir / f"{prefix}_{mode}.npz", extract_dir / f"{prefix}_{mode}.csv"
    if not npz_path.is_file() or not csv_path.is_file():
        raise QrsError(f"{extract_dir} has no {npz_path.name} and {csv_path.name}: run `qrs extract` first")
    with np.load(npz_path, allow_pickle=False) as npz:
        ids, raw = npz["ids"].astype(str), npz["raw_maps"]
        options = json.loads(str(npz["options"]))
        roi_bits = npz["roi_bits"] if "roi_bits" in npz.files else None
    rows = pd.read_csv(csv_path, dtype={"id": str, "defect_type": str}, keep_default_na=False,
                       na_values={c: ["", "nan", "NaN"] for c in ("pointing_hit", "energy_in_boxes", "iou")})
    if list(rows["id"]) != list(ids):
        raise QrsError(f"{csv_path.name} and {npz_path.name} list different images: re-run `qrs extract`")
    return ModeOutputs(mode, rows, raw, options, roi_bits)


def per_defect_type(rows: pd.DataFrame) -> dict[str, dict[str, float]]:
    """Median and mean QRS and the count of defective images per defect type (comma lists split)."""
    bad = rows[(rows["label"] == 1) & (rows["defect_type"] != "")]
    if bad.empty:
        return {}
    exploded = bad.assign(defect_type=bad["defect_type"].str.split(",")).explode("defect_type")
    return {str(t): {"n": int(len(g)), "median_qrs": float(g["qrs"].median()), "mean_qrs": float(g["qrs"].mean())}
            for t, g in exploded.groupby("defect_type")}


SWEEP_BATCH = 64
"""Maps upsampled at a time by the threshold sweep (bounds its memory)."""


def sweep_qrs(mo: ModeOutputs, thresholds: list[float]) -> np.ndarray:
    """QRS (N x T) of every part at every threshold, recomputed from the stored raw maps and ROI
    with the calibration scale held fixed. With the dataset norm a part whose raw peak stays below
    the lowest threshold times the scale has QRS 0 at every threshold (upsampling never exceeds the
    peak), so only the others are upsampled."""
    if mo.roi_bits is None:
        raise ValueError("the npz has no ROI")
    opts, score = mo.options, mo.score_options
    size, norm, scale = as_size(opts["img_size"]), score.effective_norm, opts["scale"]
    raw = torch.from_numpy(mo.raw_maps)
    out = np.zeros((len(raw), len(thresholds)))
    active = torch.arange(len(raw))
    if norm == "dataset":
        peaks = raw.amax(dim=(1, 2)) / scale
        active = active[peaks >= min(thresholds) * (1 - 1e-6)]
    full = np.packbits(np.ones((1, size[0] * size[1]), dtype=bool), axis=1)
    for idx in active.split(SWEEP_BATCH):
        maps = maps_from_raw(raw[idx], size, compat=score.compat)
        bits = mo.roi_bits[idx.numpy()]
        roi = None if (bits == full).all() else unpack_roi(bits, size)
        out[idx.numpy()] = quality_risk_scores(maps, roi, thresholds=thresholds, scale=scale, norm=norm,
                                               aggregation=score.aggregation).numpy()
    return out


def _sweep(mo: ModeOutputs, out: Path, thresholds: list[float]) -> tuple[dict[str, Any], list[Path]]:
    """The threshold sweep of one mode (stats.json entry) and its plot."""
    opts = mo.options
    if mo.roi_bits is None:
        return {"rows": [], "note": f"{opts['output_prefix']}_{mo.mode}.npz has no ROI masks (written before "
                                    "`qrs extract` stored them): re-run `qrs extract` for the threshold sweep"}, []
    scale = opts["scale"]
    held = (f"with the calibration scale held fixed (s = {scale:.6g})" if mo.score_options.effective_norm == "dataset"
            else "with per-image min-max maps")
    entry = {"chosen": opts["threshold"], "aggregation": opts["aggregation"], "scale": scale,
             "rows": threshold_sweep(sweep_qrs(mo, thresholds), mo.rows["label"].to_numpy(), thresholds),
             "note": f"QRS recomputed at each tau from the stored raw maps and ROI {held}, no model run"}
    plots = sweep_plot(entry["rows"], opts["threshold"], out / f"threshold_sweep_{mo.mode}",
                       title=f"{mo.mode} split: QRS against the threshold tau")
    return entry, plots


def _faithfulness(mo: ModeOutputs, out: Path, fractions: tuple[float, ...], device: str, batch_size: int,
                  num_workers: int, progress: bool) -> tuple[dict[str, Any], list[Path]]:
    """The deletion test of one mode, on the checkpoint and prepared data that the extract recorded."""
    opts = mo.options
    model_path, data_dir = Path(opts["model_path"]), Path(opts["data_dir"])
    if not model_path.is_file():
        raise QrsError(f"the deletion test runs the model of the extract, {model_path}, which does not exist")
    if not (data_dir / "index.csv").is_file():
        raise QrsError(f"the deletion test needs the prepared dataset of the extract, {data_dir}, which is gone")
    split = PreparedDataset(data_dir).split(mo.mode, with_masks=False)
    if list(split.rows["id"]) != list(mo.rows["id"]):
        raise QrsError(f"the {mo.mode} split of {data_dir} no longer lists the extract's images: re-run `qrs extract`")
    model = load_checkpoint(model_path, device=resolve_device(device))
    morf, lerf = deletion_drops(model, split, torch.from_numpy(mo.raw_maps), mo.rows["p_defective"].to_numpy(),
                                fractions=fractions, batch_size=batch_size, num_workers=num_workers,
                                progress=progress, desc=f"deletion test ({mo.mode} split)")
    summary = deletion_summary(morf, lerf, mo.rows["label"].to_numpy(), fractions)
    plots = deletion_plot(summary, out / f"deletion_{mo.mode}",
                          title=f"{mo.mode} split: deletion test (ROAD, noisy linear imputation)")
    return summary, plots


def analyze(extract_dir: str | os.PathLike[str], *, metrics: str | os.PathLike[str] | None = None,
            out: str | os.PathLike[str] | None = None, output_prefix: str = "gradcam_weights",
            n_resamples: int = 1000, sweep: bool = True, faithfulness: bool = False,
            faithfulness_split: str = "test", fractions: tuple[float, ...] = DELETION_FRACTIONS,
            device: str = "auto", batch_size: int = 32, num_workers: int = 0,
            progress: bool = True) -> AnalyzeResult:
    """Statistics per mode, distribution plots and report.html for the outputs in ``extract_dir``.

    ``n_resamples``: bootstrap resamples of the intervals (0: none). ``sweep``: the threshold sweep
    over tau in SWEEP_THRESHOLDS. ``faithfulness``: the deletion test of ``faithfulness_split`` at
    ``fractions`` (2 x len(fractions) forward passes per part on ``device``).
    """
    extract_dir = Path(extract_dir)
    out = Path(out) if out else extract_dir / "analysis"
    modes = [m for m in SPLITS if (extract_dir / f"{output_prefix}_{m}.npz").is_file()]
    if not modes:
        raise QrsError(f"no `qrs extract` outputs ({output_prefix}_<mode>.npz) in {extract_dir}")
    if n_resamples < 0:
        raise QrsError(f"--n-resamples must be >= 0, got {n_resamples}")
    if faithfulness and faithfulness_split not in modes:
        raise QrsError(f"--faithfulness-split {faithfulness_split}: {extract_dir} has no extract of that split "
                       f"(it has {', '.join(modes)})")
    try:
        fractions = check_fractions(fractions)
    except ValueError as exc:
        raise QrsError(str(exc)) from exc
    metrics_obj = None
    if metrics is not None:
        try:
            metrics_obj = json.loads(Path(metrics).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise QrsError(f"cannot read metrics file {metrics}: {exc}") from exc
    outputs = [load_mode(extract_dir, output_prefix, m) for m in modes]
    bootstrap = BootstrapOptions(n_resamples)
    stats: dict[str, Any] = {"extract_dir": str(extract_dir), "options": outputs[0].options,
                             "mask_guided": bool(outputs[0].options.get("mask_guidance")),
                             "training_curves": training_curves_source(outputs[0].options),
                             "ci_options": bootstrap.describe(), "modes": {}}
    plots: list[Path] = []
    for mo in outputs:
        labels, qrs = mo.rows["label"].to_numpy(), mo.rows["qrs"].to_numpy()
        rows = mo.rows
        entry = {"qrs": qrs_statistics(qrs, labels), "qrs_ci": qrs_intervals(labels, qrs, bootstrap),
                 "agreement": agreement(labels, rows["prediction"].to_numpy(), rows["p_defective"].to_numpy(), qrs,
                                        rows["peak"].to_numpy(),
                                        (mo.options.get("calibration") or {}).get("p_defective_cut")),
                 "localisation": localisation_summary(rows), "per_defect_type": per_defect_type(rows),
                 "n_images": int(len(rows)),
                 "risk_levels": risk_level_counts(qrs, labels, mo.options.get("risk_cuts"))}
        plots += agreement_plot(rows["p_defective"].to_numpy(), qrs, labels, out / f"agreement_{mo.mode}",
                                title=f"{mo.mode} split: p_defective and QRS per part")
        plots += distribution_plot(qrs, labels, mo.options["arch"], out / f"qrs_distribution_{mo.mode}",
                                   method_label=METHOD_LABELS.get(mo.options["method"], mo.options["method"]),
                                   subtitle=f"{mo.mode} split, n = {len(mo.rows)}")
        if sweep:
            thresholds = sorted({*SWEEP_THRESHOLDS, float(mo.options["threshold"])})
            entry["threshold_sweep"], sweep_plots = _sweep(mo, out, thresholds)
            plots += sweep_plots
        if faithfulness and mo.mode == faithfulness_split:
            entry["faithfulness"], deletion_plots = _faithfulness(mo, out, fractions, device, batch_size, num_workers,
                                                                  progress)
            plots += deletion_plots
        stats["modes"][mo.mode] = entry
    write_json(out / "stats.json", stats)
    report = out / "report.html"
    write_text(report, render_report(outputs, stats, metrics_obj, plots))
    return AnalyzeResult(out, report, stats, plots, metrics_obj)


def training_curves_source(options: dict[str, Any]) -> dict[str, Any]:
    """Where the training curves of the run that the extract's checkpoint came from are: ``png`` (the
    run directory's ``curves.png``) or None with a ``note`` that says why they are missing."""
    run_dir = options.get("run_dir")
    if not run_dir:
        return {"run_dir": None, "png": None,
                "note": f"the checkpoint {options['model_path']} records no run directory (it was trained before qrs "
                        "recorded one, or extracted before the extract kept it): no training curves"}
    png = Path(run_dir) / "curves.png"
    if not png.is_file():
        return {"run_dir": run_dir, "png": None,
                "note": f"{png} does not exist (the run directory was moved or removed, or the run was trained "
                        "before qrs drew its curves): no training curves"}
    return {"run_dir": run_dir, "png": str(png), "note": ""}


RISK_LEVELS = ("low", "medium", "high")


def risk_level_counts(qrs: np.ndarray, labels: np.ndarray,
                      cuts: dict[str, float] | None) -> dict[str, dict[str, int]] | None:
    """Per risk level the number of good and defective parts, under the calibration's cut points (None
    without cut points)."""
    if not cuts:
        return None
    levels = np.array(risk_level(np.array(qrs, dtype=np.float64), (cuts["low"], cuts["high"])))
    labels = np.asarray(labels).astype(int)
    return {level: {"good": int(((levels == level) & (labels == 0)).sum()),
                    "defective": int(((levels == level) & (labels == 1)).sum())} for level in RISK_LEVELS}


def _training_curves(source: dict[str, Any], model_path: str) -> str:
    """The report's section of the training curves, or why they are missing."""
    head = "<h2>Training curves</h2>"
    if not source["png"]:
        return head + f"<p class='none'>{html.escape(source['note'])}</p>"
    return head + (f"<p>The run {html.escape(model_path)} came from ({html.escape(source['run_dir'])}), as its "
                   "<code>curves.png</code> shows it now: star = best validation loss (<code>best_loss.pt</code>), "
                   "diamond = best validation accuracy (<code>best_acc.pt</code>).</p>"
                   f"<div class='plots'><img class='wide' src='{_data_uri(Path(source['png']).read_bytes())}' "
                   "alt='training curves'></div>")


def _risk_levels(stats: dict[str, Any], options: dict[str, Any]) -> str:
    """The report's section of the risk levels: the cut points, how they came about, and the parts per level."""
    head = "<h2>Risk levels</h2>"
    cuts = options.get("risk_cuts")
    if not cuts:
        why = options.get("risk_note") or "the checkpoint is not calibrated"
        return head + f"<p class='none'>No risk levels: {html.escape(why)}.</p>"
    low, high = cuts["low"], cuts["high"]
    bands = (f"low: QRS &lt; {low:.4g} (release) &middot; medium: {low:.4g} &le; QRS &lt; {high:.4g} (look at the "
             f"part) &middot; high: QRS &ge; {high:.4g} (reject)" if low < high else
             f"low: QRS &lt; {high:.4g} &middot; high: QRS &ge; {high:.4g} (two levels only)")
    rows = [[mode, *(f"{c[level]['good']} / {c[level]['defective']}" for level in RISK_LEVELS)]
            for mode, st in stats["modes"].items() for c in [st["risk_levels"]]]
    return head + (f"<p>{bands}. From the validation split by <code>qrs calibrate</code>: "
                   f"{html.escape(options.get('risk_note') or '')}.</p>"
                   + _table(["split", "low: good / defective", "medium: good / defective", "high: good / defective"],
                            rows))


def _calibration_text(source: dict[str, Any] | None) -> str:
    """Where the scale came from, e.g. " (anchor good: 0.99 quantile of 120 val parts' peaks)"."""
    if not source:
        return ""
    n = f"{source['n_parts']} " if source.get("n_parts") is not None else ""
    return (f" (anchor {html.escape(source['anchor'])}: {source['quantile']:g} quantile of the map peaks of {n}"
            f"{html.escape(source['anchor'])} {html.escape(source['split'])} parts)")


def _guidance_text(guidance: dict[str, Any] | None) -> str:
    """How the model was trained with respect to the defect masks (docs/method.md#mask-guided-training)."""
    if not guidance:
        return "Trained without mask guidance (classification loss only)."
    shaped = METHOD_LABELS.get(guidance.get("map", "gradcam++"), guidance.get("map"))
    return (f"Mask-guided training: energy loss on the {shaped} map, weight {guidance['weight']:g}, masks dilated by "
            f"{guidance['dilate']} px, masks of {guidance['n_masked']} of {guidance['n_defective']} defective "
            "training images used.")


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _gallery_cards(mo: ModeOutputs, picks: pd.DataFrame, data: PreparedDataset | None) -> str:
    """Cards of image + explanation overlay for the picked rows (skipped when the data is gone)."""
    if picks.empty:
        return "<p class='none'>none</p>"
    if data is None:
        return "<p class='none'>the prepared dataset is not available; images cannot be shown</p>"
    split = data.split(mo.mode)
    position = {i: k for k, i in enumerate(split.rows["id"])}
    opts = mo.options
    score = mo.score_options
    cards = []
    for _, row in picks.iterrows():
        k = position.get(row["id"])
        if k is None:
            continue
        item = split[k]
        rgb = item["image"].permute(1, 2, 0).numpy()
        raw = torch.from_numpy(mo.raw_maps[mo.rows.index.get_loc(row.name)][None])
        maps = maps_from_raw(raw, data.img_size, compat=score.compat)
        strength = normalize_maps(maps, norm=score.effective_norm, scale=opts["scale"], clip=False)[0].numpy()
        overlay = render_overlay(rgb, strength, opts["threshold"], item["roi"].numpy())
        scale_up = max(1, 160 // max(data.img_size))
        caption = (f"{html.escape(row['id'])} · {'defective' if row['label'] else 'good'}"
                   f"{' (' + html.escape(row['defect_type']) + ')' if row['defect_type'] else ''}<br>"
                   f"p_defective {row['p_defective']:.3f} · QRS {row['qrs']:.4f}")
        cards.append(f"<figure><img src='{_data_uri(png_bytes(rgb, scale=scale_up))}' alt='image'>"
                     f"<img src='{_data_uri(png_bytes(overlay, scale=scale_up))}' alt='explanation'>"
                     f"<figcaption>{caption}</figcaption></figure>")
    return "<div class='gallery'>" + "".join(cards) + "</div>"


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _images(plots: list[Path], prefix: str, css: str = "") -> str:
    """The PNG plots whose names start with ``prefix``, embedded side by side (``css``: their class)."""
    return "<div class='plots'>" + "".join(f"<img class='{css}' src='{_data_uri(p.read_bytes())}' "
                                           f"alt='{html.escape(p.stem)}'>"
                                           for p in plots if p.suffix == ".png" and p.stem.startswith(prefix)) + "</div>"


def _how_sure(stats: dict[str, Any], metrics: dict[str, Any] | None, plots: list[Path]) -> str:
    """The "How sure are these numbers" section: intervals, threshold sweep, deletion test."""
    ci = stats["ci_options"]
    parts = ["<h2>How sure are these numbers</h2>"]
    if ci["n_resamples"]:
        sources = "F1, precision, recall, AP and AUROC above (from `qrs evaluate`) and " if metrics and any(
            m.get("ci") for m in metrics.values()) else ""
        parts.append(f"<p><b>Confidence intervals.</b> {html.escape(sources)}QRS AUROC and the share of good parts at "
                     f"QRS 0 are shown as value [low, high]: a {ci['confidence']:.0%} percentile bootstrap interval "
                     f"({ci['n_resamples']} resamples, seed {ci['seed']}), stratified by class: good and defective "
                     "parts are resampled separately, so every resample keeps the split's class counts. With few "
                     "defective parts the interval is wide; it reflects the sampling of parts, not retraining "
                     "(see <code>qrs repeat</code> for that).</p>")
    else:
        parts.append("<p>No confidence intervals (<code>--n-resamples 0</code>).</p>")
    for mode, st in stats["modes"].items():
        sweep = st.get("threshold_sweep")
        if sweep is None:
            continue
        if not sweep["rows"]:
            parts.append(f"<h3>Threshold sweep ({mode})</h3><p class='none'>{html.escape(sweep['note'])}</p>")
            continue
        rows = [[("<b>%g (chosen)</b>" % r["threshold"]) if r["threshold"] == sweep["chosen"] else f"{r['threshold']:g}",
                 _fmt(r["auroc"]), _fmt_p(r["mann_whitney_p"]), _fmt(r["zero_share_good"]),
                 _fmt(r["zero_share_defective"]), _fmt(r["median_defective"])] for r in sweep["rows"]]
        parts.append(f"<h3>Threshold sweep ({mode})</h3><p>{html.escape(sweep['note'])}; aggregation "
                     f"{html.escape(sweep['aggregation'])}. A tau where QRS AUROC and p barely move is not a "
                     "fragile choice.</p>" + _table(
                         ["τ", "QRS AUROC", "Mann-Whitney p", "good at 0", "defective at 0", "median QRS defective"],
                         rows) + _images(plots, f"threshold_sweep_{mode}"))
    for mode, st in stats["modes"].items():
        faith = st.get("faithfulness")
        if faith is None:
            continue
        header = ["parts", "n", *(f"drop at {f:.0%}: most / least relevant" for f in faith["fractions"]),
                  "area between the curves", "Wilcoxon p (one-sided)"]
        rows = [[name, str(part["n"]),
                 *((f"{m:+.4f} / {lo:+.4f}" for m, lo in zip(part["morf_mean_drop"], part["lerf_mean_drop"]))
                   if part["n"] else ["-"] * len(faith["fractions"])),
                 "-" if part["area_between"] is None else f"{part['area_between']:+.4f}", _fmt_p(part["wilcoxon_p"])]
                for name in ("defective", "good") for part in [faith[name]]]
        parts.append(f"<h3>Does the model use what the map shows? Deletion test ({mode})</h3><p>The pixels each map "
                     "ranks highest (most relevant first) or lowest (least relevant first) are removed and filled by "
                     f"noisy linear imputation (ROAD, noise {faith['noise']:g}), and the model runs again: the table "
                     "gives the mean drop of p_defective. A faithful map's most-relevant curve drops faster; the area "
                     "between the curves (trapezoid from 0) measures by how much.</p>"
                     + _table(header, rows)
                     + "".join(f"<p><b>{html.escape(faith[n]['verdict'])}</b></p>" for n in ("defective", "good"))
                     + _images(plots, f"deletion_{mode}"))
    return "".join(parts)


def _ceiling_text(ceiling: dict[str, Any] | None, calibration: dict[str, Any] | None) -> str:
    """The agreement's ceiling in words: what the same rule gives where the map ranks parts as the
    classifier does, and which side of the gap that puts the blame on. A ceiling comes only from a
    good-anchored calibration, so ``calibration`` is there whenever ``ceiling`` is."""
    if not ceiling or not calibration:
        return ""
    where = "validation" if calibration["split"] == "val" else "training"
    return (f"<p>Ceiling: if the map ranked the parts exactly as the classifier does, the same rule (above 0 "
            f"from the {calibration['quantile']:g} quantile of the good {where} parts on, here "
            f"p_defective &ge; {ceiling['p_cut']:.3f}) would give QRS AUROC {_fmt(ceiling['auroc_qrs'])}, caught "
            f"defective parts with QRS &gt; 0 {_fmt(ceiling['caught_with_qrs'])} and passed good parts at QRS 0 "
            f"{_fmt(ceiling['passed_at_0'])}. The distance from the figures above to these is the map's; the "
            "distance from these to the classifier's is the rule's: caught parts that the classifier scores "
            "no higher than 1% of the good anchor parts stay at QRS 0 on a map that agrees with it.</p>")


def _agreement_section(stats: dict[str, Any], plots: list[Path]) -> str:
    """Does QRS say what the classifier says: the parts per verdict split by QRS = 0 / > 0, the AUROCs of
    p_defective, the map peak and QRS, and the scatter of p_defective against QRS."""
    labels = {"caught": "defective, caught (fail)", "missed": "defective, missed (pass)", "passed": "good, passed",
              "flagged": "good, flagged (fail)"}
    parts = ["<h2>Agreement of QRS with the classifier</h2><p>A defective part the classifier catches (p_defective "
             "&gt; 0.5) should show evidence beyond normal variation (QRS &gt; 0), and a good part it passes "
             "should not. The calibrated threshold acts on the map's peak: a peak that separates the classes "
             "poorly leaves caught defective parts at QRS 0 and good parts above it.</p>"]
    for mode, st in stats["modes"].items():
        ag = st["agreement"]
        table = ag["table"]
        rows = [[labels[name], str(table[name]["qrs_0"]), str(table[name]["qrs_above_0"])] for name in labels]
        caught = table["caught"]["qrs_0"] + table["caught"]["qrs_above_0"]
        passed = table["passed"]["qrs_0"] + table["passed"]["qrs_above_0"]
        parts.append(f"<h3>{mode}</h3>" + _table(["parts", "QRS = 0", "QRS &gt; 0"], rows)
                     + f"<p>Caught defective parts with QRS &gt; 0: {table['caught']['qrs_above_0']} of {caught}"
                     f" ({_fmt(ag['caught_with_qrs'])}); passed good parts at QRS 0: {table['passed']['qrs_0']} of "
                     f"{passed} ({_fmt(ag['passed_at_0'])}). AUROC of p_defective {_fmt(ag['auroc_p_defective'])}, "
                     f"of the map peak {_fmt(ag['auroc_peak'])}, of QRS {_fmt(ag['auroc_qrs'])}.</p>"
                     + _ceiling_text(ag.get("ceiling"), stats["options"].get("calibration"))
                     + _images(plots, f"agreement_{mode}"))
    return "".join(parts)


def render_report(outputs: list[ModeOutputs], stats: dict[str, Any], metrics: dict[str, Any] | None,
                  plots: list[Path]) -> str:
    """The whole report as one HTML string (images embedded as data URIs)."""
    opts = outputs[0].options
    data_dir = Path(opts["data_dir"])
    data = PreparedDataset(data_dir) if (data_dir / "index.csv").is_file() else None
    sections = [_training_curves(stats["training_curves"], opts["model_path"])]
    if metrics:
        sections.append("<h2>Classification (test split)</h2>" + _table(
            ["checkpoint", "F1", "precision", "recall", "accuracy", "AP", "AUROC", "confusion [[tn, fp], [fn, tp]]"],
            [[html.escape(n), *(with_interval(m.get(k), (m.get("ci") or {}).get(k)) for k in ("f1", "precision", "recall")),
              _fmt(m["accuracy"]), *(with_interval(m.get(k), (m.get("ci") or {}).get(k)) for k in ("ap", "auroc")),
              html.escape(str(m["confusion_matrix"]))]
             for n, m in metrics.items()]))
    sections.append("<h2>QRS: defective vs non-defective</h2>" + _table(
        ["split", "n defective / good", "Mann-Whitney p (primary)", "Welch t p", "KS p", "QRS AUROC",
         "median QRS defective / good", "zero share defective / good"],
        [[mode, f"{q['n_defective']} / {q['n_good']}", _fmt_p(q["mann_whitney_p"]), _fmt_p(q["welch_p"]),
          _fmt_p(q["ks_p"]), with_interval(q["auroc"], st["qrs_ci"]["auroc"]),
          f"{_fmt(q['median_defective'])} / {_fmt(q['median_good'])}",
          f"{_fmt(q['zero_share_defective'])} / {with_interval(q['zero_share_good'], st['qrs_ci']['zero_share_good'])}"]
         for mode, st in stats["modes"].items() for q in [st["qrs"]]]))
    sections.append(_agreement_section(stats, plots))
    sections.append(_risk_levels(stats, opts))
    sections.append("<h2>Localisation (defective images with regions)</h2>" + _table(
        ["split", "pointing game (15 px at 224)", "energy in defect boxes", "IoU of M ≥ τ with the mask"],
        [[mode, _fmt(loc["pointing_game"]), _fmt(loc["energy_in_boxes"]), _fmt(loc["iou"])]
         for mode, st in stats["modes"].items() for loc in [st["localisation"]]]))
    sections.append("<h2>Distributions</h2><p>Left, the paper's figure with the share of each class at exactly QRS 0; "
                    "right, only the parts with QRS &gt; 0, which the spike at 0 hides on the left.</p>"
                    + _images(plots, "qrs_distribution_", "wide"))
    sections.append(_how_sure(stats, metrics, plots))
    for mo in outputs:
        types = stats["modes"][mo.mode]["per_defect_type"]
        if types:
            sections.append(f"<h2>QRS per defect type ({mo.mode})</h2>" + _table(
                ["defect type", "n", "median QRS", "mean QRS"],
                [[html.escape(t), str(v["n"]), _fmt(v["median_qrs"]), _fmt(v["mean_qrs"])] for t, v in types.items()]))
        rows = mo.rows
        galleries = [
            ("Highest QRS", rows.sort_values("qrs", ascending=False).head(GALLERY_SIZE)),
            ("Missed defects (defective, predicted pass)",
             rows[(rows["label"] == 1) & (rows["prediction"] == 0)].sort_values("p_defective").head(GALLERY_SIZE)),
            ("False alarms (good, predicted fail)",
             rows[(rows["label"] == 0) & (rows["prediction"] == 1)].sort_values("p_defective", ascending=False)
             .head(GALLERY_SIZE)),
        ]
        for title, picks in galleries:
            sections.append(f"<h2>{title} ({mo.mode})</h2>" + _gallery_cards(mo, picks, data))
    method = METHOD_LABELS.get(opts["method"], opts["method"])
    settings = (f"{html.escape(opts['arch'])} &middot; {method} &middot; &tau; = {opts['threshold']} &middot; "
                f"norm {opts['norm']}{' (compat)' if opts['compat'] else ''} &middot; aggregation {opts['aggregation']}"
                f" &middot; calibration scale {_fmt_p(opts['scale'])}{_calibration_text(opts.get('calibration'))}"
                f"<br>{_guidance_text(opts.get('mask_guidance'))}")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>QRS report</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 1200px; }}
table {{ border-collapse: collapse; margin: 0.5em 0 1.5em; }}
th, td {{ border: 1px solid #ccc; padding: 4px 10px; text-align: right; }}
th {{ background: #f0f0f0; }} td:first-child {{ text-align: left; }}
.plots img {{ max-width: 48%; margin-right: 1%; }}
.plots img.wide {{ max-width: 100%; }}
.gallery {{ display: flex; flex-wrap: wrap; gap: 12px; }}
figure {{ margin: 0; border: 1px solid #ddd; padding: 6px; font-size: 12px; }}
h3 {{ margin-top: 1.2em; }}
figure img {{ width: 160px; height: 160px; image-rendering: pixelated; margin-right: 4px; }}
.none {{ color: #777; }}
</style></head><body>
<h1>Quality Risk Score report</h1>
<p>{settings}<br>QRS = mean over the part (ROI) of the normalised Grad-CAM++ map where it reaches &tau;
(0 = no strong defect evidence). Overlays: heat map, ROI outline (cyan), region over &tau; (white).</p>
{''.join(sections)}
</body></html>
"""
