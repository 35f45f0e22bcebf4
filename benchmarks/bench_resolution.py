"""Speed and memory at larger and non-square images and finer maps, as ratios to 224 x 224 at stride 32.

For each arch and each (height x width, output stride) setting, three measurements, each in a fresh
process so that its peak memory is its own:

  train    one training step (forward, backward, Adam) on a random batch: images/s, peak memory above
           the process's memory before the step, and the estimate ``qrs train`` checks before it starts
           (qrs.memory.training_need: autograd's saved tensors counted on the meta device);
  extract  ``qrs extract`` of the test split of a prepared synthetic dataset at that size (a random-init
           checkpoint, calibrated before the clock starts): images/s and peak memory;
  onnx     the onnx backend of ``qrs score``: the exported graph in ONNX Runtime, then the QRS of
           score_maps, on prepared images (no file decoding): images/s and peak memory.

Settings take turns within each repeat (one process at a time), and each cell is the median over
--repeats. Ratios are to the first setting of the same arch: images/s ratio < 1 is slower, memory
ratio > 1 is more.

Usage: python benchmarks/bench_resolution.py [--archs resnet18 efficientnet_lite0] [--repeats 3]
    [--settings 224x224/32 224x224/16 448x448/32 448x448/16 1024x448/32] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_SETTINGS = ["224x224/32", "224x224/16", "448x448/32", "448x448/16", "1024x448/32"]
TASKS = ("train", "extract", "onnx")


def parse_setting(text: str) -> tuple[tuple[int, int], int]:
    """``HxW/stride`` -> ((height, width), stride)."""
    size, _, stride = text.partition("/")
    height, _, width = size.partition("x")
    return (int(height), int(width)), int(stride or 32)


class PeakMemory:
    """The largest resident memory of this process above its level at the start, sampled every 2 ms by
    a thread (``/proc/self/statm``) while the block runs: the work's own peak, whatever the process
    held or peaked at before."""

    PAGE = os.sysconf("SC_PAGE_SIZE")

    def __enter__(self) -> "PeakMemory":
        self.start = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _rss(self) -> int:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * self.PAGE

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, self._rss())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())

    @property
    def mib(self) -> float:
        return (self.peak - self.start) / 2**20


def prepared_dataset(work: Path, size: tuple[int, int], n_test: int) -> Path:
    """Synthetic KSDD2-layout parts prepared at ``size`` (made once per size under ``work``)."""
    from qrs.data.preparation import prepare
    from qrs.data.synth import synthesize

    raw, data = work / "raw", work / f"data-{size[0]}x{size[1]}"
    if not raw.is_dir():
        synthesize(raw, "ksdd2", n_train=40, n_test=n_test, defect_rate=0.25, size=(230, 630), seed=0)
    if not (data / "meta.json").is_file():
        prepare("ksdd2", raw, data, img_size=size, seed=0, overwrite=True, progress=False)
    return data


def checkpoint(work: Path, arch: str, size: tuple[int, int], stride: int, data: Path) -> Path:
    """A random-init, calibrated checkpoint of ``arch`` at ``size`` and ``stride`` (made once)."""
    from qrs.extract import calibrate
    from qrs.model import base_meta, build_model, save_checkpoint

    path = work / f"{arch}-{size[0]}x{size[1]}-s{stride}.pt"
    if not path.is_file():
        import torch

        torch.manual_seed(0)
        save_checkpoint(path, build_model(arch, output_stride=stride), base_meta(arch, size, output_stride=stride))
        calibrate(path, data, device="cpu", progress=False)
    return path


def measure(task: str, arch: str, size: tuple[int, int], stride: int, work: str, batch: int,
            n_images: int) -> dict[str, float]:
    """One measurement in this (fresh) process: images/s and peak memory above the start of the work."""
    import torch

    work_dir = Path(work)
    if task == "train":
        from qrs.memory import training_need
        from qrs.model import build_model

        model = build_model(arch, output_stride=stride).train()
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
        x, y = torch.randn(batch, 3, *size), torch.randint(0, 2, (batch,))
        estimate = training_need(model, size).total(batch) / 2**20
        steps = max(1, n_images // batch)
        with PeakMemory() as memory:
            t0 = time.perf_counter()
            for _ in range(steps):
                optimizer.zero_grad()
                torch.nn.functional.cross_entropy(model(x), y).backward()
                optimizer.step()
            seconds = time.perf_counter() - t0
        return {"images_s": steps * batch / seconds, "peak_mib": memory.mib, "estimate_mib": estimate}
    data = prepared_dataset(work_dir, size, n_images)
    ckpt = checkpoint(work_dir, arch, size, stride, data)
    if task == "extract":
        from qrs.extract import extract

        with PeakMemory() as memory:
            t0 = time.perf_counter()
            rows = extract(data, ckpt, modes=["test"], out_dir=work_dir / "extract", batch_size=batch, device="cpu",
                           progress=False).rows["test"]
            seconds = time.perf_counter() - t0
        return {"images_s": len(rows) / seconds, "peak_mib": memory.mib}
    from qrs.data.dataset import PreparedDataset
    from qrs.export import export_onnx
    from qrs.predict import Scorer

    onnx_path = ckpt.with_suffix(".onnx")
    if not onnx_path.is_file():
        export_onnx(ckpt, onnx_path, progress=False)
    scorer = Scorer.load(onnx_path, backend="onnx", device="cpu")
    images = np.asarray(PreparedDataset(data).image_cache("test", progress=False))[:n_images]
    items = [scorer.prepare(f"part{i}", image) for i, image in enumerate(images)]
    with PeakMemory() as memory:
        t0 = time.perf_counter()
        for i in range(0, len(items), batch):
            scorer.score(items[i:i + batch])
        seconds = time.perf_counter() - t0
    return {"images_s": len(items) / seconds, "peak_mib": memory.mib}


def run_isolated(*args: Any) -> dict[str, float]:
    """:func:`measure` in a new process (spawned: nothing inherited, its peak memory is its own)."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(measure, args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", nargs="+", default=["resnet18", "efficientnet_lite0"])
    parser.add_argument("--settings", nargs="+", default=DEFAULT_SETTINGS, help="HxW/stride, the first is the base")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    parser.add_argument("--batch", type=int, default=8, help="batch size of every task")
    parser.add_argument("--train-images", type=int, default=16, help="images per training measurement")
    parser.add_argument("--images", type=int, default=32, help="test images of extract and onnx")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_resolution."))
    settings = [parse_setting(s) for s in args.settings]
    for arch in args.archs:
        for size, stride in settings:  # data, checkpoints and ONNX files before any clock starts
            if set(args.tasks) - {"train"}:
                ckpt = checkpoint(work, arch, size, stride, prepared_dataset(work, size, args.images))
                if "onnx" in args.tasks and not ckpt.with_suffix(".onnx").is_file():
                    from qrs.export import export_onnx

                    export_onnx(ckpt, ckpt.with_suffix(".onnx"), progress=False)
    runs: dict[tuple[str, str, str], list[dict[str, float]]] = {}
    for repeat in range(args.repeats):
        for arch in args.archs:
            for task in args.tasks:
                for text, (size, stride) in zip(args.settings, settings):
                    n = args.train_images if task == "train" else args.images
                    result = run_isolated(task, arch, size, stride, str(work), args.batch, n)
                    runs.setdefault((arch, task, text), []).append(result)
                    print(f"repeat {repeat + 1}/{args.repeats} {arch} {task} {text}: "
                          + ", ".join(f"{k} {v:.1f}" for k, v in result.items()), flush=True)
    print(f"\nbatch {args.batch}; median of {args.repeats} runs; ratios to {args.settings[0]} of the same arch and task")
    header = f"{'arch':<20}{'task':<9}{'H x W / stride':<16}{'images/s':>10}{'x base':>8}{'peak MiB':>10}{'x base':>8}"
    print(header + f"{'estimate MiB':>14}")
    for arch in args.archs:
        for task in args.tasks:
            base = None
            for text in args.settings:
                cells = runs[(arch, task, text)]
                speed = statistics.median(c["images_s"] for c in cells)
                peak = statistics.median(c["peak_mib"] for c in cells)
                base = base or (speed, peak)
                estimate = (f"{statistics.median(c['estimate_mib'] for c in cells):>14.0f}"
                            if "estimate_mib" in cells[0] else "")
                print(f"{arch:<20}{task:<9}{text:<16}{speed:>10.2f}{speed / base[0]:>8.2f}{peak:>10.0f}"
                      f"{peak / base[1]:>8.2f}" + estimate, flush=True)


if __name__ == "__main__":
    main()
