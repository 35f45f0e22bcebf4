"""Benchmark of ``qrs prepare``: images/s with 1 and 2 workers beside the limit measured in the same
run, which is decoding and resizing the same files with Pillow alone in one process.

Usage: python benchmarks/bench_prepare.py [--n 1000] [--img-size 224] [--repeats 5] [--workdir DIR]
Targets: 1 worker >= 0.8 x the limit; 2 workers >= 1.6 x the limit.

The limit writes nothing, so the rows also pay for creating files where ``--workdir`` is; on a
tmpfs (``/dev/shm``) they measure the code alone. Every run writes to a new directory and all are
deleted at the end: deleting thousands of files just before creating thousands more makes ext4
skip the freed inodes one by one, a cost of the benchmark's loop, not of a user's ``qrs prepare``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

from PIL import Image

from qrs.data.preparation import prepare
from qrs.data.synth import synthesize


def pillow_limit(root: Path, side: int) -> float:
    """Seconds to decode and resize every image and mask under ``root`` with Pillow alone."""
    files = sorted(root.rglob("*.png"))
    start = time.perf_counter()
    for path in files:
        with Image.open(path) as img:
            if path.stem.endswith("_GT"):
                img.convert("L").resize((side, side), Image.Resampling.NEAREST)
            else:
                img.convert("RGB").resize((side, side), Image.Resampling.BILINEAR)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1000, help="number of KSDD2-size images")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=5, help="best of this many interleaved runs per row")
    parser.add_argument("--workdir", default=None,
                        help="where to write (default: the system temp dir); file creation cost depends on it")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_prepare.", dir=args.workdir))
    try:
        raw = work / "raw"
        n_test = args.n // 10
        synthesize(raw, "ksdd2", n_train=args.n - n_test, n_test=n_test, size=(230, 630), seed=0)
        os.sync()  # the sources' write-back must not land in a timed row
        rows = {"Pillow decode+resize (limit)": [], "qrs prepare, 1 worker": [], "qrs prepare, 2 workers": []}
        for r in range(args.repeats):
            rows["Pillow decode+resize (limit)"].append(pillow_limit(raw, args.img_size))
            for workers in (1, 2):
                out = work / f"out{workers}-{r}"
                start = time.perf_counter()
                prepare("ksdd2", raw, out, img_size=args.img_size, num_workers=workers, progress=False)
                rows[f"qrs prepare, {workers} worker{'s' if workers > 1 else ''}"].append(time.perf_counter() - start)
                os.sync()  # this run's write-back must not land in the next one
        limit = args.n / min(rows["Pillow decode+resize (limit)"])
        print(f"{args.n} images of 230x630 (+ masks) -> {args.img_size}x{args.img_size}, best of {args.repeats}, "
              f"in {work.parent}")
        print(f"{'':32} {'images/s':>9} {'x limit':>8}")
        for name, times in rows.items():
            rate = args.n / min(times)
            print(f"{name:32} {rate:9.1f} {rate / limit:8.2f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
