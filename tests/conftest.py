"""Shared fixtures: small synthetic datasets made once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from qrs.data.preparation import prepare
from qrs.data.synth import synthesize

DEEPPCB = Path(__file__).resolve().parent / "data" / "deeppcb"
"""20 real DeepPCB boards (40 images) vendored with their licence; see its README."""
SMALL_SIZE = (115, 315)

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def exported(tmp_path_factory: pytest.TempPathFactory) -> "Exported":
    """A calibrated checkpoint of ``scoring_setup.make_checkpoint`` at 64 px and its ``qrs export`` (dynamic
    batch), for the tests of the onnx backend."""
    from qrs.export import export_onnx
    from scoring_setup import EXPORT_SIDE, Exported, make_checkpoint

    root = tmp_path_factory.mktemp("exported")
    checkpoint = make_checkpoint(root / "calibrated.pt", side=EXPORT_SIDE)
    export_onnx(checkpoint, root / "calibrated.onnx")
    return Exported(checkpoint, root / "calibrated.onnx")


@pytest.fixture(scope="session")
def ksdd2_raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small raw KSDD2-layout dataset: 40 train + 20 test images, 20% defective."""
    root = tmp_path_factory.mktemp("raw") / "ksdd2"
    synthesize(root, "ksdd2", n_train=40, n_test=20, defect_rate=0.25, size=SMALL_SIZE, seed=3)
    return root


@pytest.fixture(scope="session")
def prepared_small(ksdd2_raw: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``ksdd2_raw`` prepared at 32 px (for model tests that only need valid data)."""
    out = tmp_path_factory.mktemp("prepared") / "p32"
    prepare("ksdd2", ksdd2_raw, out, img_size=32, progress=False)
    return out
