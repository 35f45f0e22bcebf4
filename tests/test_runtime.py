"""The onnx backend: what it refuses (missing, corrupt, foreign or tampered files, wrong images, devices,
a missing onnxruntime), each with its message, and how it picks ONNX Runtime's providers."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
import torch

from qrs.errors import QrsError
from qrs.extract import ScoreOptions
from qrs.predict import Scorer
from qrs.runtime import OnnxBackend, OnnxModelError, _providers
from scoring_setup import EXPORT_SIDE as SIDE, Exported

READ_ERROR = "is not a readable ONNX model (corrupted, truncated, or a checkpoint, which --backend torch reads): "


def tampered(source: Path, target: Path, **props: str | None) -> Path:
    """A copy of an exported model with metadata entries replaced (None: removed)."""
    model = onnx.load(str(source))
    kept = {p.key: p.value for p in model.metadata_props}
    kept.update(props)
    del model.metadata_props[:]
    for key, value in kept.items():
        if value is not None:
            model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(target))
    return target


def test_missing_corrupt_truncated_and_checkpoint_files(exported: Exported, tmp_path: Path) -> None:
    with pytest.raises(OnnxModelError, match=f"^ONNX model {tmp_path / 'none.onnx'} does not exist$"):
        OnnxBackend.load(tmp_path / "none.onnx")
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"this is not a protobuf")
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(exported.onnx.read_bytes()[:100_000])
    for path in (garbage, truncated, exported.checkpoint):
        with pytest.raises(OnnxModelError) as exc:
            OnnxBackend.load(path)
        assert str(exc.value).startswith(f"{path} {READ_ERROR}[ONNXRuntimeError]")


def test_an_onnx_model_not_made_by_qrs_export(tmp_path: Path) -> None:
    foreign = tmp_path / "linear.onnx"
    torch.onnx.export(torch.nn.Linear(3, 2).eval(), (torch.zeros(1, 3),), str(foreign), dynamo=True, verbose=False,
                      external_data=False)
    with pytest.raises(OnnxModelError) as exc:
        OnnxBackend.load(foreign)
    assert str(exc.value) == (f"{foreign} is an ONNX model but not one made by `qrs export` (it has no qrs metadata); "
                              "export a checkpoint with `qrs export --model CKPT --format onnx`")


def test_tampered_metadata(exported: Exported, tmp_path: Path) -> None:
    newer = tampered(exported.onnx, tmp_path / "newer.onnx", qrs_format_version="2")
    with pytest.raises(OnnxModelError, match=r"^.*newer.onnx was exported by a newer qrs \(format 2; this qrs reads "
                                             r"up to 1\): upgrade qrs$"):
        OnnxBackend.load(newer)
    incomplete = tampered(exported.onnx, tmp_path / "incomplete.onnx", qrs_meta=None)
    with pytest.raises(OnnxModelError) as exc:
        OnnxBackend.load(incomplete)
    assert str(exc.value) == f"{incomplete}: its qrs metadata is incomplete or unreadable (KeyError('qrs_meta'))"
    meta = onnx.load(str(exported.onnx)).metadata_props
    qrs_meta = next(p.value for p in meta if p.key == "qrs_meta").replace(f'"img_size": [{SIDE}, {SIDE}]', '"img_size": [48, 40]')
    resized = tampered(exported.onnx, tmp_path / "resized.onnx", qrs_meta=qrs_meta)
    with pytest.raises(OnnxModelError) as exc:
        OnnxBackend.load(resized)
    assert str(exc.value) == (f"{resized}: the graph's input (images tensor(uint8) ['batch', {SIDE}, {SIDE}, 3]) is "
                              "not the uint8 B x 48 x 40 x 3 'images' its metadata describes")


def test_images_the_graph_does_not_take(exported: Exported) -> None:
    backend = OnnxBackend.load(exported.onnx, device="cpu")
    for images, shown in ((np.zeros((1, 16, 16, 3), np.uint8), "uint8 1x16x16x3"),
                          (np.zeros((2, SIDE, SIDE, 3), np.float32), f"float32 2x{SIDE}x{SIDE}x3"),
                          (np.zeros((0, SIDE, SIDE, 3), np.uint8), f"uint8 0x{SIDE}x{SIDE}x3")):
        with pytest.raises(OnnxModelError) as exc:
            backend.run(images)
        assert str(exc.value) == f"the ONNX model takes uint8 B x {SIDE} x {SIDE} x 3 images, got {shown}"
    with pytest.raises(QrsError) as exc:
        backend.cams(torch.zeros(1, 3, SIDE, SIDE, dtype=torch.uint8), ScoreOptions(method="layercam"))
    assert str(exc.value).startswith("the ONNX graph computes ScoreOptions(method='gradcam++', ")


def test_without_onnxruntime_the_backend_names_the_pip_command(exported: Exported,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(QrsError) as exc:
        Scorer.load(exported.onnx, backend="onnx")
    assert str(exc.value) == ("the onnx backend needs the package onnxruntime, which is not installed: pip install "
                              "onnxruntime (in a qrs clone: pip install -e '.[onnx]')")


def test_providers_follow_the_device() -> None:
    cpu_only = SimpleNamespace(get_available_providers=lambda: ["CPUExecutionProvider"])
    with_cuda = SimpleNamespace(get_available_providers=lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert _providers(cpu_only, "auto") == _providers(cpu_only, "cpu") == _providers(with_cuda, "cpu") == [
        "CPUExecutionProvider"]
    assert _providers(with_cuda, "auto") == _providers(with_cuda, "cuda") == ["CUDAExecutionProvider",
                                                                              "CPUExecutionProvider"]
    with pytest.raises(QrsError, match=r"^--device cuda was asked for but this onnxruntime has no CUDA provider "
                                       r"\(pip install onnxruntime-gpu\)$"):
        _providers(cpu_only, "cuda")
    with pytest.raises(QrsError, match="^the onnx backend runs on auto, cpu or cuda, not 'mps'$"):
        _providers(with_cuda, "mps")


def test_backends_are_not_mixed_up(exported: Exported) -> None:
    with pytest.raises(QrsError, match=rf"^{exported.onnx} is an ONNX model: score it with --backend onnx \(the torch "
                                       r"backend reads checkpoints\)$"):
        Scorer.load(exported.onnx)
    with pytest.raises(QrsError, match="^unknown backend 'tflite'; expected one of torch, onnx$"):
        Scorer.load(exported.checkpoint, backend="tflite")
