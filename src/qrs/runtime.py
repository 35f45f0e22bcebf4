"""The onnx backend: a model from ``qrs export`` run by ONNX Runtime, behind the same :class:`qrs.predict.Scorer`.

This module holds the contract of the exported file (its input, outputs and format tag), which
:mod:`qrs.export` writes. Only ``onnxruntime`` is needed here (not ``onnx`` or the exporter). The file is checked when it is
loaded: readable, made by ``qrs export`` (its ``metadata_props``), and a graph whose input and outputs
are the ones that metadata describes. The graph's logits and maps then go through
:func:`qrs.extract.score_maps`, the same code as the torch backend's, so an ROI other than the whole
image is honoured exactly as there (the graph's own ``qrs`` output is for the whole image).
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
from torch import Tensor

from qrs.cam import CamResult
from qrs.errors import QrsError
from qrs.extract import ScoreOptions
from qrs.images import as_size
from qrs.scoring import scoring

FORMAT_TAG = "qrs-onnx"
"""``metadata_props["qrs_format"]`` of every model ``qrs export`` writes: how a qrs ONNX file is recognised."""
FORMAT_VERSION = 1
INPUT = "images"
OUTPUTS = {"logits": "logits", "p_defective": "p_defective", "raw_map": "raw", "map": "maps",
           "normalized_map": "normalized", "qrs": "qrs"}
"""Graph output name -> the key of :func:`qrs.extract.score_batch` it holds, in graph order."""
RUNTIME_INSTALL = "pip install onnxruntime"
EXPORT_INSTALL = "pip install onnx onnxscript onnxruntime"
EXTRA_INSTALL = "pip install -e '.[onnx]'"


def require(module: str, what: str, install: str = EXPORT_INSTALL) -> ModuleType:
    """Import an optional dependency, or say which pip command installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise QrsError(f"{what} needs the package {module}, which is not installed: {install} "
                       f"(in a qrs clone: {EXTRA_INSTALL})") from None


class OnnxModelError(QrsError):
    """An ONNX file that is missing, unreadable, not made by ``qrs export``, or whose graph does not
    take the images its metadata describes."""


def _providers(ort: Any, device: str) -> list[str]:
    """ONNX Runtime execution providers for ``--device``: CUDA when asked for (or ``auto`` and present)."""
    available = ort.get_available_providers()
    if device in ("auto", "cuda") and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if device in ("auto", "cpu"):
        return ["CPUExecutionProvider"]
    if device == "cuda":
        raise QrsError("--device cuda was asked for but this onnxruntime has no CUDA provider "
                       "(pip install onnxruntime-gpu)")
    raise QrsError(f"the onnx backend runs on auto, cpu or cuda, not {device!r}")


def _load_errors(ort: Any) -> tuple[type[Exception], ...]:
    """onnxruntime's own error types (pybind classes that derive from Exception directly)."""
    state = ort.capi.onnxruntime_pybind11_state
    return tuple(v for v in vars(state).values() if isinstance(v, type) and issubclass(v, Exception))


class OnnxBackend:
    """An exported model in an ONNX Runtime session, with the checkpoint metadata it was exported from."""

    name = "onnx"

    def __init__(self, session: Any, path: str | os.PathLike[str]) -> None:
        props = session.get_modelmeta().custom_metadata_map
        if props.get("qrs_format") != FORMAT_TAG:
            raise OnnxModelError(f"{path} is an ONNX model but not one made by `qrs export` (it has no qrs "
                                 "metadata); export a checkpoint with `qrs export --model CKPT --format onnx`")
        try:
            version = int(props["qrs_format_version"])
            self.meta: dict[str, Any] = json.loads(props["qrs_meta"])
            self.resize: str = props["resize"]
            size = as_size(self.meta["img_size"])
        except (KeyError, ValueError, TypeError) as exc:
            raise OnnxModelError(f"{path}: its qrs metadata is incomplete or unreadable ({exc!r})") from exc
        if version > FORMAT_VERSION:
            raise OnnxModelError(f"{path} was exported by a newer qrs (format {version}; this qrs reads up to "
                                 f"{FORMAT_VERSION}): upgrade qrs")
        inputs = session.get_inputs()
        shape = list(inputs[0].shape) if len(inputs) == 1 else []
        if not (len(inputs) == 1 and inputs[0].name == INPUT and inputs[0].type == "tensor(uint8)"
                and len(shape) == 4 and shape[1:] == [*size, 3]):
            found = ", ".join(f"{i.name} {i.type} {i.shape}" for i in inputs)
            raise OnnxModelError(f"{path}: the graph's input ({found}) is not the uint8 B x {size[0]} x {size[1]} x 3 "
                                 f"'{INPUT}' its metadata describes")
        missing = set(OUTPUTS) - {o.name for o in session.get_outputs()}
        if missing:
            raise OnnxModelError(f"{path}: the graph lacks the outputs {', '.join(sorted(missing))}")
        self.session = session
        self.path = Path(path)
        self.size = size
        self.batch: int | None = shape[0] if isinstance(shape[0], int) else None
        """The graph's fixed batch size, or None for a dynamic batch."""
        self.options: ScoreOptions = scoring(self.meta).options

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, device: str = "auto") -> "OnnxBackend":
        """Open ``path`` in an ONNX Runtime session (CPU, or CUDA when asked for and installed)."""
        ort = require("onnxruntime", "the onnx backend", RUNTIME_INSTALL)
        path = Path(path)
        if not path.is_file():
            raise OnnxModelError(f"ONNX model {path} does not exist")
        providers = _providers(ort, device)
        try:
            session = ort.InferenceSession(str(path), providers=providers)
        except _load_errors(ort) as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise OnnxModelError(f"{path} is not a readable ONNX model (corrupted, truncated, or a checkpoint, which "
                                 f"--backend torch reads): {reason}") from exc
        return cls(session, path)

    def run(self, images: np.ndarray) -> list[np.ndarray]:
        """The graph's :data:`qrs.export.OUTPUTS` for uint8 B x H x W x 3 images, any B (a graph of fixed
        batch size runs in chunks, the last one padded with copies of its last image)."""
        if (images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (*self.size, 3)
                or not len(images)):
            raise OnnxModelError(f"the ONNX model takes uint8 B x {self.size[0]} x {self.size[1]} x 3 images, got "
                                 f"{images.dtype} {'x'.join(map(str, images.shape))}")
        n = len(images)
        step = self.batch or n
        pad = -n % step
        if pad:
            images = np.concatenate([images, np.repeat(images[-1:], pad, axis=0)])
        chunks = [self.session.run(list(OUTPUTS), {INPUT: images[i:i + step]}) for i in range(0, len(images), step)]
        return [np.concatenate(parts)[:n] for parts in zip(*chunks)]

    def cams(self, images: Tensor, options: ScoreOptions) -> CamResult:
        """uint8 B x 3 x H x W images -> the graph's logits, raw and full-size maps."""
        if options != self.options:
            raise QrsError(f"the ONNX graph computes {self.options}, not {options}")
        out = dict(zip(OUTPUTS, self.run(images.permute(0, 2, 3, 1).contiguous().cpu().numpy())))
        return CamResult(raw=torch.from_numpy(out["raw_map"]), maps=torch.from_numpy(out["map"]),
                         logits=torch.from_numpy(out["logits"]))
