"""``qrs analyze``: statistics, distribution plots and the self-contained HTML report of an extraction.

Reads what ``qrs extract`` wrote (``<prefix>_<mode>.npz`` and ``.csv``), writes ``stats.json``, one
distribution plot per mode (PNG and SVG) and ``report.html`` with every image embedded.
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

from qrs.analysis import distribution_plot, localisation_summary, qrs_statistics
from qrs.atomic import write_json, write_text
from qrs.cam import upsample
from qrs.choices import SPLITS
from qrs.data.dataset import PreparedDataset
from qrs.errors import QrsError
from qrs.extract import ScoreOptions
from qrs.overlay import png_bytes, render_overlay
from qrs.score import normalize_maps

GALLERY_SIZE = 8
METHOD_LABELS = {"gradcam": "Grad-CAM", "gradcam++": "Grad-CAM++", "xgradcam": "XGrad-CAM", "layercam": "LayerCAM",
                 "hirescam": "HiResCAM"}


@dataclass
class ModeOutputs:
    """What ``qrs extract`` wrote for one mode (split)."""

    mode: str
    rows: pd.DataFrame
    raw_maps: np.ndarray
    options: dict[str, Any]


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
            lines.append("checkpoint              F1      AP      AUROC")
            for name, m in self.metrics.items():
                lines.append(f"{name:<22} {m['f1']:.4f}  {_fmt(m.get('ap'))}  {_fmt(m.get('auroc'))}")
        for mode, st in self.stats["modes"].items():
            q = st["qrs"]
            lines.append(f"{mode}: QRS Mann-Whitney p = {_fmt_p(q['mann_whitney_p'])}, Welch p = {_fmt_p(q['welch_p'])}, "
                         f"KS p = {_fmt_p(q['ks_p'])}, QRS AUROC = {_fmt(q['auroc'])}, pointing game = "
                         f"{_fmt(st['localisation']['pointing_game'])}")
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
    rows = pd.read_csv(csv_path, dtype={"id": str, "defect_type": str}, keep_default_na=False,
                       na_values={c: ["", "nan", "NaN"] for c in ("pointing_hit", "energy_in_boxes", "iou")})
    if list(rows["id"]) != list(ids):
        raise QrsError(f"{csv_path.name} and {npz_path.name} list different images: re-run `qrs extract`")
    return ModeOutputs(mode, rows, raw, options)


def per_defect_type(rows: pd.DataFrame) -> dict[str, dict[str, float]]:
    """Median and mean QRS and the count of defective images per defect type (comma lists split)."""
    bad = rows[(rows["label"] == 1) & (rows["defect_type"] != "")]
    if bad.empty:
        return {}
    exploded = bad.assign(defect_type=bad["defect_type"].str.split(",")).explode("defect_type")
    return {str(t): {"n": int(len(g)), "median_qrs": float(g["qrs"].median()), "mean_qrs": float(g["qrs"].mean())}
            for t, g in exploded.groupby("defect_type")}


def analyze(extract_dir: str | os.PathLike[str], *, metrics: str | os.PathLike[str] | None = None,
            out: str | os.PathLike[str] | None = None, output_prefix: str = "gradcam_weights") -> AnalyzeResult:
    """Statistics per mode, distribution plots and report.html for the outputs in ``extract_dir``."""
    extract_dir = Path(extract_dir)
    out = Path(out) if out else extract_dir / "analysis"
    modes = [m for m in SPLITS if (extract_dir / f"{output_prefix}_{m}.npz").is_file()]
    if not modes:
        raise QrsError(f"no `qrs extract` outputs ({output_prefix}_<mode>.npz) in {extract_dir}")
    metrics_obj = None
    if metrics is not None:
        try:
            metrics_obj = json.loads(Path(metrics).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise QrsError(f"cannot read metrics file {metrics}: {exc}") from exc
    outputs = [load_mode(extract_dir, output_prefix, m) for m in modes]
    stats: dict[str, Any] = {"extract_dir": str(extract_dir), "options": outputs[0].options,
                             "mask_guided": bool(outputs[0].options.get("mask_guidance")), "modes": {}}
    plots: list[Path] = []
    for mo in outputs:
        labels, qrs = mo.rows["label"].to_numpy(), mo.rows["qrs"].to_numpy()
        stats["modes"][mo.mode] = {"qrs": qrs_statistics(qrs, labels), "localisation": localisation_summary(mo.rows),
                                   "per_defect_type": per_defect_type(mo.rows), "n_images": int(len(mo.rows))}
        plots += distribution_plot(qrs, labels, mo.options["arch"], out / f"qrs_distribution_{mo.mode}",
                                   method_label=METHOD_LABELS.get(mo.options["method"], mo.options["method"]),
                                   subtitle=f"{mo.mode} split, n = {len(mo.rows)}")
    write_json(out / "stats.json", stats)
    report = out / "report.html"
    write_text(report, render_report(outputs, stats, metrics_obj, plots))
    return AnalyzeResult(out, report, stats, plots, metrics_obj)


def _calibration_text(source: dict[str, Any] | None) -> str:
    """Where the scale came from, e.g. " (anchor good: 0.99 quantile of 120 val parts' peaks)"."""
    if not source:
        return ""
    n = f"{source['n_parts']} " if source.get("n_parts") is not None else ""
    return (f" (anchor {html.escape(source['anchor'])}: {source['quantile']:g} quantile of the map peaks of {n}"
            f"{html.escape(source['anchor'])} {html.escape(source['split'])} parts)")


def _guidance_text(guidance: dict[str, Any] | None) -> str:
    """How the model was trained with respect to the defect masks (QRS_SPEC section 2b)."""
    if not guidance:
        return "Trained without mask guidance (classification loss only)."
    return (f"Mask-guided training: energy loss, weight {guidance['weight']:g}, masks dilated by "
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
    norm = ScoreOptions(**{f.name: opts[f.name] for f in fields(ScoreOptions)}).effective_norm
    cards = []
    for _, row in picks.iterrows():
        k = position.get(row["id"])
        if k is None:
            continue
        item = split[k]
        rgb = item["image"].permute(1, 2, 0).numpy()
        raw = torch.from_numpy(mo.raw_maps[mo.rows.index.get_loc(row.name)][None])
        maps = upsample(raw, (data.img_size, data.img_size))
        m = normalize_maps(maps, norm=norm, scale=opts["scale"])[0].numpy()
        roi = item["roi"].numpy()
        overlay = render_overlay(rgb, m, roi, (m >= opts["threshold"]) & roi)
        scale_up = max(1, 160 // data.img_size)
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


def render_report(outputs: list[ModeOutputs], stats: dict[str, Any], metrics: dict[str, Any] | None,
                  plots: list[Path]) -> str:
    """The whole report as one HTML string (images embedded as data URIs)."""
    opts = outputs[0].options
    data_dir = Path(opts["data_dir"])
    data = PreparedDataset(data_dir) if (data_dir / "index.csv").is_file() else None
    sections = []
    if metrics:
        sections.append("<h2>Classification (test split)</h2>" + _table(
            ["checkpoint", "F1", "precision", "recall", "accuracy", "AP", "AUROC", "confusion [[tn, fp], [fn, tp]]"],
            [[html.escape(n), _fmt(m["f1"]), _fmt(m["precision"]), _fmt(m["recall"]), _fmt(m["accuracy"]),
              _fmt(m.get("ap")), _fmt(m.get("auroc")), html.escape(str(m["confusion_matrix"]))]
             for n, m in metrics.items()]))
    sections.append("<h2>QRS: defective vs non-defective</h2>" + _table(
        ["split", "n defective / good", "Mann-Whitney p (primary)", "Welch t p", "KS p", "QRS AUROC",
         "median QRS defective / good", "zero share defective / good"],
        [[mode, f"{q['n_defective']} / {q['n_good']}", _fmt_p(q["mann_whitney_p"]), _fmt_p(q["welch_p"]),
          _fmt_p(q["ks_p"]), _fmt(q["auroc"]), f"{_fmt(q['median_defective'])} / {_fmt(q['median_good'])}",
          f"{_fmt(q['zero_share_defective'])} / {_fmt(q['zero_share_good'])}"]
         for mode, st in stats["modes"].items() for q in [st["qrs"]]]))
    sections.append("<h2>Localisation (defective images with regions)</h2>" + _table(
        ["split", "pointing game (15 px at 224)", "energy in defect boxes", "IoU of M ≥ τ with the mask"],
        [[mode, _fmt(loc["pointing_game"]), _fmt(loc["energy_in_boxes"]), _fmt(loc["iou"])]
         for mode, st in stats["modes"].items() for loc in [st["localisation"]]]))
    sections.append("<h2>Distributions</h2><div class='plots'>" + "".join(
        f"<img src='{_data_uri(p.read_bytes())}' alt='{html.escape(p.stem)}'>" for p in plots if p.suffix == ".png")
        + "</div>")
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
.gallery {{ display: flex; flex-wrap: wrap; gap: 12px; }}
figure {{ margin: 0; border: 1px solid #ddd; padding: 6px; font-size: 12px; }}
figure img {{ width: 160px; height: 160px; image-rendering: pixelated; margin-right: 4px; }}
.none {{ color: #777; }}
</style></head><body>
<h1>Quality Risk Score report</h1>
<p>{settings}<br>QRS = mean over the part (ROI) of the normalised Grad-CAM++ map where it reaches &tau;
(0 = no strong defect evidence). Overlays: heat map, ROI outline (cyan), region over &tau; (white).</p>
{''.join(sections)}
</body></html>
"""
