"""CPU throughput of an exported model: PyTorch eager against ONNX Runtime (and OpenVINO) on the same file.

For each arch (random init, 2 classes, calibrated like ``qrs calibrate`` on the benchmark's own
images so that the graph computes M and QRS), one set of random uint8 images at the model's size,
images per second at batch 1 and 16 (best of --repeats passes after a warm-up; the steps take turns
within each pass, so load from other processes hits them alike):

  fwd   logits only: ``model(normalize(x))`` under torch.inference_mode, against ONNX Runtime on a graph of
        the same forward pass (normalisation inside, as in the export);
  full  logits + Grad-CAM++ map + M + QRS: ``qrs.extract.score_batch`` (what ``qrs score`` runs) against
        ONNX Runtime on the file ``qrs export`` writes (dynamic batch), and OpenVINO's runtime reading
        that same file (reshaped to the batch size, its recommended use), when ``openvino`` is installed.

Targets: ONNX Runtime / torch >= 1.3 at batch 1 for the full output; OpenVINO / ONNX Runtime >= 1.2
would make OpenVINO worth a third backend, at the export's parity (f32; OpenVINO's default on CPUs
with AMX is bf16, measured too, with its deviations). Every runtime gets --threads threads.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from torch import Tensor, nn

from bench_cam import images_per_second
from qrs.export import export_onnx
from qrs.runtime import OUTPUTS
from qrs.extract import ScoreOptions, score_batch
from qrs.model import base_meta, build_model, normalize
from qrs.score import calibration_scale

BATCH_SIZES = (1, 16)
HAS_OPENVINO = importlib.util.find_spec("openvino") is not None


class Forward(nn.Module):
    """The forward pass alone, with the export's input contract (uint8 NHWC, normalisation inside)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> Tensor:
        return self.model(normalize(images.permute(0, 3, 1, 2), self.model.qrs_meta))


def calibrated_model(arch: str, images: Tensor) -> nn.Module:
    """A random-init model whose calibration scale comes from its own map peaks on ``images`` (NHWC)."""
    torch.manual_seed(0)
    model = build_model(arch).eval()
    model.qrs_meta = base_meta(arch, images.shape[1])
    with torch.inference_mode():
        peaks = score_batch(model, images.permute(0, 3, 1, 2), None, scale=None, options=ScoreOptions(norm="image"))
    model.qrs_meta["calibration"] = {
        "scale": calibration_scale(peaks["peak"]), "anchor": "good", "quantile": 0.99, "split": "val",
        "n_parts": len(images), "note": "", "method": "gradcam++", "threshold": 0.9, "norm": "dataset",
        "aggregation": "mass", "risk_cuts": None, "risk_note": "benchmark"}
    return model


def ort_session(path: Path, threads: int) -> ort.InferenceSession:
    """A CPU session with ``threads`` threads that do not spin after a run (they would take the CPU from
    the step measured next)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def openvino_model(path: Path, batch_size: int, side: int, threads: int, precision: str | None) -> Callable | None:
    """OpenVINO's CPU runtime on the ONNX file, reshaped to ``batch_size``, at an inference precision (None:
    OpenVINO's default, bf16 on CPUs with AMX); None when openvino is not installed."""
    if not HAS_OPENVINO:
        return None
    import openvino as ov

    core = ov.Core()
    model = core.read_model(str(path))
    model.reshape({"images": [batch_size, side, side, 3]})
    config: dict[str, object] = {"INFERENCE_NUM_THREADS": threads}
    if precision is not None:
        config["INFERENCE_PRECISION_HINT"] = precision
    return core.compile_model(model, "CPU", config)


def gaps(got: dict[str, np.ndarray], want: dict[str, Tensor]) -> tuple[float, float]:
    """(max |p_defective difference|, max raw map difference / the map's max) against PyTorch."""
    raw = want["raw"].numpy()
    return (float(np.abs(got["p_defective"] - want["p_defective"].numpy()).max()),
            float(np.abs(got["raw_map"] - raw).max() / max(float(np.abs(raw).max()), 1e-12)))


def bench_arch(arch: str, side: int, n_images: int, repeats: int, threads: int, work: Path) -> list[dict[str, Any]]:
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (n_images, side, side, 3), dtype=np.uint8))
    model = calibrated_model(arch, images[:8])
    cal = model.qrs_meta["calibration"]
    options = ScoreOptions()
    full_path = work / f"{arch}.onnx"
    export_onnx(model, full_path, progress=False)
    fwd_path = work / f"{arch}-forward.onnx"
    torch.onnx.export(Forward(model).eval(), (images[:2],), str(fwd_path), dynamo=True, verbose=False,
                      external_data=False, input_names=["images"],
                      dynamic_shapes={"images": {0: torch.export.Dim("batch", min=1)}})
    full, fwd = ort_session(full_path, threads), ort_session(fwd_path, threads)

    def torch_fwd(x: Tensor) -> Tensor:
        with torch.inference_mode():
            return model(normalize(x.permute(0, 3, 1, 2), model.qrs_meta))

    def torch_full(x: Tensor) -> dict[str, Tensor]:
        with torch.inference_mode():
            return score_batch(model, x.permute(0, 3, 1, 2), None, scale=cal["scale"], options=options)

    rows = []
    for batch_size in BATCH_SIZES:
        first = images[:batch_size]
        want = torch_full(first)
        row: dict[str, Any] = {"arch": arch, "batch": batch_size,
                               "gap_ort": gaps(dict(zip(OUTPUTS, full.run(None, {"images": first.numpy()}))), want)}
        steps: dict[str, Callable[[Tensor], object]] = {
            "torch_fwd": torch_fwd,
            "ort_fwd": lambda x: fwd.run(None, {"images": x.numpy()}),
            "torch_full": torch_full,
            "ort_full": lambda x: full.run(None, {"images": x.numpy()}),
        }
        for name, precision in (("ov_f32", "f32"), ("ov_default", None)):
            compiled = openvino_model(full_path, batch_size, side, threads, precision)
            if compiled is None:
                continue
            got = compiled(first.numpy())
            row[f"gap_{name}"] = gaps({o.get_any_name(): v for o, v in got.items()}, want)
            row[f"precision_{name}"] = str(compiled.get_property("INFERENCE_PRECISION_HINT"))
            steps[name] = lambda x, c=compiled: c(x.numpy())
        row.update(images_per_second(steps, list(images.split(batch_size)), repeats, "cpu"))
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", nargs="+", default=["resnet18", "resnet50", "efficientnet_lite0"])
    parser.add_argument("--size", type=int, default=224, help="image side in pixels")
    parser.add_argument("--n-images", type=int, default=32, help="images per timed pass (a multiple of 16)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads of every runtime")
    args = parser.parse_args()
    if args.n_images % max(BATCH_SIZES):
        parser.error(f"--n-images must be a multiple of {max(BATCH_SIZES)} (every batch full)")
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, onnxruntime {ort.__version__}"
          + (f", openvino {importlib.metadata.version('openvino')}" if HAS_OPENVINO else "")
          + f"; {args.threads} threads, {args.size} px, {args.n_images} images per pass, best of {args.repeats}; "
          "images/s, all steps of a row measured in turns in one run")
    with tempfile.TemporaryDirectory() as tmp:
        rows = [r for arch in args.archs for r in bench_arch(arch, args.size, args.n_images, args.repeats,
                                                              args.threads, Path(tmp))]
    print(f"\n{'arch':<20}{'batch':>6}{'torch fwd':>11}{'ort fwd':>9}{'ort/torch':>10}{'torch full':>12}"
          f"{'ort full':>10}{'ort/torch':>10}{'ort |dp|':>10}{'ort map':>9}")
    for r in rows:
        print(f"{r['arch']:<20}{r['batch']:>6}{r['torch_fwd']:>11.1f}{r['ort_fwd']:>9.1f}"
              f"{r['ort_fwd'] / r['torch_fwd']:>10.2f}{r['torch_full']:>12.1f}{r['ort_full']:>10.1f}"
              f"{r['ort_full'] / r['torch_full']:>10.2f}{r['gap_ort'][0]:>10.1e}{r['gap_ort'][1]:>9.1e}")
    print("target: ort/torch >= 1.3 for the full output at batch 1 (map: max difference / the map's max)")
    if not HAS_OPENVINO:
        print("OpenVINO not measured: openvino is not installed (pip install -e '.[bench]')")
        return
    print(f"\nOpenVINO reading the same file, full output ({rows[0]['precision_ov_default']} = its default "
          "precision here)")
    print(f"{'arch':<20}{'batch':>6}{'ort full':>10}{'ov f32':>9}{'ov/ort':>8}{'|dp|':>9}{'map':>9}"
          f"{'ov default':>12}{'ov/ort':>8}{'|dp|':>9}{'map':>9}")
    for r in rows:
        print(f"{r['arch']:<20}{r['batch']:>6}{r['ort_full']:>10.1f}"
              + "".join(f"{r[name]:>{w}.1f}{r[name] / r['ort_full']:>8.2f}{r['gap_' + name][0]:>9.1e}"
                        f"{r['gap_' + name][1]:>9.1e}" for name, w in (("ov_f32", 9), ("ov_default", 12))))
    print("OpenVINO would become a backend at ov/ort >= 1.2 with the parity of the export (|dp| <= 1e-5, map <= 1e-4)")


if __name__ == "__main__":
    main()
