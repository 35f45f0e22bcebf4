"""Extraction throughput with 1 process and with N processes under torchrun, in one run.

Makes a synthetic KSDD2-layout dataset (--n-images at --size px), a random-weight resnet18
checkpoint calibrated once, and the image caches; then times ``qrs.extract.extract`` over every
split (scoring, gathering to rank 0, rank 0 writing the npz, xlsx and csv files) in a plain process
and in ``torchrun --standalone --nproc_per_node N``. Reported per run: images/s of the best of
--repeats timed extractions after a warm-up one (interpreter start and process-group setup
excluded), and the wall time of the whole launch (included).

On CPU the processes share the machine's cores (threads per process = cores / processes), so the
ratio measures the overhead of sharding, gathering and the extra processes, not a speed-up. With
--device cuda, N defaults to the number of GPUs, one process per GPU; use more and larger images
(e.g. --n-images 20000 --size 224) so that scoring, not file writing, dominates.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

RESULT_TAG = "BENCH_DDP "


def _worker(args: argparse.Namespace) -> None:
    """One rank of a timed run: best extraction time over the repeats, printed by rank 0."""
    from qrs.data.dataset import PreparedDataset
    from qrs.distributed import barrier, init_distributed
    from qrs.extract import extract

    ctx = init_distributed(args.device)
    data = Path(args.work) / "prepared"
    n_images = len(PreparedDataset(data).index)
    out = Path(args.work) / f"out-{ctx.world_size}"
    times = []
    for _ in range(1 + args.repeats):
        barrier(ctx)
        start = time.perf_counter()
        extract(data, Path(args.work) / "model.pt", modes=["train", "val", "test"], out_dir=out,
                batch_size=args.batch_size, device=args.device, progress=False)
        barrier(ctx)
        times.append(time.perf_counter() - start)
    if ctx.is_main:
        best = min(times[1:])
        print(RESULT_TAG + json.dumps({"processes": ctx.world_size, "images": n_images, "seconds": best}),
              flush=True)


def _prepare(work: Path, n_images: int, size: int, seed: int) -> None:
    """Synthetic data prepared at ``size`` px, its image caches, and a calibrated random resnet18."""
    from qrs.data.dataset import PreparedDataset
    from qrs.data.preparation import prepare
    from qrs.data.synth import synthesize
    from qrs.extract import calibrate
    from qrs.model import base_meta, build_model, save_checkpoint

    n_test = n_images // 5
    synthesize(work / "raw", "ksdd2", n_train=n_images - n_test, n_test=n_test, defect_rate=0.2,
               size=(115, 315), seed=seed)
    prepare("ksdd2", work / "raw", work / "prepared", img_size=size, progress=False)
    data = PreparedDataset(work / "prepared")
    for split in ("train", "val", "test"):
        data.image_cache(split, progress=False)
    torch.manual_seed(seed)
    save_checkpoint(work / "model.pt", build_model("resnet18"), base_meta("resnet18", size))
    calibrate(work / "model.pt", work / "prepared", device="cpu", progress=False)


def _launch(args: argparse.Namespace, nproc: int, threads: int) -> dict[str, float]:
    """Run the worker in 1 plain process or under torchrun; its result plus the launch's wall time."""
    worker = [str(Path(__file__).resolve()), "--worker", "--work", args.work, "--device", args.device,
              "--batch-size", str(args.batch_size), "--repeats", str(args.repeats)]
    if nproc == 1:
        command = [sys.executable, *worker]
    else:
        command = [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc_per_node", str(nproc),
                   *worker]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = str(threads)
    start = time.perf_counter()
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=args.timeout)
    wall = time.perf_counter() - start
    if run.returncode != 0:
        sys.exit(f"{nproc}-process run failed:\n{run.stderr[-4000:]}")
    line = next(x for x in run.stdout.splitlines() if x.startswith(RESULT_TAG))
    return {**json.loads(line[len(RESULT_TAG):]), "wall_s": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--nproc", type=int, default=None,
                        help="Processes of the torchrun run. [default: the number of GPUs with cuda, else 2]")
    parser.add_argument("--n-images", type=int, default=400, help="Images in all splits together.")
    parser.add_argument("--size", type=int, default=64, help="Side of the prepared images in pixels.")
    parser.add_argument("--batch-size", type=int, default=32, help="Batch size per process.")
    parser.add_argument("--repeats", type=int, default=2, help="Timed extractions per run (best is kept).")
    parser.add_argument("--work", default=None, help="Working directory. [default: a new temporary one]")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=1800, help="Seconds before a launch counts as hung.")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _worker(args)
        return
    nproc = args.nproc or (torch.cuda.device_count() if args.device == "cuda" else 2)
    if nproc < 2:
        sys.exit(f"need at least 2 processes to compare with 1, got {nproc}")
    args.work = args.work or tempfile.mkdtemp(prefix="bench_ddp_")
    work = Path(args.work)
    cores = len(os.sched_getaffinity(0))
    print(f"device {args.device}, {cores} CPU cores, {args.n_images} images at {args.size} px, resnet18 "
          f"(random weights), batch {args.batch_size} per process; data in {work}")
    if not (work / "model.pt").is_file():
        _prepare(work, args.n_images, args.size, args.seed)
    rows = [_launch(args, 1, cores), _launch(args, nproc, max(1, cores // nproc))]
    print(f"{'processes':>9} {'threads/proc':>12} {'images':>6} {'extract_s':>9} {'images/s':>9} {'launch_wall_s':>13}")
    for row, threads in zip(rows, (cores, max(1, cores // nproc))):
        print(f"{row['processes']:>9} {threads:>12} {row['images']:>6} {row['seconds']:>9.2f} "
              f"{row['images'] / row['seconds']:>9.1f} {row['wall_s']:>13.1f}")
    print(f"ratio {nproc} processes / 1 process (images/s): {rows[0]['seconds'] / rows[1]['seconds']:.2f}")


if __name__ == "__main__":
    main()
