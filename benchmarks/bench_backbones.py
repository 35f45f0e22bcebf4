"""Backbones and schedules side by side on one prepared dataset: train, evaluate, calibrate and
extract each configuration with the same data, budget and seeds, and print one table.

Default: the DeepPCB boards vendored under tests/data/deeppcb (20 boards, official split); pass a
full DeepPCB sample (same layout: good/, defect/, boxes.csv, split.csv) with --src. Or the demo's
synthetic data with --synthetic.

Usage:
  python benchmarks/bench_backbones.py --src DIR [--img-size 224] [--epochs 10] [--seeds 0 1 2]
      [--configs resnet18:none:constant:adam:1e-3 efficientnet_lite0:imagenet:onecycle:adamw:1e-3 ...]

A config is arch:pretrained:schedule:optimizer:learning_rate, optionally followed by :key=value
training options (e.g. :mask_loss=energy:mask_fraction=0.25). Columns (test split, best_loss.pt):
F1, AP, AUROC of p_defective; QRS AUROC and Mann-Whitney p (good-anchored calibration); good parts
at QRS 0; pointing game; share of the map's energy in the defect boxes; seconds per epoch. Mean +-
std over the seeds.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from qrs.analysis import localisation_summary, qrs_statistics
from qrs.data.preparation import prepare
from qrs.data.synth import synthesize
from qrs.evaluate import evaluate
from qrs.extract import calibrate, extract
from qrs.train import TrainConfig, train

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIGS = ["resnet18:none:constant:adam:1e-3", "efficientnet_lite0:imagenet:onecycle:adamw:1e-3"]
COLUMNS = ("f1", "ap", "auroc", "qrs_auroc", "mw_p", "good_at_0", "pointing", "energy", "s_per_epoch")


def prepared_data(args: argparse.Namespace, work: Path) -> Path:
    """The prepared dataset the configurations share."""
    data = work / "data"
    if args.synthetic:
        synthesize(work / "raw", "ksdd2", n_train=500, n_test=150, defect_rate=0.2, size=(230, 630), seed=0)
        prepare("ksdd2", work / "raw", data, img_size=args.img_size, seed=0, progress=False)
    else:
        src = Path(args.src)
        prepare("folder", src, data, img_size=args.img_size, boxes=src / "boxes.csv", split_file=src / "split.csv",
                seed=0, progress=False)
    return data


def run_config(data: Path, out: Path, config: str, seed: int, args: argparse.Namespace) -> dict[str, float]:
    """Train one configuration with one seed and measure it on the test split."""
    arch, pretrained, schedule, optimizer, lr, *options = config.split(":")
    extra = {k: _value(v) for k, v in (o.split("=", 1) for o in options)}
    t0 = time.perf_counter()
    result = train(TrainConfig(data_root=data, out=out, arch=arch, pretrained=pretrained, schedule=schedule,
                               optimizer=optimizer, learning_rate=float(lr), num_epochs=args.epochs,
                               batch_size=args.batch_size, patience=args.epochs, augment=args.augment,
                               weight_decay=args.weight_decay if optimizer == "adamw" else 0.0, seed=seed,
                               device="cpu", progress=False, **extra))
    per_epoch = (time.perf_counter() - t0) / len(result.history)
    metrics = evaluate(data, [result.best_loss_path], device="cpu", progress=False)["best_loss.pt"]
    calibrate(result.best_loss_path, data, device="cpu", progress=False)
    rows = extract(data, result.best_loss_path, modes=["test"], out_dir=out / "extract", device="cpu",
                   progress=False).rows["test"]
    q = qrs_statistics(rows["qrs"].to_numpy(), rows["label"].to_numpy())
    loc = localisation_summary(rows)
    return {"f1": metrics["f1"], "ap": metrics["ap"], "auroc": metrics["auroc"], "qrs_auroc": q["auroc"],
            "mw_p": q["mann_whitney_p"], "good_at_0": q["zero_share_good"],
            "pointing": loc["pointing_game"], "energy": loc["energy_in_boxes"], "s_per_epoch": per_epoch}


def _value(text: str) -> int | float | str:
    """A training option's value from the command line: a number where it reads as one."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


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
    data = prepared_data(args, work)
    results: dict[str, list[dict[str, float]]] = {}
    for config in args.configs:
        for seed in args.seeds:
            run = run_config(data, work / f"{config.replace(':', '_')}_seed{seed}", config, seed, args)
            results.setdefault(config, []).append(run)
            print(f"{config} seed {seed}: " + ", ".join(f"{k} {v:.4g}" for k, v in run.items()), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    source = "synthetic demo data" if args.synthetic else args.src
    print(f"\n{source}, {args.img_size} px, {args.epochs} epochs, batch {args.batch_size}, seeds {args.seeds}; "
          "test split, best_loss.pt, mean +- std")
    print(f"{'config':<64}" + "".join(f"{c:>18}" for c in COLUMNS))
    for config, runs in results.items():
        cells = []
        for c in COLUMNS:
            values = np.array([r[c] for r in runs if r[c] is not None], dtype=np.float64)
            cells.append(f"{values.mean():.3g} +- {values.std():.2g}" if values.size else "-")
        print(f"{config:<64}" + "".join(f"{c:>18}" for c in cells))


if __name__ == "__main__":
    main()
