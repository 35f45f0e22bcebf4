"""Throughput of the scoring service against the in-process batched extract path, and with inspection
records on against off, in one run.

One random-weight ResNet (2 classes, eval mode, calibrated on the benchmark's own images), one set of
synthetic raw parts (PNG, KSDD2-like 230x630 by default), the same images scored three ways:

  (a) in-process  qrs.extract.score_batch on the prepared uint8 squares in batches of --max-batch:
                  the model path alone, the upper bound (no decoding, no HTTP);
  (b) service     qrs serve's app under uvicorn on loopback, --clients concurrent clients (a separate
                  process) each POSTing one PNG per request to /v1/score: decoding, resizing, HTTP,
                  micro-batching and JSON included; no records (--db none);
  (c) records     the same service recording every image into a fresh SQLite file (WAL, synchronous
                  FULL), keeping the images and overlays of --keep-images (default flagged).

(b) and (c) take turns --rounds times (the machine may be shared: the ratio of each round compares
neighbours in time). Prints the throughput of each, the ratio (b)/(a) (target >= 0.8), the ratio (c)/(b)
per round and their median (target >= 0.9), and the p50/p95 latency of (b) and (c) next to the
single-image in-process time.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import multiprocessing
import os
import statistics
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import torch
from PIL import Image

from qrs.data.synth import render_part
from qrs.extract import ScoreOptions, score_batch
from qrs.images import resize_image
from qrs.model import base_meta, build_model, resolve_device
from qrs.predict import Scorer
from qrs.records import RecordSettings, RecordStore
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


def calibrated_model(arch: str, side: int, squares: torch.Tensor, device: torch.device,
                     flagged: float = 0.0) -> torch.nn.Module:
    """A random model with a calibration like `qrs calibrate` writes, its scale from the images' map peaks;
    its head's bias set so that it fails about ``flagged`` of the images (the maps do not change)."""
    torch.manual_seed(0)
    model = build_model(arch).eval().to(device)
    model.qrs_meta = base_meta(arch, side)
    with torch.inference_mode():
        scored = score_batch(model, squares[:64], None, scale=None, options=ScoreOptions(norm="image"))
        p = scored["p_defective"].double().clamp(1e-9, 1 - 1e-9)
        model.fc.bias[1] -= float(torch.quantile(torch.log(p / (1 - p)), 1 - flagged)) + 1e-6 if flagged else 0.0
        peaks = scored["peak"][:16]
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


def service_run(model: torch.nn.Module, pngs: list[bytes], args: argparse.Namespace,
                records: RecordSettings | None) -> tuple[float, list[float], float, float]:
    """(images/s, latencies, mean model batch, CPU ms per image) of the service under the clients, with or
    without records. The CPU time is this process's (the service, once ready; the clients run in another
    one), from the start of the clients' warm-up to their end: less sensitive than the throughput to other
    work on a shared machine."""
    app = create_app(Scorer(model), max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, records=records)
    with serve_in_background(app) as url:
        while httpx.get(url + "/readyz").status_code != 200:  # the model and the records database are ready
            time.sleep(0.1)
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            cpu = time.process_time()
            wall, latencies = pool.apply(_client_process, (url, pngs, args.requests, args.clients))
            cpu = time.process_time() - cpu
        sizes = app.state.service.batcher.sizes
    return (args.requests / wall, latencies, sum(s * c for s, c in sizes.items()) / sum(sizes.values()),
            1000 * cpu / (args.requests + args.clients))


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
    parser.add_argument("--rounds", type=int, default=3, help="turns of (b) and (c)")
    parser.add_argument("--keep-images", default="flagged", choices=("none", "flagged", "all"),
                        help="images (and overlays) the records of (c) keep")
    parser.add_argument("--flagged", type=float, default=0.1, help="share of the images the model fails")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    device = resolve_device(args.device)
    width, height = (int(v) for v in args.raw_size.split("x"))
    pngs = synthetic_pngs(args.n_images, (width, height))
    squares = torch.from_numpy(np.stack([
        resize_image(np.asarray(Image.open(io.BytesIO(p)).convert("RGB")), args.img_size, "stretch") for p in pngs
    ])).permute(0, 3, 1, 2)
    model = calibrated_model(args.arch, args.img_size, squares, device, args.flagged)
    print(f"{args.arch} at {args.img_size} px, raw {width}x{height} PNG, device {device}, "
          f"{torch.get_num_threads()} torch threads, max batch {args.max_batch}, {args.clients} clients, "
          f"{args.requests} requests over {args.n_images} images, load average {os.getloadavg()[0]:.1f}")

    # (a) is measured before and after the service runs and the best pass kept: the ratio errs on the low side.
    before = in_process(model, squares, args.max_batch, device, args.repeats)
    off, on, ratios = [], [], []
    with tempfile.TemporaryDirectory(prefix="qrs-bench-records-") as tmp:
        for k in range(args.rounds):
            off.append(service_run(model, pngs, args, None))
            url = f"sqlite:///{Path(tmp) / f'round{k}.sqlite'}"
            on.append(service_run(model, pngs, args, RecordSettings(url, keep_images=args.keep_images,
                                                                        station="bench")))
            ratios.append(on[-1][0] / off[-1][0])
            print(f"round {k + 1}: (b) {off[-1][0]:7.1f} img/s {off[-1][3]:6.1f} CPU ms/img   (c) {on[-1][0]:7.1f} "
                  f"img/s {on[-1][3]:6.1f} CPU ms/img   (c)/(b) {ratios[-1]:.2f}   load average "
                  f"{os.getloadavg()[0]:.1f}", flush=True)
        store = RecordStore(url).open()
        recorded = list(store.iter_all())
        flagged = sum(r["prediction"] == 1 for r in recorded) / len(recorded)
        kept = sum(r["image_kept"] for r in recorded)
    after = in_process(model, squares, args.max_batch, device, args.repeats)
    batched, single_s = max(before[0], after[0]), min(before[1], after[1])
    served = max(r[0] for r in off)
    print(f"(a) in-process score_batch, batches of {args.max_batch}: {batched:8.1f} img/s")
    print(f"(b) service, {args.clients} concurrent clients:       {served:8.1f} img/s (best of {args.rounds})   "
          f"mean model batch {off[-1][2]:.1f}")
    print(f"ratio (b)/(a): {served / batched:.2f}   (target >= 0.8)")
    print(f"(c) with records on SQLite, keep-images {args.keep_images}: {len(recorded)} records in the last round, "
          f"{flagged:.0%} flagged, {kept} with their image kept")
    print(f"ratio (c)/(b) per round: {' '.join(f'{r:.2f}' for r in ratios)}   median {statistics.median(ratios):.2f}"
          f"   (target >= 0.9)")
    cpu_off, cpu_on = statistics.median(r[3] for r in off), statistics.median(r[3] for r in on)
    print(f"service CPU per image: (b) {cpu_off:.1f} ms, (c) {cpu_on:.1f} ms (medians); the throughput it allows, "
          f"(b)/(c): {cpu_off / cpu_on:.2f}")
    for name, runs in (("(b)", off), ("(c)", on)):
        p50, p95 = np.percentile(np.array([x for run in runs for x in run[1]]) * 1000, [50, 95])
        print(f"latency of {name}: p50 {p50:.1f} ms, p95 {p95:.1f} ms")
    print(f"in-process single image: {1000 * single_s:.1f} ms")

if __name__ == "__main__":
    main()
