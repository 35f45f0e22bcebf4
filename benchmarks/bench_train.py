"""Benchmark of the training input pipeline: one epoch with the real data loader (memory-mapped
uint8 cache, DataLoader, augmentation) next to the same epoch on tensors already in memory.

Usage: python benchmarks/bench_train.py [--n 256] [--img-size 96] [--arch resnet18] [--batch-size 32]
Target: real loader / in-memory <= 1.1.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from qrs.data.dataset import PreparedDataset
from qrs.data.preparation import prepare
from qrs.data.synth import synthesize
from qrs.distributed import DistContext
from qrs.model import base_meta, build_model
from qrs.train import TrainConfig, _loaders, train_one_epoch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=256, help="training images")
    parser.add_argument("--img-size", type=int, default=96)
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=2, help="best of this many epochs per row")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_train."))
    try:
        synthesize(work / "raw", "ksdd2", n_train=args.n, n_test=8, size=(115, 315), seed=0)
        data = work / "data"
        prepare("ksdd2", work / "raw", data, img_size=args.img_size, val_fraction=0.1, progress=False)
        cfg = TrainConfig(data_root=data, arch=args.arch, batch_size=args.batch_size, num_workers=args.num_workers,
                          augment="flip", device="cpu", progress=False)
        ctx = DistContext()
        generator = torch.Generator().manual_seed(0)
        loader, _, _ = _loaders(PreparedDataset(data), cfg, ctx, generator)
        in_memory = [{"image": b["image"].clone(), "label": b["label"].clone()} for b in loader]
        n_images = sum(len(b["label"]) for b in in_memory)
        torch.manual_seed(0)
        model = build_model(args.arch)
        meta = base_meta(args.arch, args.img_size)
        criterion = nn.CrossEntropyLoss()
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        times: dict[str, list[float]] = {"real data loader": [], "tensors in memory": []}
        for _ in range(args.repeats):
            for name, source in (("real data loader", loader), ("tensors in memory", in_memory)):
                start = time.perf_counter()
                train_one_epoch(model, source, criterion, optimizer, scaler, meta, cfg, ctx, generator, 1, None)
                times[name].append(time.perf_counter() - start)
        real, memory = min(times["real data loader"]), min(times["tensors in memory"])
        print(f"one epoch: {n_images} images of {args.img_size}px, {args.arch}, batch {args.batch_size}, "
              f"best of {args.repeats}")
        print(f"{'':22} {'seconds':>8} {'images/s':>9}")
        for name, t in (("real data loader", real), ("tensors in memory", memory)):
            print(f"{name:22} {t:8.2f} {n_images / t:9.1f}")
        print(f"ratio real / in-memory: {real / memory:.3f} (target <= 1.1)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
