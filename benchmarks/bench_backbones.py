"""Backbones and schedules side by side on one prepared dataset: train, evaluate, calibrate and
extract each configuration with the same data, budget and seeds, and print one table.

Default: the DeepPCB boards vendored under tests/data/deeppcb (20 boards, official split); pass a
full DeepPCB sample (same layout: good/, defect/, boxes.csv, split.csv) with --src. Or the demo's
synthetic data with --synthetic.

Usage:
  python benchmarks/bench_backbones.py --src DIR [--img-size 224] [--epochs 10] [--seeds 0 1 2]
      [--configs resnet18:none:constant:adam:1e-3 efficientnet_lite0:imagenet:onecycle:adamw:1e-3 ...]

A config is arch:pretrained:schedule:optimizer:learning_rate, optionally followed by :key=value
training options (e.g. :mask_loss=energy:mask_fraction=0.25; without mask_loss the configuration
trains with mask_loss=none, so that backbones are compared on their labels alone). Columns (test
split, best_loss.pt): F1, AP, AUROC of p_defective; AUROC of the map peak; QRS AUROC, the share of
caught defective parts with QRS > 0 and Mann-Whitney p (good-anchored calibration); good parts at
QRS 0; pointing game; share of the map's energy in the defect boxes;
seconds per epoch. Mean +- std over the seeds. A run directory under --workdir whose training
finished with the same options is reused (its training is not repeated).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from qrs.analysis import agreement, localisation_summary, qrs_statistics
from qrs.data.preparation import prepare
from qrs.data.synth import synthesize
from qrs.evaluate import evaluate
from qrs.extract import calibrate, extract
from qrs.model import read_checkpoint
from qrs.report import analyze
from qrs.train import TrainConfig, train, training_finished

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIGS = ["resnet18:none:constant:adam:1e-3", "efficientnet_lite0:imagenet:onecycle:adamw:1e-3"]
COLUMNS = ("f1", "ap", "auroc", "peak_auroc", "qrs_auroc", "caught_with_qrs", "ceiling_qrs_auroc", "mw_p", "good_at_0",
           "pointing", "energy", "s_per_epoch")
DELETION_COLUMNS = ("deletion_area", "deletion_p")


def prepared_data(work: Path, *, synthetic: bool, src: str, img_size: int) -> Path:
    """The prepared dataset the configurations share (made once per work directory)."""
    data = work / "data"
    if (data / "meta.json").is_file():
        return data
    if synthetic:
        synthesize(work / "raw", "ksdd2", n_train=500, n_test=150, defect_rate=0.2, size=(230, 630), seed=0)
        prepare("ksdd2", work / "raw", data, img_size=img_size, seed=0, progress=False)
    else:
        prepare("folder", Path(src), data, img_size=img_size, boxes=Path(src) / "boxes.csv",
                split_file=Path(src) / "split.csv", seed=0, progress=False)
    return data


def train_config(data: Path, out: Path, config: str, seed: int, epochs: int, batch_size: int = 32,
                 augment: str = "flip", weight_decay: float = 0.01) -> TrainConfig:
    """The TrainConfig of one configuration string and seed."""
    arch, pretrained, schedule, optimizer, lr, *options = config.split(":")
    extra: dict[str, Any] = {"mask_loss": "none", **{k: _value(v) for k, v in (o.split("=", 1) for o in options)}}
    return TrainConfig(data_root=data, out=out, arch=arch, pretrained=pretrained, schedule=schedule,
                       optimizer=optimizer, learning_rate=float(lr), num_epochs=epochs, batch_size=batch_size,
                       patience=epochs, augment=augment, weight_decay=weight_decay if optimizer == "adamw" else 0.0,
                       seed=seed, device="cpu", progress=False, **extra)


def _same_run(cfg: TrainConfig) -> bool:
    """True when ``cfg.out`` holds a finished training with the same options (so it can be reused)."""
    if not training_finished(cfg):
        return False
    saved = read_checkpoint(cfg.paths()[2])["meta"]["train_config"]
    keys = ("arch", "pretrained", "schedule", "optimizer", "learning_rate", "num_epochs", "batch_size", "seed",
            "mask_loss", "mask_fraction", "mask_weight")
    return all(saved.get(k) == getattr(cfg, k) for k in keys)


def run_config(cfg: TrainConfig, *, deletion: bool = False) -> dict[str, float | None]:
    """Train (or reuse) one run and measure its best_loss.pt on the test split."""
    if not _same_run(cfg):
        train(cfg)
    out = Path(cfg.out)
    best = cfg.paths()[0]
    metrics = evaluate(cfg.data_root, [best], device="cpu", progress=False, n_resamples=0)["best_loss.pt"]
    calibration = calibrate(best, cfg.data_root, device="cpu", progress=False)
    rows = extract(cfg.data_root, best, modes=["test"], out_dir=out / "extract", device="cpu",
                   progress=False).rows["test"]
    q = qrs_statistics(rows["qrs"].to_numpy(), rows["label"].to_numpy())
    agree = agreement(rows["label"].to_numpy(), rows["prediction"].to_numpy(), rows["p_defective"].to_numpy(),
                      rows["qrs"].to_numpy(), rows["peak"].to_numpy(), calibration.get("p_defective_cut"))
    loc = localisation_summary(rows)
    result: dict[str, float | None] = {
        "f1": metrics["f1"], "ap": metrics["ap"], "auroc": metrics["auroc"], "peak_auroc": agree["auroc_peak"],
        "qrs_auroc": q["auroc"], "caught_with_qrs": agree["caught_with_qrs"],
        "ceiling_qrs_auroc": (agree["ceiling"] or {}).get("auroc_qrs"), "mw_p": q["mann_whitney_p"],
        "good_at_0": q["zero_share_good"], "pointing": loc["pointing_game"],
        "energy": loc["energy_in_boxes"], "s_per_epoch": float(pd.read_csv(out / "log.csv")["time_s"].mean())}
    if deletion:
        stats = analyze(out / "extract", out=out / "analysis", n_resamples=0, sweep=False, faithfulness=True,
                        device="cpu", progress=False).stats
        defective = stats["modes"]["test"]["faithfulness"]["defective"]
        result.update(deletion_area=defective["area_between"], deletion_p=defective["wilcoxon_p"])
    return result


def _value(text: str) -> int | float | str:
    """A training option's value from the command line: a number where it reads as one."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def print_table(title: str, results: dict[str, list[dict[str, float | None]]], columns: tuple[str, ...]) -> None:
    """One row per configuration: mean +- std over its seeds of each column."""
    width = max(len("config"), *map(len, results))

    def row(first: str, cells: list[str]) -> str:
        return f"{first:<{width}}" + "".join(f" {c:>19}" for c in cells)

    print(f"\n{title}")
    print(row("config", list(columns)))
    for config, runs in results.items():
        cells = []
        for c in columns:
            values = np.array([r[c] for r in runs if r.get(c) is not None], dtype=np.float64)
            cells.append(f"{values.mean():.3g} +- {values.std():.2g}" if values.size else "-")
        print(row(config, cells), flush=True)


def run_all(data: Path, work: Path, configs: list[str], seeds: list[int], epochs: int, *, deletion: bool = False,
            **train_kw: Any) -> dict[str, list[dict[str, float | None]]]:
    """Every configuration with every seed, printing each run's line as it ends."""
    results: dict[str, list[dict[str, float | None]]] = {}
    for config in configs:
        for seed in seeds:
            cfg = train_config(data, work / f"{config.replace(':', '_')}_seed{seed}", config, seed, epochs, **train_kw)
            run = run_config(cfg, deletion=deletion)
            results.setdefault(config, []).append(run)
            print(f"{config} seed {seed}: " + ", ".join(f"{k} {v:.4g}" for k, v in run.items() if v is not None),
                  flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", default=str(REPO / "tests" / "data" / "deeppcb"), help="DeepPCB-layout folder")
    parser.add_argument("--synthetic", action="store_true", help="the demo's synthetic data instead of --src")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--augment", default="flip")
    parser.add_argument("--weight-decay", type=float, default=0.01, help="for adamw configurations")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS)
    parser.add_argument("--workdir", default=None, help="keep the runs here (default: a temporary directory)")
    parser.add_argument("--json", default=None, help="also write every run's figures to this file")
    args = parser.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_backbones."))
    data = prepared_data(work, synthetic=args.synthetic, src=args.src, img_size=args.img_size)
    results = run_all(data, work, args.configs, args.seeds, args.epochs, batch_size=args.batch_size,
                      augment=args.augment, weight_decay=args.weight_decay)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    source = "synthetic demo data" if args.synthetic else args.src
    print_table(f"{source}, {args.img_size} px, {args.epochs} epochs, batch {args.batch_size}, seeds {args.seeds}; "
                "test split, best_loss.pt, mean +- std", results, COLUMNS)


if __name__ == "__main__":
    main()
