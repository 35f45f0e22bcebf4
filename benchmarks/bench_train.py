"""Benchmark of a training epoch: the real data loader (memory-mapped uint8 cache, DataLoader,
augmentation) next to the same epoch on tensors already in memory, and the same real epoch with the
mask term (docs/method.md#mask-guided-training: defect masks loaded and flipped with the images, closed-form map, energy
loss), in one run, epochs taking turns.

Usage: python benchmarks/bench_train.py [--n 256] [--img-size 96] [--arch resnet18] [--batch-size 32]
Targets: real loader / in-memory <= 1.1; mask-guided / real loader < 1.15.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from qrs.data.dataset import PreparedDataset
from qrs.data.preparation import prepare
from qrs.data.synth import synthesize
from qrs.distributed import DistContext
from qrs.model import base_meta, build_model
from qrs.train import (TrainConfig, WithFeatures, _loaders, make_scheduler, mask_guidance,
                       train_one_epoch)


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
        plain_cfg = TrainConfig(data_root=data, arch=args.arch, batch_size=args.batch_size,
                                num_workers=args.num_workers, augment="flip", device="cpu", progress=False)
        guided_cfg = replace(plain_cfg, mask_loss="energy")
        ctx = DistContext()
        generator = torch.Generator().manual_seed(0)
        dataset = PreparedDataset(data)
        loader, _, _ = _loaders(dataset, plain_cfg, ctx, generator)
        guided_loader, _, _ = _loaders(dataset, guided_cfg, ctx, generator)
        in_memory = [{"image": b["image"].clone(), "label": b["label"].clone()} for b in loader]
        n_images = sum(len(b["label"]) for b in in_memory)
        torch.manual_seed(0)
        model = build_model(args.arch)
        guidance = mask_guidance(guided_cfg, model, dataset, len(loader))
        meta = base_meta(args.arch, args.img_size)
        criterion = nn.CrossEntropyLoss()
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
        scheduler = make_scheduler(optimizer, "constant", 10 ** 6, 0)
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        runs = {"real data loader": (model, loader, plain_cfg, None),
                "tensors in memory": (model, in_memory, plain_cfg, None),
                "real, mask-guided": (WithFeatures(model, guidance.split), guided_loader, guided_cfg, guidance)}
        times: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(args.repeats):
            for name, (net, source, cfg, guide) in runs.items():
                start = time.perf_counter()
                train_one_epoch(net, source, criterion, optimizer, scheduler, scaler, meta, cfg, ctx, generator, 1,
                                None, guide)
                times[name].append(time.perf_counter() - start)
        best = {name: min(t) for name, t in times.items()}
        print(f"one epoch: {n_images} images of {args.img_size}px, {args.arch}, batch {args.batch_size}, "
              f"best of {args.repeats}")
        print(f"{'':22} {'seconds':>8} {'images/s':>9}")
        for name, t in best.items():
            print(f"{name:22} {t:8.2f} {n_images / t:9.1f}")
        print(f"ratio real / in-memory: {best['real data loader'] / best['tensors in memory']:.3f} (target <= 1.1)")
        print(f"ratio mask-guided / real: {best['real, mask-guided'] / best['real data loader']:.3f} "
              "(target < 1.15)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
