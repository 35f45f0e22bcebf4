"""Ablation of mask-guided training (docs/method.md#mask-guided-training): the same data, seeds and budget with and
without the energy term, then the share of masks used.

Three tables, each mean +- std over --seeds (test split, best_loss.pt):
  1. the demo's synthetic data (500 + 150 parts, 224 px), resnet18 from scratch, 10 epochs (the demo);
  2. a DeepPCB sample (--src; boxes as masks), resnet18 from scratch and ImageNet EfficientNet-Lite0,
     --pcb-epochs epochs;
  3. --mask-fraction 0 / 0.25 / 1 (the last is table 2's guided Lite0) on DeepPCB with Lite0.
Columns: F1, AP, AUROC of p_defective, QRS AUROC, Mann-Whitney p, good parts at 0, pointing game,
energy of the map in the defect boxes, seconds per epoch, and the deletion test (qrs analyze
--faithfulness: area between the most- and least-relevant-first curves of p_defective over the
defective parts, and its one-sided Wilcoxon p), which says whether the guided maps still drive the
decision.

Usage: python benchmarks/bench_masks.py --src DEEPPCB_DIR --workdir DIR [--seeds 0 1 2]
Runs whose training finished in --workdir with the same options are reused (bench_backbones.py
writes the same layout).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from bench_backbones import COLUMNS, DELETION_COLUMNS, REPO, prepared_data, print_table, run_all

SCRATCH = "resnet18:none:constant:adam:1e-3"
LITE0 = "efficientnet_lite0:imagenet:constant:adam:1e-3"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", default=str(REPO / "tests" / "data" / "deeppcb"), help="DeepPCB-layout folder")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--synthetic-epochs", type=int, default=10)
    parser.add_argument("--pcb-epochs", type=int, default=12)
    parser.add_argument("--workdir", default=None, help="keep the runs here (default: a temporary directory)")
    parser.add_argument("--json", default=None, help="also write every run's figures to this file")
    args = parser.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_masks."))
    columns = COLUMNS + DELETION_COLUMNS
    synthetic = prepared_data(work / "synthetic", synthetic=True, src="", img_size=224)
    pcb = prepared_data(work / "deeppcb", synthetic=False, src=args.src, img_size=224)
    tables = {
        f"synthetic demo data, resnet18 from scratch, {args.synthetic_epochs} epochs":
            run_all(synthetic, work / "synthetic", [SCRATCH, f"{SCRATCH}:mask_loss=energy"], args.seeds,
                    args.synthetic_epochs, deletion=True),
        f"{args.src}, boxes as masks, {args.pcb_epochs} epochs":
            run_all(pcb, work / "deeppcb", [SCRATCH, f"{SCRATCH}:mask_loss=energy", LITE0,
                                            f"{LITE0}:mask_loss=energy"], args.seeds, args.pcb_epochs, deletion=True),
        f"{args.src}, Lite0, share of the defective training images whose mask is used":
            run_all(pcb, work / "deeppcb", [f"{LITE0}:mask_loss=energy:mask_fraction=0",
                                            f"{LITE0}:mask_loss=energy:mask_fraction=0.25",
                                            f"{LITE0}:mask_loss=energy"], args.seeds, args.pcb_epochs, deletion=True),
    }
    if args.json:
        Path(args.json).write_text(json.dumps(tables, indent=1))
    for title, results in tables.items():
        print_table(f"{title}; seeds {args.seeds}, mean +- std", results, columns)


if __name__ == "__main__":
    main()
