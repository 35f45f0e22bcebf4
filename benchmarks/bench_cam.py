"""Throughput of Grad-CAM++ + QRS against a plain forward pass and the pytorch-grad-cam package.

Per arch (default: ResNet-50 and EfficientNet-Lite0; 2 classes, random init, eval mode), one set of
random normalised images, three measurements per batch size, in images per second (best of
--repeats timed passes after a warm-up):

  (a) plain   a forward pass under torch.inference_mode: the physical limit;
  (b) ours    qrs.cam.compute_cams (Grad-CAM++) + qrs.score.quality_risk_score (dataset norm);
  (c) gradcam pytorch_grad_cam.GradCAMPlusPlus on the same target layer (layer4; Lite0: bn2),
              ClassifierOutputTarget(1).

Targets: ours/plain >= 0.9 (maps at the cost of one forward pass), ours/gradcam >= 3. With two archs
it also prints the second's images/s over the first's, forward and Grad-CAM++, per batch size.

With --extract-images N (0 to skip) it also runs ``qrs extract`` end to end (data loading, maps,
QRS, localisation, npz/csv/xlsx) on N prepared synthetic images with the first arch, against
(a) on the same images read from the same cache. Target: extract/plain >= 0.8.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from pytorch_grad_cam import GradCAMPlusPlus
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import Tensor, nn

from qrs.cam import compute_cams, target_layer
from qrs.data.preparation import prepare
from qrs.data.synth import synthesize
from qrs.extract import ScoreOptions, extract
from qrs.model import base_meta, build_model, load_checkpoint, normalize, save_checkpoint, update_checkpoint_meta
from qrs.score import calibration_scale, quality_risk_score


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def images_per_second(
    steps: dict[str, Callable[[Tensor], object]], batches: list[Tensor], repeats: int, device: str
) -> dict[str, float]:
    """Best throughput of each step over ``repeats`` passes over all batches, after a warm-up batch.

    The steps take turns within each pass, so load from other processes hits them alike.
    """
    for step in steps.values():
        step(batches[0])
    best = dict.fromkeys(steps, float("inf"))
    for _ in range(repeats):
        for name, step in steps.items():
            _sync(device)
            start = time.perf_counter()
            for batch in batches:
                step(batch)
            _sync(device)
            best[name] = min(best[name], time.perf_counter() - start)
    n_images = sum(len(b) for b in batches)
    return {name: n_images / seconds for name, seconds in best.items()}


def bench_batch_size(
    model: nn.Module, images: Tensor, batch_size: int, repeats: int, device: str
) -> dict[str, float]:
    """Images/s of the three measurements for one batch size."""
    batches = list(images.split(batch_size))
    scale = calibration_scale(compute_cams(model, batches[0]).maps.amax(dim=(1, 2)))

    def plain(x: Tensor) -> Tensor:
        with torch.inference_mode():
            return model(x)

    def ours(x: Tensor) -> Tensor:
        return quality_risk_score(compute_cams(model, x).maps, None, scale=scale)

    with GradCAMPlusPlus(model, target_layers=[target_layer(model)]) as cam:

        def package(x: Tensor) -> object:
            return cam(x, targets=[ClassifierOutputTarget(1)] * len(x))

        return images_per_second({"plain": plain, "ours": ours, "gradcam": package}, batches, repeats, device)


def bench_extract(model: nn.Module, arch: str, n_images: int, img_size: int, batch_size: int,
                  device: str) -> dict[str, float]:
    """Images/s of ``qrs extract`` end to end and of a plain forward pass over the same images."""
    work = Path(tempfile.mkdtemp(prefix="bench_cam."))
    try:
        synthesize(work / "raw", "ksdd2", n_train=n_images, n_test=max(2, n_images // 20), seed=0)
        data = prepare("ksdd2", work / "raw", work / "data", img_size=img_size, val_fraction=0.0, progress=False)
        path = work / "model.pt"
        save_checkpoint(path, model, base_meta(arch, img_size))
        update_checkpoint_meta(path, calibration={"scale": 1.0, "method": "gradcam++"})
        cache = data.image_cache("train", progress=False)
        n = len(cache)
        loaded = load_checkpoint(path, device=device)

        def plain_pass(stop: int) -> None:
            with torch.inference_mode():
                for i in range(0, stop, batch_size):
                    batch = torch.from_numpy(np.array(cache[i:i + batch_size])).permute(0, 3, 1, 2).to(device)
                    loaded(normalize(batch, loaded.qrs_meta))
            _sync(device)

        plain_pass(batch_size)
        start = time.perf_counter()
        plain_pass(n)
        plain = n / (time.perf_counter() - start)
        start = time.perf_counter()
        extract(work / "data", path, modes=["train"], out_dir=work / "out", options=ScoreOptions(),
                batch_size=batch_size, device=device, progress=False)
        return {"n": n, "plain": plain, "extract": n / (time.perf_counter() - start)}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--archs", nargs="+", default=["resnet50", "efficientnet_lite0"])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--n-images", type=int, default=32)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=3)
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    parser.add_argument("--device", choices=["cpu", "cuda"], default=default_device)
    parser.add_argument("--extract-images", type=int, default=1000,
                        help="prepared images for the end-to-end extract row (0: skip it)")
    args = parser.parse_args()

    images = torch.randn(args.n_images, 3, args.img_size, args.img_size, device=args.device)
    print(f"{args.n_images} images {args.img_size}x{args.img_size}, device {args.device}, "
          f"{torch.get_num_threads()} threads, best of {args.repeats}")
    print(f"{'arch':<19} {'batch':>5} {'plain img/s':>12} {'ours img/s':>11} {'grad-cam img/s':>15} "
          f"{'ours/plain':>11} {'ours/grad-cam':>14}")
    rates: dict[tuple[str, int], dict[str, float]] = {}
    for arch in args.archs:
        torch.manual_seed(0)
        model = build_model(arch).eval().to(args.device)
        for batch_size in args.batch_sizes:
            r = rates[arch, batch_size] = bench_batch_size(model, images, batch_size, args.repeats, args.device)
            print(f"{arch:<19} {batch_size:>5} {r['plain']:>12.1f} {r['ours']:>11.1f} {r['gradcam']:>15.1f} "
                  f"{r['ours'] / r['plain']:>11.2f} {r['ours'] / r['gradcam']:>14.2f}")
    if len(args.archs) > 1:
        first, second = args.archs[:2]
        for batch_size in args.batch_sizes:
            a, b = rates[first, batch_size], rates[second, batch_size]
            print(f"{second} / {first} images/s at batch {batch_size}: forward {b['plain'] / a['plain']:.2f}, "
                  f"Grad-CAM++ + QRS {b['ours'] / a['ours']:.2f}")
    if args.extract_images > 0:
        torch.manual_seed(0)
        model = build_model(args.archs[0]).eval().to(args.device)
        e = bench_extract(model, args.archs[0], args.extract_images, args.img_size, 16, args.device)
        print(f"qrs extract end to end ({args.archs[0]}), {e['n']:.0f} prepared images, batch 16: plain "
              f"{e['plain']:.1f} img/s, extract {e['extract']:.1f} img/s, extract/plain {e['extract'] / e['plain']:.2f}")

if __name__ == "__main__":
    main()
