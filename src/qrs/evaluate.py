"""``qrs evaluate``: the paper's F1 table and more, per checkpoint (docs/method.md#classification).

Positive class = defective, prediction = argmax of the softmax. Besides F1, precision, recall,
accuracy and the confusion matrix, it reports the threshold-free AP and AUROC of p_defective, and
F1 on the test split at the p_defective threshold that maximises F1 on the validation split. F1,
precision, recall, AUROC and AP get stratified bootstrap 95% confidence intervals (:mod:`qrs.bootstrap`).
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import (
    accuracy_score, average_precision_score, confusion_matrix, f1_score, precision_recall_curve, precision_score,
    recall_score, roc_auc_score,
)
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from qrs.atomic import write_json, write_text
from qrs.bootstrap import CLASSIFICATION_METRICS, BootstrapOptions, classification_intervals, with_interval
from qrs.data.dataset import PreparedDataset
from qrs.data.split_dataset import SplitDataset
from qrs.errors import QrsError
from qrs.model import check_data_size, load_checkpoint, normalize, resolve_device


@torch.inference_mode()
def predict(model: nn.Module, dataset: SplitDataset, *, batch_size: int = 64, num_workers: int = 0,
            progress: bool = True) -> np.ndarray:
    """p_defective (softmax of class 1) for every image of ``dataset``, in order."""
    device = next(model.parameters()).device
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers)
    out = []
    for batch in tqdm(loader, desc=f"predict {dataset.split_name}", unit="batch", leave=False, disable=not progress):
        logits = model(normalize(batch["image"].to(device), model.qrs_meta))
        out.append(torch.softmax(logits.float(), dim=1)[:, 1].cpu())
    return torch.cat(out).numpy()


def best_f1_threshold(labels: np.ndarray, p_defective: np.ndarray) -> float:
    """The p_defective threshold (predict defective when p >= t) that maximises F1 on these labels."""
    precision, recall, thresholds = precision_recall_curve(labels, p_defective)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros_like(precision),
                   where=(precision + recall) > 0)
    return float(thresholds[int(np.argmax(f1[:-1]))])


def classification_metrics(labels: np.ndarray, p_defective: np.ndarray, val_threshold: float | None = None,
                           bootstrap: BootstrapOptions = BootstrapOptions()) -> dict[str, Any]:
    """The section 5 metrics of one checkpoint on one split (argmax prediction: p_defective > 0.5),
    with their bootstrap intervals under ``ci`` (None each with ``bootstrap.n_resamples == 0``)."""
    labels = np.asarray(labels).astype(int)
    pred = (np.asarray(p_defective) > 0.5).astype(int)
    both = len(np.unique(labels)) == 2
    out = {
        "f1": float(f1_score(labels, pred, zero_division=0)),
        "precision": float(precision_score(labels, pred, zero_division=0)),
        "recall": float(recall_score(labels, pred, zero_division=0)),
        "accuracy": float(accuracy_score(labels, pred)),
        "ap": float(average_precision_score(labels, p_defective)) if both else None,
        "auroc": float(roc_auc_score(labels, p_defective)) if both else None,
        "confusion_matrix": confusion_matrix(labels, pred, labels=[0, 1]).tolist(),
        "n": int(len(labels)),
        "val_threshold": val_threshold,
        "f1_at_val_threshold": None,
        "ci": classification_intervals(labels, p_defective, bootstrap),
        "ci_options": bootstrap.describe(),
    }
    if val_threshold is not None:
        out["f1_at_val_threshold"] = float(f1_score(labels, (p_defective >= val_threshold).astype(int), zero_division=0))
    return out


def evaluate(data_root: str | os.PathLike[str], models: list[str | os.PathLike[str]], *, split: str = "test",
             out: str | os.PathLike[str] | None = None, batch_size: int = 64, device: str = "auto",
             num_workers: int = 0, progress: bool = True, n_resamples: int = 1000) -> dict[str, dict[str, Any]]:
    """Metrics per checkpoint (keyed by file name), with ``n_resamples`` bootstrap resamples for
    their intervals (0: none); with ``out``, writes metrics.json and the per-image predictions
    (``predictions.csv`` beside it)."""
    if not models:
        raise QrsError("give at least one --model checkpoint")
    if n_resamples < 0:
        raise QrsError(f"--n-resamples must be >= 0, got {n_resamples}")
    names = [Path(m).name for m in models]
    if len(set(names)) != len(names):
        raise QrsError(f"checkpoint file names must differ (they key metrics.json): {names}")
    data = PreparedDataset(data_root)
    dev = resolve_device(device)
    test_set = data.split(split, with_masks=False)
    has_val = split != "val" and (data.index["split"] == "val").any()
    val_set = data.split("val", with_masks=False) if has_val else None
    results: dict[str, dict[str, Any]] = {}
    rows = []
    for path, name in zip(models, names):
        model = load_checkpoint(path, device=dev)
        check_data_size(model.qrs_meta, data.img_size, data.root, model_name=str(path))
        p_test = predict(model, test_set, batch_size=batch_size, num_workers=num_workers, progress=progress)
        threshold = None
        if val_set is not None:
            p_val = predict(model, val_set, batch_size=batch_size, num_workers=num_workers, progress=progress)
            labels_val = val_set.labels.numpy()
            if len(np.unique(labels_val)) == 2:
                threshold = best_f1_threshold(labels_val, p_val)
        labels = test_set.labels.numpy()
        results[name] = {"checkpoint": str(path), "split": split, "epoch": model.qrs_meta.get("epoch"),
                         **classification_metrics(labels, p_test, threshold, BootstrapOptions(n_resamples))}
        rows.append(pd.DataFrame({"checkpoint": name, "id": test_set.rows["id"], "label": labels,
                                  "p_defective": p_test, "prediction": (p_test > 0.5).astype(int)}))
    if out is not None:
        out = Path(out)
        write_json(out, results)
        buf = io.StringIO()
        pd.concat(rows).to_csv(buf, index=False)
        write_text(out.with_name("predictions.csv"), buf.getvalue())
    return results


def format_table(results: dict[str, dict[str, Any]]) -> str:
    """The paper's table (rows = checkpoints, column F1) with the other metrics beside it; F1,
    precision, recall, AP and AUROC with their 95% intervals, e.g. ``0.964 [0.941, 0.982]``."""
    def cell(m: dict[str, Any], key: str) -> str:
        interval = (m.get("ci") or {}).get(key) if key in CLASSIFICATION_METRICS else None
        return with_interval(m[key], interval)

    columns = [("F1", "f1"), ("precision", "precision"), ("recall", "recall"), ("accuracy", "accuracy"),
               ("AP", "ap"), ("AUROC", "auroc"), ("F1@val-t", "f1_at_val_threshold")]
    cells = {name: [cell(m, key) for _, key in columns] for name, m in results.items()}
    widths = [max([len(title)] + [len(c[i]) for c in cells.values()]) for i, (title, _) in enumerate(columns)]
    lines = [f"{'checkpoint':<24} " + " ".join(f"{title:>{w}}" for (title, _), w in zip(columns, widths))
             + "  confusion [[tn fp] [fn tp]]"]
    for name, m in results.items():
        lines.append(f"{name:<24} " + " ".join(f"{c:>{w}}" for c, w in zip(cells[name], widths))
                     + f"  {m['confusion_matrix']}")
    if any((m.get("ci") or {}).get("f1") for m in results.values()):
        opts = next(iter(results.values()))["ci_options"]
        lines.append(f"[low, high]: {opts['confidence']:.0%} stratified bootstrap interval ({opts['n_resamples']} "
                     f"resamples, seed {opts['seed']})")
    return "\n".join(lines)
