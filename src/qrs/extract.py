"""``qrs calibrate`` and ``qrs extract``: Grad-CAM++ maps and QRS for every image of the chosen splits.

Extraction streams: each batch's full-resolution maps are reduced to the per-image outputs of
docs/method.md#quality-risk-score (and the localisation metrics) and dropped; only the low-resolution raw maps
are kept, so memory stays bounded however many images there are. Under torchrun each rank scores
every world_size-th image and rank 0 writes the same files, in the same order, as one process.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from qrs.analysis import localisation, qrs_statistics
from qrs.atomic import write_bytes, write_text, write_with
from qrs.cam import METHODS, CamResult, compute_cams
from qrs.choices import ANCHORS, SPLITS
from qrs.data.dataset import PreparedDataset
from qrs.data.split_dataset import SplitDataset
from qrs.distributed import DistContext, all_gather_objects, init_distributed, main_first, shard_indices
from qrs.errors import QrsError
from qrs.images import Size, as_size, size_text
from qrs.memory import check_fits, scoring_need
from qrs.model import check_data_size, load_checkpoint, model_output_stride, normalize, update_checkpoint_meta
from qrs.score import (AGGREGATIONS, DEFAULT_QUANTILE, NORMS, calibration_scale, classifier_cut, normalize_maps,
                       qrs_details, risk_cuts)

ROW_COLUMNS = ("id", "label", "defect_type", "p_defective", "prediction", "qrs", "area", "n_over", "mean_over",
               "max_over", "peak", "pointing_hit", "energy_in_boxes", "iou")


@dataclass(frozen=True)
class ScoreOptions:
    """How maps become QRS: the CAM method, threshold tau, normalisation and aggregation."""

    method: str = "gradcam++"
    threshold: float = 0.9
    norm: str = "dataset"
    aggregation: str = "mass"
    compat: bool = False

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise QrsError(f"unknown --method {self.method!r}; expected one of {', '.join(METHODS)}")
        if not 0 < self.threshold <= 1:
            raise QrsError(f"--threshold must be in (0, 1], got {self.threshold}")
        if self.norm not in NORMS:
            raise QrsError(f"unknown --norm {self.norm!r}; expected one of {', '.join(NORMS)}")
        if self.aggregation not in AGGREGATIONS:
            raise QrsError(f"unknown --aggregation {self.aggregation!r}; expected one of {', '.join(AGGREGATIONS)}")

    @property
    def effective_norm(self) -> str:
        """compat maps are already min-max normalised per image, as the grad-cam package does."""
        return "image" if self.compat else self.norm


def model_cams(model: nn.Module, images: Tensor, options: ScoreOptions) -> CamResult:
    """The forward pass of the scoring path: uint8 B x 3 x H x W images -> logits, raw and full-size maps."""
    device = next(model.parameters()).device
    return compute_cams(model, normalize(images.to(device), model.qrs_meta), method=options.method,
                        compat=options.compat)


def score_maps(cams: CamResult, roi: Tensor | None, *, scale: float | None, options: ScoreOptions) -> dict[str, Tensor]:
    """What follows the forward pass: logits and maps -> p_defective, prediction, M and the section 4
    outputs. Shared by every backend (PyTorch here, ONNX Runtime in :mod:`qrs.runtime`).

    ``qrs`` follows ``options.aggregation`` (mass or area).
    """
    p = torch.softmax(cams.logits.float(), dim=1)[:, 1]
    norm = options.effective_norm
    roi = roi.to(cams.maps.device) if roi is not None else None
    details = qrs_details(cams.maps, roi, scale=scale, threshold=options.threshold, norm=norm)
    if options.aggregation == "area":
        details["qrs"] = details["area"]
    return {"logits": cams.logits, "p_defective": p, "prediction": (p > 0.5).long(), "raw": cams.raw,
            "maps": cams.maps, "normalized": normalize_maps(cams.maps, norm=norm, scale=scale), **details}


def score_batch(model: nn.Module, images: Tensor, roi: Tensor | None, *, scale: float | None,
                options: ScoreOptions) -> dict[str, Tensor]:
    """The one scoring path (extract, ``qrs score``, the service and the exported ONNX graph): uint8
    B x 3 x H x W images -> logits, p_defective, prediction, raw maps, full-size maps, M and the
    section 4 outputs, from one forward pass."""
    return score_maps(model_cams(model, images, options), roi, scale=scale, options=options)


def _loader(dataset: Dataset, ctx: DistContext, batch_size: int, num_workers: int) -> DataLoader:
    return DataLoader(Subset(dataset, shard_indices(len(dataset), ctx)), batch_size=batch_size,
                      num_workers=num_workers)


def _gather_rows(parts: dict[str, list[Tensor]], ctx: DistContext) -> dict[str, Tensor]:
    """Concatenate this rank's batches, gather all ranks, and put rows back in dataset order."""
    local = {k: torch.cat(v).cpu() for k, v in parts.items()}
    gathered = all_gather_objects(local, ctx)
    if len(gathered) == 1:
        return local
    merged = {k: torch.cat([g[k] for g in gathered]) for k in local}
    order = torch.argsort(merged["index"])
    return {k: v[order] for k, v in merged.items()}


def _build_caches(data: PreparedDataset, splits: list[str], ctx: DistContext, progress: bool) -> None:
    """Decode the splits' image caches on rank 0 before any other rank reads them (one writer)."""
    with main_first(ctx):
        for split in splits:
            data.image_cache(split, progress=progress and ctx.is_main)


def check_model_data(model: nn.Module, data: PreparedDataset, img_size: Sequence[int] | None = None) -> None:
    """The model was trained at the prepared data's size (height x width), and so does ``--img_size``
    say when given (one side for a square, or H W)."""
    check_data_size(model.qrs_meta, data.img_size, data.root)
    if img_size is not None and as_size(img_size) != data.img_size:
        raise QrsError(f"--img_size {' '.join(map(str, img_size))} differs from the prepared data's "
                       f"{size_text(data.img_size)} (height x width, and the model's)")


def _check_scoring(model: nn.Module, data: PreparedDataset, img_size: Sequence[int] | None, batch_size: int,
                   ctx: DistContext) -> None:
    """Sizes agree (:func:`check_model_data`) and a batch of ``batch_size`` fits in memory."""
    check_model_data(model, data, img_size)
    check_fits(scoring_need(model, data.img_size), batch_size, what=f"scoring with {model.qrs_meta['arch']}",
               size=data.img_size, device=ctx.device)


@torch.no_grad()
def _peaks_and_p(model: nn.Module, dataset: Dataset, ctx: DistContext, options: ScoreOptions, batch_size: int,
           num_workers: int, progress: bool) -> dict[str, Tensor]:
    """The raw-map peak and p_defective of every part of ``dataset``, in dataset order."""
    parts: dict[str, list[Tensor]] = {"index": [], "peak": [], "p_defective": []}
    for batch in tqdm(_loader(dataset, ctx, batch_size, num_workers), desc="calibrate", unit="batch",
                      disable=not (progress and ctx.is_main)):
        cams = model_cams(model, batch["image"], options)
        parts["index"].append(batch["index"])
        parts["peak"].append(cams.maps.amax(dim=(1, 2)).cpu())
        parts["p_defective"].append(torch.softmax(cams.logits.float(), dim=1)[:, 1].cpu())
    return _gather_rows(parts, ctx)


MIN_GOOD_VALIDATION = 20
"""Fewer good validation parts than this: the good anchor takes the good training parts instead."""


def calibration_source(calibration: dict[str, Any]) -> dict[str, Any]:
    """Where a calibration's scale came from: anchor, quantile, split and number of parts.

    Checkpoints calibrated before the anchor existed hold only ``scale_quantile`` (or nothing) and
    ``n_defective_train``: they are read as the rule of that version, ``defective`` at q = 0.5.
    """
    if "anchor" in calibration:
        source = {k: calibration[k] for k in ("anchor", "quantile", "split", "n_parts")}
        if "p_defective_cut" in calibration:
            source["p_defective_cut"] = calibration["p_defective_cut"]
        return source
    return {"anchor": "defective", "quantile": float(calibration.get("scale_quantile", 0.5)), "split": "train",
            "n_parts": calibration.get("n_defective_train")}


def describe_calibration(calibration: dict[str, Any]) -> str:
    """One line saying how the scale was computed, for the CLI, the service and the report."""
    src = calibration_source(calibration)
    kind = "good" if src["anchor"] == "good" else "defective"
    rule = f" / tau {calibration['threshold']:g}" if src["anchor"] == "good" else ""
    parts = f"{src['n_parts']} " if src["n_parts"] is not None else ""
    return (f"scale {calibration['scale']:.6g} = {src['quantile']:g} quantile of the map peaks of {parts}{kind} "
            f"{'validation' if src['split'] == 'val' else 'training'} parts{rule} (anchor {src['anchor']})")


def _anchor_parts(data: PreparedDataset, anchor: str) -> tuple[str, list[int], str]:
    """(split, indices within it, note) of the parts whose peaks set the scale (docs/method.md#calibration)."""
    if anchor == "defective":
        labels = data.rows("train")["label"].tolist()
        indices = [i for i, lab in enumerate(labels) if lab == 1]
        if not indices:
            raise QrsError(f"the training split of {data.root} has no defective images: cannot calibrate with "
                           "--anchor defective")
        return "train", indices, ""
    has_val = bool((data.index["split"] == "val").any())
    val_good = [i for i, lab in enumerate(data.rows("val")["label"].tolist()) if lab == 0] if has_val else []
    if len(val_good) >= MIN_GOOD_VALIDATION:
        return "val", val_good, ""
    train_good = [i for i, lab in enumerate(data.rows("train")["label"].tolist()) if lab == 0]
    if not train_good:
        raise QrsError(f"{data.root} has no good parts in its validation and training splits: cannot calibrate "
                       "with --anchor good (use --anchor defective)")
    note = (f"only {len(val_good)} good validation parts (fewer than {MIN_GOOD_VALIDATION}): the scale is taken "
            f"from the {len(train_good)} good training parts instead, on which the model was fitted")
    return "train", train_good, note


def calibrate(model_path: str | os.PathLike[str], data_root: str | os.PathLike[str], *,
              options: ScoreOptions = ScoreOptions(), anchor: str = "good", quantile: float | None = None,
              batch_size: int = 32, device: str = "auto", num_workers: int = 0,
              progress: bool = True) -> dict[str, Any]:
    """Compute the calibration scale (docs/method.md#calibration: ``anchor`` good or defective, peak
    ``quantile``, default 0.99 or 0.5) and the risk cut points (validation split), store them in the
    checkpoint, and return them."""
    return _calibrate(model_path, data_root, options, batch_size, num_workers, progress, init_distributed(device),
                      anchor, quantile)


def _calibrate(model_path: str | os.PathLike[str], data_root: str | os.PathLike[str], options: ScoreOptions,
               batch_size: int, num_workers: int, progress: bool, ctx: DistContext, anchor: str = "good",
               quantile: float | None = None) -> dict[str, Any]:
    if anchor not in ANCHORS:
        raise QrsError(f"unknown --anchor {anchor!r}; expected one of {', '.join(ANCHORS)}")
    quantile = DEFAULT_QUANTILE[anchor] if quantile is None else float(quantile)
    if not 0 < quantile <= 1:
        raise QrsError(f"--quantile must be in (0, 1], got {quantile:g}")
    model = load_checkpoint(model_path, device=ctx.device)
    data = PreparedDataset(data_root)
    _check_scoring(model, data, None, batch_size, ctx)
    split, indices, note = _anchor_parts(data, anchor)
    has_val = bool((data.index["split"] == "val").any())
    _build_caches(data, ["train", "val"] if has_val else ["train"], ctx, progress)
    if note and ctx.is_main:
        print(f"note: {note}")
    anchors = _peaks_and_p(model, Subset(data.split(split), indices), ctx, options, batch_size, num_workers, progress)
    try:
        scale = calibration_scale(anchors["peak"], anchor=anchor, quantile=quantile, threshold=options.threshold)
    except ValueError as exc:
        raise QrsError(f"cannot calibrate {model_path} on the {split} split of {data.root}: {exc}") from exc
    calibration: dict[str, Any] = {"scale": scale, "anchor": anchor, "quantile": quantile, "split": split,
                                   "n_parts": len(indices), "note": note, "method": options.method,
                                   "threshold": options.threshold, "norm": options.norm,
                                   "aggregation": options.aggregation, "risk_cuts": None, "risk_note": ""}
    if anchor == "good":
        calibration["p_defective_cut"] = classifier_cut(anchors["p_defective"], quantile)
    if has_val:
        rows = _score_split(model, data.split("val"), ctx, scale, options, batch_size, num_workers, progress,
                            desc="risk cuts")
        cuts, calibration["risk_note"] = risk_cuts(rows["qrs"], rows["label"])
        if cuts is not None:
            calibration["risk_cuts"] = {"low": cuts[0], "high": cuts[1]}
    else:
        calibration["risk_note"] = "no validation split: no risk levels"
    if ctx.is_main:
        update_checkpoint_meta(model_path, calibration=calibration)
    return calibration


@torch.no_grad()
def _score_split(model: nn.Module, dataset: SplitDataset, ctx: DistContext, scale: float | None,
                 options: ScoreOptions, batch_size: int, num_workers: int, progress: bool,
                 desc: str) -> dict[str, Tensor]:
    """Per-image outputs and raw maps of a whole split, in dataset order (gathered on every rank)."""
    keys = ("p_defective", "prediction", "qrs", "area", "n_over", "mean_over", "max_over", "peak")
    parts: dict[str, list[Tensor]] = {k: [] for k in ("index", "label", "raw", "roi_bits", *keys, "pointing_hit",
                                                       "energy_in_boxes", "iou")}
    for batch in tqdm(_loader(dataset, ctx, batch_size, num_workers), desc=desc, unit="batch",
                      disable=not (progress and ctx.is_main)):
        out = score_batch(model, batch["image"], batch["roi"], scale=scale, options=options)
        loc = localisation(out["maps"], out["normalized"], batch["defect"].to(out["maps"].device),
                           batch["boxes"].to(out["maps"].device), options.threshold)
        parts["index"].append(batch["index"])
        parts["label"].append(batch["label"])
        parts["raw"].append(out["raw"].cpu())
        parts["roi_bits"].append(pack_roi(batch["roi"]))
        for k in keys:
            parts[k].append(out[k].cpu())
        for k, v in loc.items():
            parts[k].append(v.cpu())
    return _gather_rows(parts, ctx)


def pack_roi(roi: Tensor) -> Tensor:
    """B x H x W bool ROI masks -> B x ceil(H*W / 8) uint8, one bit per pixel (``np.packbits``), for the npz."""
    return torch.from_numpy(np.packbits(roi.cpu().numpy().reshape(len(roi), -1), axis=1))


def unpack_roi(bits: np.ndarray, size: Size) -> Tensor:
    """The inverse of :func:`pack_roi`: B x H x W bool masks on the prepared grid of ``size`` (height, width)."""
    height, width = size
    flat = np.unpackbits(np.asarray(bits, dtype=np.uint8), axis=1, count=height * width)
    return torch.from_numpy(flat.reshape(len(flat), height, width).astype(bool))


def parse_modes(values: list[str]) -> list[str]:
    """Splits to extract from ``--modes`` values: ``train test``, ``train,test`` or ``["train", "test"]``."""
    modes = [m for v in values for m in re.split(r"[\s,\[\]'\"]+", v) if m]
    unknown = [m for m in modes if m not in SPLITS]
    if unknown or not modes:
        raise QrsError(f"--modes must name splits among {', '.join(SPLITS)}; got {values}")
    return list(dict.fromkeys(modes))


def load_coords(path: str | os.PathLike[str]) -> dict[str, dict[str, list]]:
    """Relative coordinates per image id from a ``coords.pkl`` or ``coords.json`` file."""
    path = Path(path)
    if not path.is_file():
        raise QrsError(f"coordinates file {path} does not exist")
    try:
        coords = pickle.loads(path.read_bytes()) if path.suffix == ".pkl" else json.loads(path.read_text())
    except (pickle.UnpicklingError, json.JSONDecodeError, EOFError, UnicodeDecodeError) as exc:
        raise QrsError(f"cannot read coordinates file {path}: {exc}") from exc
    if not isinstance(coords, dict) or not coords:
        raise QrsError(f"coordinates file {path} is empty: expected image id -> {{'roi': [...], 'defects': [...]}}")
    return coords


@dataclass
class ExtractResult:
    """The files written per mode, and the rows of each mode."""

    files: dict[str, list[Path]]
    rows: dict[str, pd.DataFrame]
    scale: float | None


def extract(data_dir: str | os.PathLike[str], model_path: str | os.PathLike[str], *,
            modes: list[str] = ("train", "test"), coords_path: str | os.PathLike[str] | None = None,
            output_prefix: str = "gradcam_weights", excel_prefix: str | None = None,
            out_dir: str | os.PathLike[str] = ".", options: ScoreOptions = ScoreOptions(), batch_size: int = 32,
            num_workers: int = 0, img_size: Sequence[int] | None = None, device: str = "auto",
            progress: bool = True) -> ExtractResult:
    """Grad-CAM++ and QRS for every image of ``modes``; writes the npz, xlsx and csv of
    docs/method.md#extraction-outputs.

    With ``norm="dataset"`` the checkpoint is calibrated first when it has no calibration for
    ``options.method`` (or, anchored on good parts, for ``options.threshold``, which enters the scale).
    """
    return _extract(data_dir, model_path, list(modes), coords_path, output_prefix, excel_prefix, out_dir, options,
                    batch_size, num_workers, img_size, progress, init_distributed(device))


def _extract(data_dir: str | os.PathLike[str], model_path: str | os.PathLike[str], modes: list[str],
             coords_path: str | os.PathLike[str] | None, output_prefix: str, excel_prefix: str | None,
             out_dir: str | os.PathLike[str], options: ScoreOptions, batch_size: int, num_workers: int,
             img_size: Sequence[int] | None, progress: bool, ctx: DistContext) -> ExtractResult:
    data = PreparedDataset(data_dir)
    modes = parse_modes(modes)
    coords = load_coords(coords_path) if coords_path else None
    model = load_checkpoint(model_path, device=ctx.device)
    _check_scoring(model, data, img_size, batch_size, ctx)
    for mode in modes:
        data.rows(mode)
    scale = None
    calibration: dict[str, Any] = {}
    if options.effective_norm == "dataset":
        calibration = model.qrs_meta.get("calibration") or {}
        source = calibration_source(calibration) if calibration else {"anchor": "good", "quantile": None}
        stale = calibration.get("method") != options.method or (
            source["anchor"] == "good" and calibration.get("threshold") != options.threshold)
        if stale:
            if ctx.is_main:
                why = "has no calibration" if not calibration else "is calibrated for another method or threshold"
                print(f"{model_path} {why}: calibrating it for {options.method} at threshold {options.threshold:g} "
                      f"first (anchor {source['anchor']})")
            calibration = _calibrate(model_path, data_dir, options, batch_size, num_workers, progress, ctx,
                                     source["anchor"], source["quantile"])
        scale = float(calibration["scale"])
    _build_caches(data, modes, ctx, progress)
    excel_prefix = excel_prefix or f"over_{options.threshold:g}_weights"
    out = Path(out_dir)
    files: dict[str, list[Path]] = {}
    frames: dict[str, pd.DataFrame] = {}
    for mode in modes:
        dataset = data.split(mode, coords=coords)
        result = _score_split(model, dataset, ctx, scale, options, batch_size, num_workers, progress,
                              desc=f"extract {mode}")
        rows = _rows_frame(dataset, result)
        frames[mode] = rows
        if ctx.is_main:
            meta = {"mode": mode, "arch": model.qrs_meta["arch"], "model_path": str(model_path),
                    "data_dir": str(data_dir), "img_size": list(data.img_size),
                    "output_stride": model_output_stride(model.qrs_meta), "scale": scale,
                    "calibration": calibration_source(calibration) if calibration else None,
                    "mask_guidance": model.qrs_meta.get("mask_guidance"), "run_dir": model.qrs_meta.get("run_dir"),
                    "risk_cuts": calibration.get("risk_cuts"), "risk_note": calibration.get("risk_note"),
                    **asdict(options),
                    "excel_prefix": excel_prefix, "output_prefix": output_prefix}
            files[mode] = _write_mode(out, output_prefix, excel_prefix, mode, rows, result, meta)
    return ExtractResult(files, frames, scale)


def _rows_frame(dataset: SplitDataset, result: dict[str, Tensor]) -> pd.DataFrame:
    frame = pd.DataFrame({"id": dataset.rows["id"], "label": result["label"].numpy(),
                          "defect_type": dataset.rows["defect_type"]})
    for col in ROW_COLUMNS[3:]:
        frame[col] = result[col].numpy()
    return frame


def _write_mode(out: Path, output_prefix: str, excel_prefix: str, mode: str, rows: pd.DataFrame,
                result: dict[str, Tensor], meta: dict[str, Any]) -> list[Path]:
    npz_path = out / f"{output_prefix}_{mode}.npz"
    buf = io.BytesIO()
    np.savez_compressed(buf, ids=rows["id"].to_numpy(dtype=str), labels=rows["label"].to_numpy(),
                        p_defective=rows["p_defective"].to_numpy(), qrs=rows["qrs"].to_numpy(),
                        raw_maps=result["raw"].numpy().astype(np.float32), roi_bits=result["roi_bits"].numpy(),
                        scale=np.float64(np.nan if meta["scale"] is None else meta["scale"]),
                        options=np.array(json.dumps(meta)))
    write_bytes(npz_path, buf.getvalue())
    csv_path = out / f"{output_prefix}_{mode}.csv"
    write_text(csv_path, rows.to_csv(index=False))
    stats = qrs_statistics(rows["qrs"].to_numpy(), rows["label"].to_numpy())
    xlsx_path = out / f"{excel_prefix}_{mode}.xlsx"

    def write_xlsx(tmp: Path) -> None:
        with pd.ExcelWriter(tmp, engine="openpyxl") as writer:
            rows.to_excel(writer, sheet_name="images", index=False)
            pd.DataFrame({"statistic": list(stats), "value": list(stats.values())}).to_excel(
                writer, sheet_name="statistics", index=False)
            pd.DataFrame({"option": list(meta), "value": [str(v) for v in meta.values()]}).to_excel(
                writer, sheet_name="options", index=False)

    write_with(xlsx_path, write_xlsx)
    return [npz_path, xlsx_path, csv_path]
