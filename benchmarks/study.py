"""Settings side by side on one data set: for each setting, prepare the data at its image size (once
per size), run ``qrs repeat`` (train, evaluate, calibrate, extract, analyze with the deletion test)
over the seeds, and print one table of mean +- std over the seeds.

A setting is NAME=HxW[:option=value...], the options being those of ``qrs train`` (TrainConfig
fields), e.g. ``448s16=448x448:output_stride=16`` or ``lr1e-4=224x224:learning_rate=1e-4``. The base
recipe (--arch, --pretrained, --epochs, --batch-size, --lr) applies to every setting unless the
setting overrides it. Runs are kept under --workdir and a finished seed is not run again (``qrs
repeat`` skips it), so an interrupted study continues. Each seed extracts the test split only.

--score-variants METHOD:QUANTILE ... scores every finished seed's best_loss.pt again without
retraining: a copy calibrated with that map and good-anchor quantile, its test split extracted and
analysed (no deletion test), one more table with a row per setting and variant.

Data: --src DIR, a folder layout (good/, defect/, optional boxes.csv and split.csv, as DeepPCB's or
what benchmarks/bsdata.py writes), or --demo for the demo's synthetic parts (500 + 150, KSDD2 layout).

Usage:
  python benchmarks/study.py --src DEEPPCB --workdir runs/study-pcb --seeds 0 1 2 \\
      --settings 224s32=224x224 224s16=224x224:output_stride=16 448s32=448x448 448s16=448x448:output_stride=16
"""

from __future__ import annotations

import argparse
import json
import shutil
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np

from qrs.data.preparation import prepare
from qrs.data.synth import synthesize
from qrs.extract import ScoreOptions, calibrate, extract
from qrs.pipeline import REPEAT_COLUMNS, repeat
from qrs.report import analyze
from qrs.train import TrainConfig

COLUMNS = {"f1_best_loss": "F1", "ap_best_loss": "AP", "auroc_best_loss": "AUROC", "peak_auroc": "peak AUROC",
           "qrs_auroc": "QRS AUROC", "caught_with_qrs": "caught, QRS > 0", "ceiling_qrs_auroc": "ceiling QRS AUROC",
           "ceiling_caught_with_qrs": "ceiling caught", "mann_whitney_p": "MW p", "good_at_0": "good at 0",
           "pointing_game": "pointing", "energy_in_boxes": "energy", "iou": "IoU", "deletion_area": "deletion",
           "s_per_epoch": "s/epoch"}
"""The repeat columns of the printed table and their short headers."""
VARIANT_COLUMNS = {k: v for k, v in COLUMNS.items() if k in ("peak_auroc", "qrs_auroc", "caught_with_qrs",
                                                             "ceiling_qrs_auroc", "ceiling_caught_with_qrs",
                                                             "mann_whitney_p", "good_at_0", "pointing_game",
                                                             "energy_in_boxes", "iou")}


def score_variant(seed_dir: Path, data_root: Path, method: str, quantile: float) -> dict[str, float | None]:
    """The seed's best_loss.pt calibrated again with ``method`` and good-anchor ``quantile`` (on a copy),
    its test split extracted and analysed: the variant columns (cached in the variant's directory)."""
    work = seed_dir / "variants" / f"{method}-q{quantile:g}"
    cached = work / "row.json"
    if cached.is_file():
        return json.loads(cached.read_text())
    work.mkdir(parents=True, exist_ok=True)
    model = work / "model.pt"
    shutil.copyfile(seed_dir / "run" / "best_loss.pt", model)
    options = ScoreOptions(method=method)
    calibrate(model, data_root, options=options, quantile=quantile, device="cpu", progress=False)
    extract(data_root, model, modes=["test"], out_dir=work / "extract", options=options, device="cpu",
            progress=False)
    test = analyze(work / "extract", n_resamples=0, sweep=False, progress=False).stats["modes"]["test"]
    ceiling = test["agreement"].get("ceiling") or {}
    row = {"peak_auroc": test["agreement"]["auroc_peak"], "qrs_auroc": test["qrs"]["auroc"],
           "caught_with_qrs": test["agreement"]["caught_with_qrs"], "ceiling_qrs_auroc": ceiling.get("auroc_qrs"),
           "ceiling_caught_with_qrs": ceiling.get("caught_with_qrs"), "mann_whitney_p": test["qrs"]["mann_whitney_p"],
           "good_at_0": test["qrs"]["zero_share_good"], "pointing_game": test["localisation"]["pointing_game"],
           "energy_in_boxes": test["localisation"]["energy_in_boxes"], "iou": test["localisation"]["iou"]}
    cached.write_text(json.dumps(row))
    return row


def parse_setting(text: str) -> tuple[str, tuple[int, int], dict[str, Any]]:
    """``NAME=HxW[:key=value...]`` -> (name, (height, width), training options)."""
    name, _, rest = text.partition("=")
    size, *options = rest.split(":")
    height, _, width = size.partition("x")
    train_fields = {f.name: f.type for f in fields(TrainConfig)}
    parsed: dict[str, Any] = {}
    for option in options:
        key, _, value = option.partition("=")
        if key not in train_fields:
            raise SystemExit(f"setting {name}: {key} is not a qrs train option")
        parsed[key] = _value(value, nullable="None" in str(train_fields[key]))
    return name, (int(height), int(width or height)), parsed


def _value(text: str, nullable: bool) -> Any:
    """An option's text as a number, a bool, None (only where the option takes None: ``mask_loss=none`` is
    the string), or the text."""
    if nullable and text.lower() == "none":
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def prepared(work: Path, size: tuple[int, int], *, src: str | None, demo: bool) -> Path:
    """The data prepared at ``size`` under ``work`` (made once)."""
    out = work / f"data-{size[0]}x{size[1]}"
    if (out / "meta.json").is_file():
        return out
    if demo:
        raw = work / "raw-demo"
        if not raw.is_dir():
            synthesize(raw, "ksdd2", n_train=500, n_test=150, defect_rate=0.2, size=(230, 630), seed=0)
        prepare("ksdd2", raw, out, img_size=size, seed=0, progress=False)
    else:
        root = Path(src)
        boxes, split = root / "boxes.csv", root / "split.csv"
        prepare("folder", root, out, img_size=size, boxes=boxes if boxes.is_file() else None,
                split_file=split if split.is_file() else None, seed=0, progress=False)
    return out


def _cell(values: list[float | None], key: str) -> str:
    finite = np.array([v for v in values if v is not None and np.isfinite(v)], dtype=np.float64)
    if not finite.size:
        return "-"
    if key == "mann_whitney_p":
        return f"{np.exp(np.log(np.maximum(finite, 1e-300)).mean()):.1e}"
    std = finite.std(ddof=1) if finite.size > 1 else 0.0
    digits = 1 if key == "s_per_epoch" else 3
    return f"{finite.mean():.{digits}f} ± {std:.{digits}f}"


def print_table(title: str, results: dict[str, dict[int, dict[str, float | None]]],
                columns: dict[str, str] = COLUMNS) -> None:
    """One markdown row per setting: mean ± std (ddof 1) over its seeds; Mann-Whitney p as a geometric mean."""
    print(f"\n{title}\n")
    print("| setting | " + " | ".join(columns.values()) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for name, rows in results.items():
        cells = [_cell([r.get(k) for r in rows.values()], k) for k in columns]
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = parser.add_mutually_exclusive_group(required=True)
    data.add_argument("--src", help="folder-layout data set (good/, defect/, boxes.csv, split.csv)")
    data.add_argument("--demo", action="store_true", help="the demo's synthetic parts")
    parser.add_argument("--settings", nargs="+", required=True, help="NAME=HxW[:option=value...]")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--arch", default="efficientnet_lite0")
    parser.add_argument("--pretrained", default="imagenet")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--no-faithfulness", action="store_true", help="skip the deletion test")
    parser.add_argument("--score-variants", nargs="*", default=[], help="METHOD:QUANTILE, e.g. evidence:0.99")
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--json", default=None, help="also write every seed's row to this file")
    args = parser.parse_args()
    work = Path(args.workdir)
    settings = [parse_setting(s) for s in args.settings]
    results: dict[str, dict[int, dict[str, float | None]]] = {}
    variants: dict[str, dict[int, dict[str, float | None]]] = {}
    for name, size, options in settings:
        data_root = prepared(work, size, src=args.src, demo=args.demo)
        base = dict(arch=args.arch, pretrained=args.pretrained, num_epochs=args.epochs, batch_size=args.batch_size,
                    learning_rate=args.lr, patience=args.epochs, device="cpu")
        config = TrainConfig(data_root=data_root, **{**base, **options})
        print(f"=== {name}: {size[0]}x{size[1]}, {options or 'base recipe'}", flush=True)
        table = repeat(config, args.seeds, work / name, faithfulness=not args.no_faithfulness, modes=("test",),
                       progress=False)
        results[name] = {int(seed): {k: _finite(v) for k, v in row.items()} for seed, row in table.rows.iterrows()}
        for variant in args.score_variants:
            method, _, quantile = variant.partition(":")
            variants[f"{name} {variant}"] = {seed: score_variant(work / name / f"seed-{seed}", data_root, method,
                                                                 float(quantile or 0.99)) for seed in args.seeds}
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": results, "variants": variants}, indent=1))
    source = "demo data" if args.demo else args.src
    print_table(f"{source}: {args.arch} ({args.pretrained}), {args.epochs} epochs, batch {args.batch_size}, lr "
                f"{args.lr:g}, seeds {args.seeds}; test split, best_loss.pt; mean ± std (ddof 1), MW p geometric mean",
                results)
    if variants:
        print_table("The same checkpoints scored again: map and good-anchor quantile (test split)", variants,
                    VARIANT_COLUMNS)
    unused = set(REPEAT_COLUMNS) - set(COLUMNS)
    if unused:
        print(f"(also in each repeat.csv: {', '.join(sorted(unused))})")


def _finite(value: float) -> float | None:
    return float(value) if value is not None and np.isfinite(value) else None


if __name__ == "__main__":
    main()
