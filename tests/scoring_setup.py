"""Tiny checkpoints and part images for the scoring tests (``qrs score``, the service, the web page).

A random-weight resnet18 at 32 px is enough: these tests check that every path gives the same
numbers and handles bad input, not that the model is any good.
"""

from __future__ import annotations

import contextlib
import io
import socket
import struct
import subprocess
import sys
import time
import urllib.request
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image

from qrs.data.synth import render_part
from qrs.extract import ScoreOptions, score_batch
from qrs.images import resize_image
from qrs.model import base_meta, build_model, save_checkpoint
from qrs.score import calibration_scale

SIDE = 32
EXPORT_SIDE = 64
"""Side of the ``exported`` fixture's model: a 2x2 map, so that its maps (and an ROI) vary over the image."""
PART_SIZE = (48, 96)
"""(width, height) of the synthetic raw images: a tall part, like KSDD2's, only tiny."""
RISK_CUTS = {"low": 0.02, "high": 0.25}


class Exported(NamedTuple):
    """A checkpoint of :func:`make_checkpoint` and its ``qrs export`` (the ``exported`` fixture)."""

    checkpoint: Path
    onnx: Path


def part_image(seed: int, defective: bool = True, size: tuple[int, int] = PART_SIZE) -> np.ndarray:
    """An HxWx3 uint8 synthetic part (seeded)."""
    image, _, _ = render_part(np.random.default_rng(seed), size, "band", defective)
    return image


def png(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def make_checkpoint(path: Path, *, calibrated: bool = True, risk_cuts: dict[str, float] | None = RISK_CUTS,
                    arch: str = "resnet18", side: int = SIDE, fail: bool = False) -> Path:
    """A random checkpoint (resnet18 unless ``arch`` says otherwise, 32 px by default); calibrated like ``qrs
    calibrate`` writes it (anchor good: the scale is the 0.99 quantile of the map peaks of a few synthetic good
    parts, over tau). ``fail``: a resnet whose head's bias makes it fail every part (the maps do not change)."""
    torch.manual_seed(0)
    model = build_model(arch).eval()
    if fail:
        with torch.no_grad():
            model.fc.bias[1] += 10.0
    meta = base_meta(arch, side)
    if calibrated:
        model.qrs_meta = meta
        images = torch.from_numpy(np.stack([resize_image(part_image(s, defective=False), side, "stretch")
                                            for s in range(4)]))
        peaks = score_batch(model, images.permute(0, 3, 1, 2), None, scale=None,
                            options=ScoreOptions(norm="image"))["peak"]
        meta["calibration"] = {"scale": calibration_scale(peaks), "anchor": "good", "quantile": 0.99, "split": "val",
                               "n_parts": 4, "note": "", "method": "gradcam++", "threshold": 0.9,
                               "norm": "dataset", "aggregation": "mass",
                               "risk_cuts": risk_cuts,
                               "risk_note": "" if risk_cuts else "too few defective validation parts: no risk levels"}
    save_checkpoint(path, model, meta)
    return path


def bomb_png(width: int = 10_000, height: int = 6_000) -> bytes:
    """A PNG whose header claims width x height pixels (60 megapixels by default) with almost no data."""
    data = png(np.zeros((2, 2, 3), dtype=np.uint8))
    ihdr = struct.pack(">II", width, height) + data[24:29]
    chunk = b"IHDR" + ihdr
    return data[:8] + struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk)) + data[33:]


def free_port() -> int:
    """A TCP port that was free a moment ago (nothing listens on it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def serve_process(args: list[str], log: Path) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """``python -m qrs serve ARGS`` in its own process on a free port, as a user starts it; yields the
    process and its URL once /healthz answers, and stops it at the end (if it still runs)."""
    port = free_port()
    with open(log, "wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "qrs", "serve", "--port", str(port), *args], stdout=out,
                                   stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(url + "/healthz", timeout=5):
                    break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"qrs serve did not start: {log.read_text()}") from None
                time.sleep(0.2)
        yield process, url
    finally:
        if process.poll() is None:
            process.terminate()
            process.wait(timeout=60)
