"""What ``qrs train`` shows while it runs: TensorBoard scalars per step and per epoch, the Grad-CAM++
overlays of a fixed handful of validation parts, resumption, and the error when tensorboard is missing."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import read_events
from qrs.data.dataset import PreparedDataset
from qrs.errors import QrsError
from qrs.extract import ScoreOptions, score_batch
from qrs.model import base_meta, build_model, read_checkpoint
from qrs.monitor import OVERLAY_OPTIONS, explanation_overlays, overlay_parts
from qrs.overlay import render_overlay
from qrs.train import TrainConfig, train

STEP_TAGS = {"step/train_loss", "step/lr", "step/train_mask_loss", "step/mask_weight"}
EPOCH_TAGS = {"epoch/train_loss", "epoch/val_loss", "epoch/val_acc", "epoch/val_f1", "epoch/train_mask_loss",
              "epoch/mask_weight", "epoch/lr"}


def _config(data: Path, out: Path, **kw: object) -> TrainConfig:
    return TrainConfig(**{**dict(data_root=data, out=out, arch="resnet18", num_epochs=2, batch_size=8,
                                 learning_rate=1e-3, device="cpu", progress=False), **kw})


def test_tensorboard_holds_the_curves_per_step_and_epoch_and_the_overlays(prepared_small: Path,
                                                                          tmp_path: Path) -> None:
    board = tmp_path / "tb"

    def crash(epoch: int, batch: int) -> None:
        if (epoch, batch) == (2, 0):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(_config(prepared_small, tmp_path / "run", mask_loss="energy", mask_weight=2.0, tensorboard=board),
              on_batch=crash)
    train(_config(prepared_small, tmp_path / "run", mask_loss="energy", mask_weight=2.0, tensorboard=board,
                  resume=True))
    events = read_events(board)
    assert set(events.Tags()["scalars"]) == STEP_TAGS | EPOCH_TAGS
    log = pd.read_csv(tmp_path / "run" / "log.csv")
    steps = 32 // 8  # 32 training parts, batch 8, per epoch
    for key in ("train_loss", "val_loss", "val_acc", "val_f1", "lr", "mask_weight"):
        logged = events.Scalars(f"epoch/{key}")
        assert [e.step for e in logged] == [steps, 2 * steps]
        np.testing.assert_allclose([e.value for e in logged], log[key], rtol=1e-6)
    assert [e.step for e in events.Scalars("step/train_loss")] == list(range(1, 2 * steps + 1))
    assert [e.value for e in events.Scalars("step/lr")] == pytest.approx([1e-3] * (2 * steps))  # float32 events
    ramp = [e.value for e in events.Scalars("step/mask_weight")]
    assert ramp == pytest.approx([2.0 * min(1.0, s / (0.2 * 2 * steps)) for s in range(2 * steps)])
    val = PreparedDataset(prepared_small).split("val")
    labels = val.labels.tolist()
    parts = overlay_parts(labels)
    expected = {f"gradcam/{'defective' if labels[i] else 'good'}/{val.rows['id'].iat[i]}" for i in parts}
    assert set(events.Tags()["images"]) == expected
    assert len(expected) == min(3, labels.count(1)) + min(3, labels.count(0))
    for tag in expected:
        pictures = events.Images(tag)
        assert [p.step for p in pictures] == [steps, 2 * steps]
        assert (pictures[0].width, pictures[0].height) == (32, 32)


def test_the_overlays_are_the_scoring_paths_map_drawn_over_the_part(prepared_small: Path) -> None:
    torch.manual_seed(0)
    model = build_model("resnet18").eval()
    meta = base_meta("resnet18", 32)
    val = PreparedDataset(prepared_small).split("val")
    parts = overlay_parts(val.labels.tolist())
    pictures = explanation_overlays(model, meta, val, parts)
    model.qrs_meta = meta
    items = [val[i] for i in parts]
    scored = score_batch(model, torch.stack([it["image"] for it in items]), torch.stack([it["roi"] for it in items]),
                         scale=None, options=ScoreOptions(norm="image"))
    for picture, item, m in zip(pictures, items, scored["normalized"].numpy()):
        roi = item["roi"].numpy()
        want = render_overlay(item["image"].permute(1, 2, 0).numpy(), m, 0.9, roi, defect=item["defect"].numpy())
        np.testing.assert_array_equal(picture, want)
    assert OVERLAY_OPTIONS == ScoreOptions(norm="image")


def test_overlay_parts_are_the_first_defective_then_the_first_good_ones() -> None:
    assert overlay_parts([0, 1, 0, 0, 1, 1, 1, 0, 0]) == [1, 4, 5, 0, 2, 3]
    assert overlay_parts([0, 0], per_class=3) == [0, 1]


def test_tensorboard_missing_is_a_clear_error(prepared_small: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # `import` of it raises ImportError
    with pytest.raises(QrsError) as caught:
        train(_config(prepared_small, tmp_path / "run", tensorboard=tmp_path / "tb"))
    assert str(caught.value) == ("--tensorboard needs the package tensorboard, which is not installed: pip install "
                                 "tensorboard (in a qrs clone: pip install -e '.[tensorboard]')")
    assert not (tmp_path / "run").exists() and not (tmp_path / "tb").exists()


def test_tensorboard_leaves_the_trained_weights_unchanged(prepared_small: Path, tmp_path: Path) -> None:
    plain = train(_config(prepared_small, tmp_path / "plain", num_epochs=1, mask_loss="energy"))
    logged = train(_config(prepared_small, tmp_path / "logged", num_epochs=1, mask_loss="energy",
                           tensorboard=tmp_path / "tb"))
    a, b = read_checkpoint(plain.last_path)["state_dict"], read_checkpoint(logged.last_path)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert read_events(tmp_path / "tb").Tags()["images"]
