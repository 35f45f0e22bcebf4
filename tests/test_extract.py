"""Calibration and extraction: files, values checked against a direct computation, bad inputs."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from qrs.cam import compute_cams
from qrs.cli import app
from qrs.data.dataset import PreparedDataset
from qrs.data.preparation import prepare
from qrs.errors import QrsError
from qrs.extract import ROW_COLUMNS, ScoreOptions, calibrate, extract, parse_modes
from qrs.model import base_meta, build_model, load_checkpoint, normalize, read_checkpoint, save_checkpoint
from qrs.score import quality_risk_score

runner = CliRunner()


@pytest.fixture()
def checkpoint(tmp_path: Path) -> Path:
    """A random-weight resnet18 for 32 px data (its maps are not all zero)."""
    torch.manual_seed(0)
    path = tmp_path / "model.pt"
    save_checkpoint(path, build_model("resnet18"), base_meta("resnet18", 32))
    return path


def _direct(model_path: Path, data: PreparedDataset, split: str, scale: float,
            roi_override: dict | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """QRS, p_defective and raw maps computed directly, image by image, without the extract code."""
    model = load_checkpoint(model_path)
    ds = data.split(split, coords=roi_override)
    qrs, p, raw = [], [], []
    for i in range(len(ds)):
        item = ds[i]
        cams = compute_cams(model, normalize(item["image"][None], model.qrs_meta))
        qrs.append(float(quality_risk_score(cams.maps, item["roi"][None], scale=scale)[0]))
        p.append(float(torch.softmax(cams.logits, 1)[0, 1]))
        raw.append(cams.raw[0].numpy())
    return np.array(qrs), np.array(p), np.stack(raw)


def test_calibrate_stores_the_median_peak_of_defective_training_images(prepared_small: Path,
                                                                       checkpoint: Path) -> None:
    cal = calibrate(checkpoint, prepared_small, progress=False, device="cpu")
    model = load_checkpoint(checkpoint)
    train = PreparedDataset(prepared_small).split("train")
    peaks = [float(compute_cams(model, normalize(train[i]["image"][None], model.qrs_meta)).maps.max())
             for i in range(len(train)) if train[i]["label"] == 1]
    assert cal["scale"] == pytest.approx(float(np.median(peaks)), rel=1e-5)
    assert cal["n_defective_train"] == len(peaks)
    assert read_checkpoint(checkpoint)["meta"]["calibration"] == cal
    assert cal["risk_cuts"] is None and "too few defective validation parts" in cal["risk_note"]


def test_paper_extract_command_line_and_file_contents(prepared_small: Path, checkpoint: Path,
                                                      tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = ["extract", "--data_dir", str(prepared_small), "--model_path", str(checkpoint),
            "--output_prefix", "gradcam_weights", "--excel_prefix", "over_0.9_weights", "--modes", '["train", "test"]',
            "--batch_size", "7", "--num_workers", "0", "--threshold", "0.9", "--img_size", "32", "32",
            "--out-dir", str(out), "--device", "cpu"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "calibrating it first" in result.output
    scale = read_checkpoint(checkpoint)["meta"]["calibration"]["scale"]
    data = PreparedDataset(prepared_small)
    for mode in ("train", "test"):
        rows = pd.read_csv(out / f"gradcam_weights_{mode}.csv", dtype={"id": str}, keep_default_na=False)
        split_rows = data.rows(mode)
        assert tuple(rows.columns) == ROW_COLUMNS and list(rows["id"]) == list(split_rows["id"])
        qrs, p, raw = _direct(checkpoint, data, mode, scale)
        assert np.allclose(rows["qrs"], qrs, atol=1e-6)
        assert np.allclose(rows["p_defective"], p, atol=1e-6)
        assert list(rows["prediction"]) == [int(v > 0.5) for v in p]
        with np.load(out / f"gradcam_weights_{mode}.npz") as npz:
            assert list(npz["ids"]) == list(split_rows["id"])
            assert npz["raw_maps"].dtype == np.float32 and np.allclose(npz["raw_maps"], raw, atol=1e-5)
            assert float(npz["scale"]) == pytest.approx(scale)
            assert json.loads(str(npz["options"]))["method"] == "gradcam++"
        sheets = pd.read_excel(out / f"over_0.9_weights_{mode}.xlsx", sheet_name=None, dtype={"id": str})
        assert set(sheets) == {"images", "statistics", "options"}
        assert len(sheets["images"]) == len(split_rows)
        assert np.allclose(sheets["images"]["qrs"], rows["qrs"])
        stats = dict(zip(sheets["statistics"]["statistic"], sheets["statistics"]["value"]))
        assert stats["n_defective"] == int((rows["label"] == 1).sum())


def test_coords_file_overrides_the_roi(prepared_small: Path, checkpoint: Path, tmp_path: Path) -> None:
    coords = pickle.loads((prepared_small / "coords.pkl").read_bytes())
    left = {k: {"roi": [[0.0, 0.0, 0.5, 1.0]], "defects": v["defects"]} for k, v in coords.items()}
    (tmp_path / "left.pkl").write_bytes(pickle.dumps(left))
    res = extract(prepared_small, checkpoint, modes=["test"], coords_path=tmp_path / "left.pkl", out_dir=tmp_path / "o",
                  device="cpu", progress=False)
    scale = read_checkpoint(checkpoint)["meta"]["calibration"]["scale"]
    qrs, _, _ = _direct(checkpoint, PreparedDataset(prepared_small), "test", scale, roi_override=left)
    assert np.allclose(res.rows["test"]["qrs"], qrs, atol=1e-6)


def test_area_aggregation_and_image_norm(prepared_small: Path, checkpoint: Path, tmp_path: Path) -> None:
    res = extract(prepared_small, checkpoint, modes=["test"], out_dir=tmp_path, device="cpu", progress=False,
                  options=ScoreOptions(norm="image", aggregation="area", threshold=0.5))
    rows = res.rows["test"]
    assert res.scale is None
    assert np.allclose(rows["qrs"], rows["area"]) and (rows["qrs"] > 0).all()
    assert (tmp_path / "over_0.5_weights_test.xlsx").is_file()


def test_parse_modes_accepts_the_paper_spellings() -> None:
    assert parse_modes(['["train", "test"]']) == ["train", "test"]
    assert parse_modes(["train", "test"]) == ["train", "test"]
    assert parse_modes(["train,val"]) == ["train", "val"]
    with pytest.raises(QrsError, match="--modes must name splits"):
        parse_modes(["training"])


def test_bad_inputs_stop_with_clear_messages(prepared_small: Path, ksdd2_raw: Path, checkpoint: Path,
                                             tmp_path: Path) -> None:
    other = tmp_path / "p48"
    prepare("ksdd2", ksdd2_raw, other, img_size=48, progress=False)
    with pytest.raises(QrsError, match="trained on 32x32 images but .* holds 48x48"):
        extract(other, checkpoint, out_dir=tmp_path, device="cpu", progress=False)
    no_val = tmp_path / "noval"
    prepare("ksdd2", ksdd2_raw, no_val, img_size=32, val_fraction=0.0, progress=False)
    with pytest.raises(QrsError, match="split 'val' of .* has no images"):
        extract(no_val, checkpoint, modes=["val"], out_dir=tmp_path, device="cpu", progress=False)
    (tmp_path / "empty.json").write_text("{}")
    with pytest.raises(QrsError, match="coordinates file .* is empty"):
        extract(prepared_small, checkpoint, coords_path=tmp_path / "empty.json", out_dir=tmp_path, device="cpu")
    for tau in (0.0, 1.5):
        with pytest.raises(QrsError, match=r"--threshold must be in \(0, 1\]"):
            ScoreOptions(threshold=tau)
    with pytest.raises(QrsError, match="--img_size 64 64 differs"):
        extract(prepared_small, checkpoint, img_size=(64, 64), out_dir=tmp_path, device="cpu")
    result = runner.invoke(app, ["extract", "--data_dir", str(prepared_small), "--model_path", str(checkpoint),
                                 "--threshold", "0", "--out-dir", str(tmp_path)])
    assert isinstance(result.exception, QrsError) and "--threshold must be in (0, 1]" in str(result.exception)
