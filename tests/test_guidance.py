"""Mask-guided training (docs/method.md#mask-guided-training): the energy loss by hand, the grid mask, the ramp, the
closed-form map against the CAM module, masks moved with the augmentation, and guidance that
measurably moves the map onto the defect."""

from __future__ import annotations

import shutil
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import straight_and_resumed
from qrs.cam import closed_form_cam, compute_cams, gap_linear
from qrs.data.dataset import PreparedDataset
from qrs.data.preparation import prepare
from qrs.data.synth import synthesize
from qrs.errors import QrsError
from qrs.export import export_onnx
from qrs.extract import calibrate, extract
from qrs.guidance import default_dilation, energy_loss, grid_mask, mask_weight, select_masked
from qrs.model import build_model, load_checkpoint, normalize, read_checkpoint
from qrs.predict import score_files
from qrs.report import analyze
from qrs.train import TrainConfig, augment_batch, train


def test_energy_loss_by_hand() -> None:
    cam = torch.tensor([[[1.0, 2.0], [3.0, 4.0]], [[0.0, 0.0], [0.0, 0.0]]])
    inside = torch.tensor([[[True, False], [False, True]], [[True, True], [True, True]]])
    # image 0: inside sum 1 + 4 = 5 of total 10 -> 1 - 5 / (10 + 1e-6); image 1: all-zero map -> 1 - 0 = 1
    torch.testing.assert_close(energy_loss(cam, inside), torch.tensor([1 - 5 / (10 + 1e-6), 1.0]))
    with pytest.raises(ValueError, match="differ in shape"):
        energy_loss(cam, inside[:, :1])


def test_grid_mask_dilates_then_marks_cells_holding_any_pixel() -> None:
    defect = torch.zeros(1, 8, 8, dtype=torch.bool)
    defect[0, 1, 1] = True  # a single pixel in cell (0, 0) of a 2 x 2 grid of 4 x 4 pixel cells
    assert grid_mask(defect, (2, 2), 0).tolist() == [[[True, False], [False, False]]]
    assert grid_mask(defect, (2, 2), 2).tolist() == [[[True, False], [False, False]]]  # reaches pixel 3, still cell 0
    assert grid_mask(defect, (2, 2), 3).tolist() == [[[True, True], [True, True]]]  # pixel 4: the next cells
    defect = torch.zeros(1, 224, 224, dtype=torch.bool)
    defect[0, 100, 40] = True  # cell (3, 1) of the 7 x 7 grid of 32 px cells; 15 px reach rows 85..115, cols 25..55
    cells = {tuple(map(int, c)) for c in torch.nonzero(grid_mask(defect, (7, 7), default_dilation(224))[0])}
    assert cells == {(2, 0), (2, 1), (3, 0), (3, 1)}
    assert default_dilation(224) == 15 and default_dilation(448) == 30 and default_dilation(32) == 2


def test_mask_weight_ramps_linearly_then_holds() -> None:
    assert [mask_weight(t, 100, 2.0, 0.2) for t in (0, 5, 10, 20, 99)] == [0.0, 0.5, 1.0, 2.0, 2.0]
    assert mask_weight(0, 100, 2.0, 0.0) == 2.0


def test_select_masked_needs_a_defective_label_a_chosen_mask_and_defect_pixels() -> None:
    defect = torch.zeros(4, 2, 2, dtype=torch.bool)
    defect[[0, 1, 3], 0, 0] = True
    chosen = select_masked(torch.tensor([1, 1, 1, 0]), defect, torch.tensor([True, False, True, True]))
    assert chosen.tolist() == [True, False, False, False]


@pytest.mark.parametrize("arch", ["resnet18", "efficientnet_lite0"])
def test_closed_form_map_equals_the_cam_module_and_is_differentiable(arch: str) -> None:
    torch.manual_seed(0)
    model = build_model(arch, pretrained="imagenet" if arch == "efficientnet_lite0" else "none").eval()
    x = torch.randn(3, 3, 64, 64)
    split = gap_linear(model)
    a = split.features(x)
    cam = closed_form_cam(split, a)
    torch.testing.assert_close(cam.detach(), compute_cams(model, x).raw, atol=1e-5, rtol=1e-5)
    inside = torch.zeros_like(cam, dtype=torch.bool)
    inside[:, 0, 0] = True
    energy_loss(cam, inside).mean().backward()
    assert split.linear.weight.grad is not None and split.linear.weight.grad[1].abs().sum() > 0
    assert split.linear.weight.grad[0].abs().sum() == 0  # only the explained class's weights enter the map
    first_conv = next(p for p in model.parameters() if p.dim() == 4)
    assert first_conv.grad is not None and first_conv.grad.abs().sum() > 0


def test_masks_move_with_the_flips_and_turns() -> None:
    images = torch.zeros(16, 3, 8, 8, dtype=torch.uint8)
    images[:, :, 1, 6] = 255  # a bright pixel near the top right corner of every image...
    masks = images[:, 0] > 0  # ... and its mask
    for mode in ("flip", "standard"):
        moved, moved_masks = augment_batch(images, mode, torch.Generator().manual_seed(3), masks)
        assert torch.equal(moved_masks, moved[:, 0] > 127)
        assert len({tuple(torch.nonzero(m)[0].tolist()) for m in moved_masks}) > 2  # the draws moved them around


@pytest.fixture(scope="module")
def guided_raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Synthetic parts with exact masks, half of them defective."""
    root = tmp_path_factory.mktemp("guided")
    synthesize(root / "raw", "ksdd2", n_train=48, n_test=8, defect_rate=0.5, size=(96, 160), seed=5)
    return root / "raw"


@pytest.fixture(scope="module")
def guided_data(guided_raw: Path) -> Path:
    """``guided_raw`` at 64 px (a 2 x 2 map: enough to check the plumbing)."""
    prepare("ksdd2", guided_raw, guided_raw.parent / "p64", img_size=64, val_fraction=0.25, progress=False)
    return guided_raw.parent / "p64"


def _config(data: Path, out: Path, **kw: object) -> TrainConfig:
    base = dict(data_root=data, out=out, arch="resnet18", num_epochs=4, batch_size=12, learning_rate=1e-3,
                device="cpu", progress=False, seed=0)
    return TrainConfig(**{**base, **kw})


def _energy_on_train(path: Path, data: Path, side: int) -> float:
    """Mean share of the Grad-CAM++ map inside the dilated defect, over the defective training images."""
    model = load_checkpoint(path)
    split = PreparedDataset(data).split("train", with_masks=False, with_defect=True)
    shares = []
    for i in range(len(split)):
        item = split[i]
        if item["label"] == 1:
            raw = compute_cams(model, normalize(item["image"][None], model.qrs_meta)).raw
            inside = grid_mask(item["defect"][None], raw.shape[-2:], default_dilation(side))
            shares.append(1 - float(energy_loss(raw, inside)[0]))
    return float(np.mean(shares))


def test_guidance_reports_itself_in_the_first_lines_the_log_and_the_checkpoint(
        guided_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plain = train(_config(guided_data, tmp_path / "plain", num_epochs=1, mask_loss="none"))
    guided = train(_config(guided_data, tmp_path / "guided", num_epochs=2, mask_loss="energy", mask_weight=3.0))
    index = PreparedDataset(guided_data).index
    n_defective = int(((index["split"] == "train") & (index["label"] == 1)).sum())
    first = capsys.readouterr().out.splitlines()[0]
    assert first == ("mask guidance: energy loss on the gradcam++ map, weight 3 (ramped up over the first 20% of the "
                     f"steps), masks dilated by 4 px; masks of {n_defective} of the {n_defective} defective training "
                     "images are used")
    meta = read_checkpoint(guided.last_path)["meta"]
    assert meta["mask_guidance"] == {"loss": "energy", "map": "gradcam++", "weight": 3.0, "warmup": 0.2, "dilate": 4,
                                     "n_masked": n_defective, "n_defective": n_defective}
    assert meta["train_config"]["mask_loss"] == "energy"
    assert "mask_guidance" not in read_checkpoint(plain.last_path)["meta"]
    log = pd.read_csv(tmp_path / "guided" / "log.csv")
    assert list(log["mask_weight"]) == [3.0, 3.0] and (log["train_mask_loss"] > 0).all()
    assert list(log["mask_loss"]) == ["energy", "energy"]
    assert list(pd.read_csv(tmp_path / "plain" / "log.csv")["mask_loss"]) == ["none"]


def test_guidance_moves_the_map_onto_the_defect(guided_raw: Path, tmp_path: Path) -> None:
    data = tmp_path / "p128"
    prepare("ksdd2", guided_raw, data, img_size=128, val_fraction=0.25, progress=False)
    plain = train(_config(data, tmp_path / "plain", mask_loss="none"))
    guided = train(_config(data, tmp_path / "guided", mask_loss="energy", mask_weight=3.0))
    before, after = _energy_on_train(plain.last_path, data, 128), _energy_on_train(guided.last_path, data, 128)
    assert after > before + 0.08, (before, after)


def test_mask_fraction_and_missing_masks(guided_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    train(_config(guided_data, tmp_path / "quarter", num_epochs=1, mask_loss="energy", mask_fraction=0.25))
    n_defective = int(((PreparedDataset(guided_data).index["split"] == "train")
                       & (PreparedDataset(guided_data).index["label"] == 1)).sum())
    assert f"masks of {round(0.25 * n_defective)} of the {n_defective} defective training images" in \
        capsys.readouterr().out
    bare = tmp_path / "bare"
    frame = pd.read_csv(guided_data / "index.csv", dtype=str, keep_default_na=False)
    frame = frame.assign(mask="", defects="[]")
    shutil.copytree(guided_data, bare, ignore=shutil.ignore_patterns("cache", "index.csv"))
    frame.to_csv(bare / "index.csv", index=False)
    with pytest.raises(QrsError, match=r"--mask-loss energy needs defect masks or boxes, but none of the \d+ "
                                       "defective training images of .* has any; train with --mask-loss none"):
        train(_config(bare, tmp_path / "run", num_epochs=1, mask_loss="energy"))
    capsys.readouterr()
    plain = train(_config(bare, tmp_path / "auto_bare", num_epochs=1))
    assert capsys.readouterr().out.splitlines()[0] == ("note: no defect masks or boxes in the training split: trained "
                                                       "on the labels alone (no mask guidance)")
    assert "mask_guidance" not in read_checkpoint(plain.last_path)["meta"]
    guided = train(_config(guided_data, tmp_path / "auto", num_epochs=1))
    first, second = capsys.readouterr().out.splitlines()[:2]
    assert first == ("note: mask guidance is on by default (--mask-loss auto: the training split has defect masks "
                     "or boxes); --mask-loss none trains on the labels alone")
    assert second.startswith("mask guidance: energy loss on the gradcam++ map, weight 3 ")
    meta = read_checkpoint(guided.last_path)["meta"]
    assert meta["train_config"]["mask_loss"] == "auto" and meta["mask_guidance"]["loss"] == "energy"


def test_resume_is_exact_with_mask_guidance(guided_data: Path, tmp_path: Path) -> None:
    a, b = straight_and_resumed(partial(_config, guided_data), tmp_path, (2, 1), num_epochs=3, mask_loss="energy",
                                augment="standard")
    assert [h["train_mask_loss"] for h in a["history"]] == [h["train_mask_loss"] for h in b["history"]]


def test_extract_stats_and_report_say_whether_the_model_was_mask_guided(guided_data: Path, tmp_path: Path) -> None:
    for name, kw in (("plain", {"mask_loss": "none"}), ("guided", {"mask_loss": "energy"})):
        run = train(_config(guided_data, tmp_path / name, num_epochs=1, **kw))
        extract(guided_data, run.best_loss_path, modes=["test"], out_dir=tmp_path / f"x_{name}", device="cpu",
                progress=False)
        result = analyze(tmp_path / f"x_{name}")
        html = result.report.read_text()
        guided = kw["mask_loss"] == "energy"
        assert result.stats["mask_guided"] is guided
        if guided:
            guidance = read_checkpoint(run.best_loss_path)["meta"]["mask_guidance"]
            assert result.stats["options"]["mask_guidance"] == guidance
            assert ("Mask-guided training: energy loss on the Grad-CAM++ map, weight 3, masks dilated by 4 px, "
                    f"masks of {guidance['n_masked']} of {guidance['n_defective']} defective training images used.") in html
        else:
            assert "Trained without mask guidance (classification loss only)." in html


def test_a_mask_guided_checkpoint_scores_the_same_through_onnx(guided_data: Path, tmp_path: Path) -> None:
    run = train(_config(guided_data, tmp_path / "run", num_epochs=1, mask_loss="energy"))
    calibrate(run.best_loss_path, guided_data, device="cpu", progress=False)
    export_onnx(run.best_loss_path, tmp_path / "guided.onnx", progress=False)
    images = sorted((guided_data / "images" / "test").glob("*.png"))
    torch_rows = score_files(images, run.best_loss_path, out=tmp_path / "t", progress=False).rows
    onnx_rows = score_files(images, tmp_path / "guided.onnx", out=tmp_path / "o", backend="onnx",
                            progress=False).rows
    for a, b in zip(torch_rows, onnx_rows, strict=True):
        assert a["verdict"] == b["verdict"] and a["qrs"] == pytest.approx(b["qrs"], abs=1e-4)
        assert a["p_defective"] == pytest.approx(b["p_defective"], abs=1e-5)
