"""Memory of a training step and a scoring batch, known before it runs, and the early refusal."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qrs import memory
from qrs.errors import QrsError
from qrs.memory import InsufficientMemory, MemoryNeed, check_fits, scoring_need, training_need
from qrs.model import build_model


def test_training_need_counts_what_autograd_saves_per_image() -> None:
    # A convolution saves its input (3 channels), the ReLU its output (4 channels): 7 floats a pixel.
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
    need = training_need(model, (10, 12))
    assert need.per_image == 7 * 10 * 12 * 4
    assert need.fixed == 4 * (4 * 3 * 9 + 4) * 4  # weights, gradients, two Adam moments
    assert next(model.parameters()).device.type == "cpu"  # measured on a copy


def test_need_grows_with_pixels_and_with_a_finer_stride() -> None:
    model = build_model("resnet18")
    small, large = training_need(model, (224, 224)), training_need(model, (448, 448))
    assert large.per_image / small.per_image == pytest.approx(4, rel=1e-3) and large.fixed == small.fixed
    dilated = training_need(build_model("resnet18", output_stride=16), (224, 224))
    assert dilated.per_image > small.per_image
    assert scoring_need(model, (448, 448)).per_image > scoring_need(model, (224, 224)).per_image


def test_scoring_need_is_the_largest_layer_and_the_maps() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 2, 1))
    need = scoring_need(model, (10, 10))
    assert need.per_image == (8 + 8) * 100 * 4 + memory.MAP_COPIES * 4 * 100  # the ReLU: 8 in, 8 out


def test_a_batch_that_cannot_fit_stops_naming_the_largest_that_does(monkeypatch: pytest.MonkeyPatch) -> None:
    need = MemoryNeed(per_image=2**30, fixed=2**29)
    monkeypatch.setattr(memory, "available_bytes", lambda device: 10 * 2**30)
    check_fits(need, 9, what="a training step of resnet18", size=(1024, 448), device=torch.device("cpu"))
    with pytest.raises(InsufficientMemory) as exc:
        check_fits(need, 64, what="a training step of resnet18", size=(1024, 448), device=torch.device("cpu"))
    assert isinstance(exc.value, QrsError)
    assert str(exc.value) == ("a training step of resnet18 at 1024x448 px with --batch_size 64 needs about 64.5 GiB "
                              "(1024 MiB per image), but 10.0 GiB is free on cpu: use --batch_size 9 or less")
    monkeypatch.setattr(memory, "available_bytes", lambda device: 2**29)
    with pytest.raises(InsufficientMemory, match="not even one image fits: prepare the data at a smaller --img-size"):
        check_fits(need, 1, what="scoring", size=(1024, 448), device=torch.device("cpu"))


def test_unknown_free_memory_checks_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(memory, "available_bytes", lambda device: None)
    check_fits(MemoryNeed(per_image=2**40, fixed=0), 64, what="x", size=(16, 16), device=torch.device("cpu"))


def test_free_memory_of_this_machine_is_read() -> None:
    free = memory.available_bytes(torch.device("cpu"))
    assert free is None or free > 0
