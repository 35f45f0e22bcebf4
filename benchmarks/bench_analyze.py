"""Benchmark of what "How sure are these numbers" adds to ``qrs analyze``: the same extraction of
N parts analysed without intervals and sweep, and with them (1000 bootstrap resamples, the 6-tau
threshold sweep), interleaved, best of R each, and the ratio; then the deletion test's cost per part.

Usage: python benchmarks/bench_analyze.py [--n 1000] [--img-size 224] [--repeats 3] [--deletion-parts 8]
       [--model CHECKPOINT]
Target: with / without <= 1.10 at 1000 parts.

Without --model a random resnet18 is used: its maps vary little from part to part, so nearly every
part reaches the lowest swept threshold and is upsampled, the sweep's worst case (the benchmark
prints how many). With --model (a checkpoint trained at --img-size on synthetic KSDD2 parts, e.g. the
demo's best_loss.pt), the parts are new synthetic ones and the maps are a trained model's. The
times are in-process; a ``qrs analyze`` command also pays its imports (printed too).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from qrs.analysis import SWEEP_THRESHOLDS
from qrs.data.dataset import PreparedDataset
from qrs.data.preparation import prepare
from qrs.data.synth import synthesize
from qrs.extract import extract
from qrs.faithfulness import DELETION_FRACTIONS, deletion_drops
from qrs.model import base_meta, build_model, load_checkpoint, save_checkpoint
from qrs.report import analyze, load_mode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1000, help="parts in the analysed (test) split")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=3, help="best of this many interleaved runs per row")
    parser.add_argument("--deletion-parts", type=int, default=8, help="parts timed through the deletion test")
    parser.add_argument("--workdir", default=None, help="where to write (default: the system temp dir)")
    parser.add_argument("--model", default=None, help="a trained checkpoint (default: a random resnet18)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_analyze.", dir=args.workdir))
    try:
        run(args, work)
    finally:
        shutil.rmtree(work)


def run(args: argparse.Namespace, work: Path) -> None:
    """Make the data and the extraction in ``work``, then time and print the rows."""
    synthesize(work / "raw", "ksdd2", n_train=100, n_test=args.n, size=(230, 630), seed=7)
    prepare("ksdd2", work / "raw", work / "data", img_size=args.img_size, progress=False)
    model_path = work / "model.pt"
    if args.model:
        shutil.copy(args.model, model_path)
    else:
        torch.manual_seed(0)
        save_checkpoint(model_path, build_model("resnet18"), base_meta("resnet18", args.img_size))
    extract(work / "data", model_path, modes=["test"], out_dir=work / "x", device="cpu", progress=False)
    mo = load_mode(work / "x", "gradcam_weights", "test")
    lowest = min(SWEEP_THRESHOLDS) * mo.options["scale"]
    upsampled = int((mo.raw_maps.max(axis=(1, 2)) >= lowest).sum())

    rows: dict[str, list[float]] = {"analyze, no intervals, no sweep": [], "analyze with intervals and sweep": []}
    for r in range(args.repeats):
        for (name, times), (resamples, sweep) in zip(rows.items(), ((0, False), (1000, True))):
            start = time.perf_counter()
            analyze(work / "x", out=work / f"a{r}{resamples}", n_resamples=resamples, sweep=sweep, progress=False)
            times.append(time.perf_counter() - start)
    base, full = min(rows["analyze, no intervals, no sweep"]), min(rows["analyze with intervals and sweep"])
    print(f"{args.n} parts at {args.img_size} px; sweep upsampled {upsampled} of {args.n} maps; "
          f"best of {args.repeats}, interleaved")
    print(f"{'row':<36} {'seconds':>8} {'ratio':>6}")
    for name, times in rows.items():
        print(f"{name:<36} {min(times):>8.2f} {min(times) / base:>6.3f}")
    print(f"added by intervals + sweep: {100 * (full / base - 1):+.1f}% in-process (target <= +10%)")
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import qrs.report, matplotlib.pyplot, seaborn"], check=True)
    imports = time.perf_counter() - start
    print(f"a `qrs analyze` process also imports for {imports:.2f} s: +{100 * (full - base) / (base + imports):.1f}% "
          "of the command's time")

    k = args.deletion_parts
    if k < 1:
        return
    model = load_checkpoint(model_path)
    split = PreparedDataset(work / "data").split("test", with_masks=False)
    raw = torch.from_numpy(mo.raw_maps[:k])
    start = time.perf_counter()
    deletion_drops(model, torch.utils.data.Subset(split, range(k)), raw, mo.rows["p_defective"].to_numpy()[:k],
                   progress=False)
    per_part = (time.perf_counter() - start) / k
    x = torch.zeros(2 * len(DELETION_FRACTIONS), 3, args.img_size, args.img_size)
    with torch.inference_mode():
        model(x)
        start = time.perf_counter()
        model(x)
        forward = time.perf_counter() - start
    print(f"deletion test: {per_part:.2f} s per part; its {2 * len(DELETION_FRACTIONS)} forward passes alone, as one "
          f"batch: {forward:.2f} s")


if __name__ == "__main__":
    main()
