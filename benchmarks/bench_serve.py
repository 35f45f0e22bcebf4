"""Throughput of the scoring service against the in-process batched extract path, in one run.

One random-weight ResNet (2 classes, eval mode, calibrated on the benchmark's own images), one set of
synthetic raw parts (PNG, KSDD2-like 230x630 by default), the same images scored two ways:

  (a) in-process  qrs.extract.score_batch on the prepared uint8 squares in batches of --max-batch:
                  the model path alone, the upper bound (no decoding, no HTTP);
  (b) service     qrs serve's app under uvicorn on loopback, --clients concurrent clients (a separate
                  process) each POSTing one PNG per request to /v1/score: decoding, resizing, HTTP,
                  micro-batching and JSON included.

Prints the throughput of each, the ratio (b)/(a) (target >= 0.8), and the p50/p95 latency of (b)
next to the single-image in-process time.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import multiprocessing
import os
import statistics
import time

import numpy as np
import torch
from PIL import Image

from qrs.data.synth import render_part
from qrs.extract import ScoreOptions, score_batch
from qrs.images import resize_image
from qrs.model import base_meta, build_model, resolve_device
from qrs.predict import Scorer
from qrs.score import calibration_scale
from qrs.serve import create_app, serve_in_background


def synthetic_pngs(n: int, size: tuple[int, int]) -> list[bytes]:
    """``n`` seeded synthetic parts (every other one defective) as PNG bytes."""
    pngs = []
    for seed in range(n):
        image, _, _ = render_part(np.random.default_rng(seed), size, "band", seed % 2 == 1)
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="PNG")
        pngs.append(buf.getvalue())
    return pngs


def calibrated_model(arch: str, side: int, squares: torch.Tensor, device: torch.device) -> torch.nn.Module:
    """A random model with a calibration like `qrs calibrate` writes, its scale from the images' map peaks."""
    torch.manual_seed(0)
    model = build_model(arch).eval().to(device)
    model.qrs_meta = base_meta(arch, side)
    with torch.inference_mode():
        peaks = score_batch(model, squares[:16], None, scale=None, options=ScoreOptions(norm="image"))["peak"]
    model.qrs_meta["calibration"] = {"scale": calibration_scale(peaks.cpu()), "anchor": "good", "quantile": 0.99,
                                     "split": "val", "n_parts": 16, "note": "", "method": "gradcam++",
                                     "threshold": 0.9, "norm": "dataset", "aggregation": "mass",
                                     "risk_cuts": None, "risk_note": "benchmark"}
    return model


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def in_process(model: torch.nn.Module, squares: torch.Tensor, batch_size: int, device: torch.device,
               repeats: int) -> tuple[float, float]:
    """(best images/s of batched score_batch over the squares, median seconds of a single-image call)."""
    cal = model.qrs_meta["calibration"]
    options = ScoreOptions(threshold=cal["threshold"])

    @torch.inference_mode()
    def run(batch: torch.Tensor) -> None:
        score_batch(model, batch, None, scale=cal["scale"], options=options)

    run(squares[:batch_size])
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        for batch in squares.split(batch_size):
            run(batch)
        _sync(device)
        best = min(best, time.perf_counter() - start)
    singles = []
    for i in range(min(8, len(squares))):
        start = time.perf_counter()
        run(squares[i:i + 1])
        _sync(device)
        singles.append(time.perf_counter() - start)
    return len(squares) / best, statistics.median(singles)


def _client_process(url: str, pngs: list[bytes], n_requests: int, n_clients: int) -> tuple[float, list[float]]:
    """(wall seconds, per-request latencies) of n_clients concurrent clients sending n_requests in all."""
    import httpx

    latencies: list[float] = []

    async def worker(client: httpx.AsyncClient, counter: object) -> None:
        for i in counter:
            start = time.perf_counter()
            response = await client.post("/v1/score", files=[("files", (f"part_{i}.png", pngs[i % len(pngs)],
                                                                        "image/png"))])
            response.raise_for_status()
            latencies.append(time.perf_counter() - start)

    async def main() -> float:
        limits = httpx.Limits(max_connections=n_clients, max_keepalive_connections=n_clients)
        async with httpx.AsyncClient(base_url=url, limits=limits, timeout=300) as client:
            warm = iter(range(n_clients))
            await asyncio.gather(*(worker(client, warm) for _ in range(n_clients)))
            latencies.clear()
            counter = iter(range(n_requests))
            start = time.perf_counter()
            await asyncio.gather(*(worker(client, counter) for _ in range(n_clients)))
            return time.perf_counter() - start

    return asyncio.run(main()), latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="resnet18", help="resnet18 ... resnet152")
    parser.add_argument("--img-size", type=int, default=224, help="model input side in pixels")
    parser.add_argument("--raw-size", default="230x630", help="raw image WIDTHxHEIGHT")
    parser.add_argument("--n-images", type=int, default=32, help="distinct images (requests cycle over them)")
    parser.add_argument("--requests", type=int, default=256, help="requests (one image each) sent to the service")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--max-wait-ms", type=float, default=5)
    parser.add_argument("--repeats", type=int, default=2, help="timed in-process passes before and after (b)")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    device = resolve_device(args.device)
    width, height = (int(v) for v in args.raw_size.split("x"))
    pngs = synthetic_pngs(args.n_images, (width, height))
    squares = torch.from_numpy(np.stack([
        resize_image(np.asarray(Image.open(io.BytesIO(p)).convert("RGB")), args.img_size, "stretch") for p in pngs
    ])).permute(0, 3, 1, 2)
    model = calibrated_model(args.arch, args.img_size, squares, device)
    print(f"{args.arch} at {args.img_size} px, raw {width}x{height} PNG, device {device}, "
          f"{torch.get_num_threads()} torch threads, max batch {args.max_batch}, {args.clients} clients, "
          f"{args.requests} requests over {args.n_images} images, load average {os.getloadavg()[0]:.1f}")

    # (a) is measured before and after (b) and the best pass kept: the ratio errs on the low side.
    before = in_process(model, squares, args.max_batch, device, args.repeats)
    app = create_app(Scorer(model), max_batch=args.max_batch, max_wait_ms=args.max_wait_ms)
    with serve_in_background(app) as url:
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            wall, latencies = pool.apply(_client_process, (url, pngs, args.requests, args.clients))
        sizes = app.state.service.batcher.sizes
    after = in_process(model, squares, args.max_batch, device, args.repeats)
    batched, single_s = max(before[0], after[0]), min(before[1], after[1])
    served = args.requests / wall
    p50, p95 = np.percentile(np.array(latencies) * 1000, [50, 95])
    mean_batch = sum(s * c for s, c in sizes.items()) / sum(sizes.values())
    print(f"(a) in-process score_batch, batches of {args.max_batch}: {batched:8.1f} img/s")
    print(f"(b) service, {args.clients} concurrent clients:       {served:8.1f} img/s   mean model batch {mean_batch:.1f}")
    print(f"ratio (b)/(a): {served / batched:.2f}   (target >= 0.8)")
    print(f"latency of (b): p50 {p50:.1f} ms, p95 {p95:.1f} ms   in-process single image: {1000 * single_s:.1f} ms")

if __name__ == "__main__":
    main()
