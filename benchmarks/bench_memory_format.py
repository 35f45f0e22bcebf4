"""The weights' memory layout: channels-last (NHWC, how ``build_model`` lays a model out) against
PyTorch's default contiguous NCHW, side by side in one run, on the same weights and inputs.

For each arch and image size, two tasks, the two layouts taking turns (median of --repeats):

  train    one training step (forward, cross-entropy, backward, Adam) on a random batch;
  score    the scoring path's forward pass: logits and the closed-form Grad-CAM++ maps
           (qrs.cam.compute_cams) of a random batch, no gradients.

It prints images/s for each layout, the speed-up (channels-last / contiguous, > 1 is faster) and the
largest difference between the two layouts' logits and raw maps, relative to the largest value: the
layout changes the order of the floating-point sums, not what is computed.

Usage: python benchmarks/bench_memory_format.py [--archs resnet18 efficientnet_lite0] [--sizes 224 448]
    [--batch 8] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from qrs.cam import compute_cams
from qrs.model import build_model

LAYOUTS = {"contiguous": torch.contiguous_format, "channels-last": torch.channels_last}


def train_step(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> Callable[[], None]:
    """One Adam step of ``model`` on the batch, as a callable."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)

    def step() -> None:
        model.train()
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(images), labels).backward()
        optimizer.step()

    return step


def score_pass(model: nn.Module, images: torch.Tensor) -> Callable[[], object]:
    """The scoring path's forward pass of ``model`` on the batch (logits and maps), as a callable."""
    def run() -> object:
        with torch.inference_mode():
            return compute_cams(model.eval(), images)

    return run


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |a|."""
    return float((a - b).abs().max() / a.abs().max().clamp_min(1e-12))


def seconds(run: Callable[[], object]) -> float:
    """Wall time of one call of ``run``."""
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", nargs="+", default=["resnet18", "efficientnet_lite0"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[224, 448], help="square image sizes")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"batch {args.batch}, {torch.get_num_threads()} threads, median of {args.repeats}; "
          "speed-up = channels-last / contiguous images/s")
    print(f"{'arch':<20}{'size':>6}{'task':>7}{'contiguous':>12}{'chan-last':>11}{'speed-up':>10}{'rel. diff':>11}")
    for arch in args.archs:
        torch.manual_seed(0)
        reference = build_model(arch)
        for size in args.sizes:
            generator = torch.Generator().manual_seed(size)
            images = torch.randn(args.batch, 3, size, size, generator=generator)
            labels = torch.arange(args.batch) % 2
            models = {}
            for name, layout in LAYOUTS.items():
                model = build_model(arch)
                model.load_state_dict(reference.state_dict())
                models[name] = model.to(memory_format=layout).eval()
            outputs = {name: score_pass(m, images)() for name, m in models.items()}
            diff = max(relative_difference(getattr(outputs["contiguous"], f), getattr(outputs["channels-last"], f))
                       for f in ("logits", "raw"))
            tasks = {"score": {n: score_pass(m, images) for n, m in models.items()},
                     "train": {n: train_step(m, images, labels) for n, m in models.items()}}
            for task, runs in tasks.items():
                times: dict[str, list[float]] = {n: [] for n in runs}
                for run in runs.values():
                    run()  # warm-up: oneDNN's kernels are built on the first call
                for _ in range(args.repeats):
                    for n, run in runs.items():
                        times[n].append(seconds(run))
                rate = {n: args.batch / statistics.median(t) for n, t in times.items()}
                print(f"{arch:<20}{size:>6}{task:>7}{rate['contiguous']:>12.2f}{rate['channels-last']:>11.2f}"
                      f"{rate['channels-last'] / rate['contiguous']:>10.2f}"
                      f"{(f'{diff:.1e}' if task == 'score' else ''):>11}", flush=True)


if __name__ == "__main__":
    main()
