"""``qrs export``: the classifier, its Grad-CAM++ map and QRS in one ONNX graph, for ONNX Runtime on the line.

For a GAP + linear model the map needs no backward pass (docs/method.md#without-a-backward-pass): the explanation is a
few tensor operations after the forward pass and is exported with it. :class:`ScoringGraph` calls
:func:`qrs.extract.score_batch`, the one scoring path, and torch's own exporter (``torch.onnx.export``,
the dynamo exporter) traces it, so the graph computes what ``qrs extract`` and ``qrs score`` compute.
Everything a client needs to reproduce a row goes into the model's ``metadata_props`` (:func:`metadata`);
the export is checked with ONNX Runtime against PyTorch before the file is renamed into place.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from qrs.atomic import write_with
from qrs.cam import gap_linear
from qrs.choices import EXPORT_FORMATS
from qrs.errors import QrsError
from qrs.extract import ScoreOptions, score_batch
from qrs.images import Size, size_text
from qrs.model import load_checkpoint
from qrs.predict import Scorer
from qrs.runtime import FORMAT_TAG, FORMAT_VERSION, INPUT, OUTPUTS, OnnxBackend, OnnxModelError, require

DEFAULT_OPSET = 18
MIN_OPSET = 18
"""The oldest opset the dynamo exporter writes."""
CHECK_IMAGES = 2
"""Random images the export is checked on (a dynamic graph is traced on a batch of this size too)."""
CHECK_TOLERANCE = {"p_defective": 1e-4, "raw_map": 1e-3}
"""Largest deviation from PyTorch an export may show (raw map: relative to its max) before it is refused."""


def parse_batch(value: str | int) -> int | None:
    """``--batch``: ``dynamic`` (None: any batch size) or a fixed batch size N >= 1."""
    if isinstance(value, str) and value.strip().lower() == "dynamic":
        return None
    try:
        batch = int(value)
    except (TypeError, ValueError):
        raise QrsError(f"--batch must be dynamic or a batch size >= 1, got {value!r}") from None
    if batch < 1:
        raise QrsError(f"--batch must be dynamic or a batch size >= 1, got {batch}")
    return batch


class ScoringGraph(nn.Module):
    """What is exported: uint8 B x H x W x 3 RGB images (NHWC, resized like the training data) ->
    the :data:`qrs.runtime.OUTPUTS`, through :func:`qrs.extract.score_batch` with a calibration scale
    and options (a :class:`qrs.predict.Scorer`'s) and the whole image as ROI. The ImageNet
    normalisation is inside (:func:`qrs.model.normalize`)."""

    def __init__(self, model: nn.Module, scale: float | None, options: ScoreOptions) -> None:
        super().__init__()
        self.model = model
        self.scale = scale
        self.options = options

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        out = score_batch(self.model, images.permute(0, 3, 1, 2), None, scale=self.scale, options=self.options)
        return tuple(out[key] for key in OUTPUTS.values())


def metadata(scorer: Scorer, batch: int | None, opset: int) -> dict[str, str]:
    """The model's ``metadata_props``: what ``GET /v1/model`` says (arch, image size, resize mode,
    calibration scale and provenance, threshold, risk cuts...), the input contract, and the whole
    checkpoint metadata (``qrs_meta``) for the onnx backend. Strings as they are, anything else as JSON."""
    info = scorer.info()
    del info["backend"]
    values: dict[str, Any] = {
        "qrs_format": FORMAT_TAG, "qrs_format_version": FORMAT_VERSION, **info,
        "normalization": scorer.meta["normalization"], "input": INPUT, "input_layout": "NHWC", "input_dtype": "uint8",
        "batch": "dynamic" if batch is None else batch, "opset": opset, "outputs": list(OUTPUTS),
        "qrs_meta": scorer.meta,
    }
    return {k: v if isinstance(v, str) else json.dumps(v, default=str) for k, v in values.items()}


@dataclass(frozen=True)
class ExportResult:
    """The written file and how it compares with PyTorch on the check images."""

    path: Path
    n_bytes: int
    arch: str
    img_size: Size
    batch: int | None
    opset: int
    calibrated: bool
    n_checked: int
    deviations: dict[str, float]

    def headline(self) -> str:
        """Two lines for the CLI: what was written, and how close ONNX Runtime came to PyTorch."""
        dev = self.deviations
        return (f"exported {self.arch} ({size_text(self.img_size)} px, {'calibrated' if self.calibrated else 'not calibrated'}) "
                f"to {self.path} ({self.n_bytes / 1e6:.1f} MB, opset {self.opset}, batch "
                f"{'dynamic' if self.batch is None else self.batch}); outputs: {', '.join(OUTPUTS)}\n"
                f"checked with ONNX Runtime against PyTorch on {self.n_checked} random images: p_defective within "
                f"{dev['p_defective']:.1e}, raw map within {dev['raw_map']:.1e} of its max, QRS within {dev['qrs']:.1e}")


def _deviations(graph: ScoringGraph, path: Path, images: Tensor) -> dict[str, float]:
    """Largest differences between ONNX Runtime (through the onnx backend, so the file's metadata is
    read back too) and PyTorch on ``images`` (uint8 NHWC)."""
    backend = OnnxBackend.load(path, device="cpu")
    got = {name: torch.from_numpy(value) for name, value in zip(OUTPUTS, backend.run(images.numpy()))}
    with torch.no_grad():
        want = dict(zip(OUTPUTS, (t.cpu() for t in graph(images))))
    peak = float(want["raw_map"].abs().max()) or 1.0
    return {"p_defective": float((got["p_defective"] - want["p_defective"]).abs().max()),
            "raw_map": float((got["raw_map"] - want["raw_map"]).abs().max()) / peak,
            "qrs": float((got["qrs"] - want["qrs"]).abs().max())}


def export_onnx(model: nn.Module | str | os.PathLike[str], out: str | os.PathLike[str], *, fmt: str = "onnx",
                opset: int = DEFAULT_OPSET, batch: int | None = None, resize: str | None = None,
                progress: bool = True) -> ExportResult:
    """Export a checkpoint (a path, or a loaded model with its ``qrs_meta``) as one ONNX graph with
    its map and QRS; ``batch`` None = any batch size. Written atomically, after a check with ONNX
    Runtime against PyTorch on random images."""
    if fmt not in EXPORT_FORMATS:
        raise QrsError(f"unknown --format {fmt!r}; expected one of {', '.join(EXPORT_FORMATS)}")
    if opset < MIN_OPSET:
        raise QrsError(f"--opset must be >= {MIN_OPSET} (the oldest the PyTorch exporter writes), got {opset}")
    if batch is not None and batch < 1:
        raise QrsError(f"the batch size must be >= 1, got {batch}")
    for module in ("onnx", "onnxscript", "onnxruntime"):
        require(module, "qrs export")
    if not isinstance(model, nn.Module):
        if Path(model).resolve() == Path(out).resolve():
            raise QrsError(f"--out {out} is the checkpoint itself: write the ONNX model to another file")
        model = load_checkpoint(model, device="cpu")
    if gap_linear(model) is None:
        raise QrsError(f"cannot export this {model.qrs_meta.get('arch', type(model).__name__)} model: its logits are "
                       "not global average pooling and one linear layer of its last feature map (a torchvision "
                       "ResNet's layer4, EfficientNet-Lite0's bn2, with their own forward and no hooks), so its "
                       "map needs a backward pass at run time, which the exported graph does not have")
    scorer = Scorer(model, resize=resize)
    graph = ScoringGraph(model, scorer.scale, scorer.options).eval()
    generator = np.random.default_rng(0)
    example = torch.from_numpy(generator.integers(0, 256, (batch or CHECK_IMAGES, *scorer.size, 3), dtype=np.uint8))
    deviations: dict[str, float] = {}
    with tqdm(total=2, desc="export: trace", unit="step", disable=not progress) as bar:
        program = torch.onnx.export(
            graph, (example,), dynamo=True, verbose=False, input_names=[INPUT], output_names=list(OUTPUTS),
            opset_version=opset, external_data=False,
            dynamic_shapes={INPUT: {0: torch.export.Dim("batch", min=1)}} if batch is None else None)
        written = program.model.opset_imports.get("")
        if written != opset:
            raise QrsError(f"the PyTorch exporter could not write opset {opset} (it wrote {written}); choose another "
                           "--opset")
        program.model.metadata_props.update(metadata(scorer, batch, opset))
        bar.update()
        bar.set_description("export: check")

        def write(tmp: Path) -> None:
            program.save(tmp, external_data=False)
            try:
                deviations.update(_deviations(graph, tmp, example))
            except OnnxModelError as exc:
                raise QrsError(f"ONNX Runtime cannot run the exported graph ({exc}); {out} was not written (a lower "
                               "--opset may help)") from exc
            bad = {k: v for k, v in deviations.items() if k in CHECK_TOLERANCE and not v <= CHECK_TOLERANCE[k]}
            if bad:
                raise QrsError("the exported graph disagrees with PyTorch ("
                               f"{', '.join(f'{k} by {v:.2e}' for k, v in bad.items())}); {out} was not written")

        write_with(out, write)
        bar.update()
    out = Path(out)
    return ExportResult(out, out.stat().st_size, str(scorer.meta["arch"]), scorer.size, batch, opset,
                        bool(scorer.meta.get("calibration")), len(example), deviations)
