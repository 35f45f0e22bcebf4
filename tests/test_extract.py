"""Calibration and extraction: files, values checked against a direct computation, bad inputs."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from qrs.cam import compute_cams
from qrs.cli import _expand_multi_value_options, app
from qrs.data.dataset import PreparedDataset
from qrs.data.preparation import prepare
from qrs.errors import QrsError
from qrs.extract import (ROW_COLUMNS, ScoreOptions, calibrate, calibration_source, extract, pack_roi, parse_modes,
                         unpack_roi)
from qrs.model import (base_meta, build_model, load_checkpoint, normalize, read_checkpoint, save_checkpoint,
                       update_checkpoint_meta)
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


def _peaks(model_path: Path, data: PreparedDataset, split: str, label: int) -> list[float]:
    """Raw-map peaks at input size of one class of a split, image by image."""
    model = load_checkpoint(model_path)
    ds = data.split(split)
    return [float(compute_cams(model, normalize(ds[i]["image"][None], model.qrs_meta)).maps.max())
            for i in range(len(ds)) if ds[i]["label"] == label]


def _p_defective(model_path: Path, data: PreparedDataset, split: str, label: int) -> list[float]:
    """p_defective of one class of a split, image by image."""
    model = load_checkpoint(model_path)
    ds = data.split(split)
    with torch.no_grad():
        return [float(torch.softmax(model(normalize(ds[i]["image"][None], model.qrs_meta)), dim=1)[0, 1])
                for i in range(len(ds)) if ds[i]["label"] == label]


def test_calibrate_defective_anchor_stores_the_median_peak_of_defective_training_images(
        prepared_small: Path, checkpoint: Path) -> None:
    cal = calibrate(checkpoint, prepared_small, anchor="defective", progress=False, device="cpu")
    peaks = _peaks(checkpoint, PreparedDataset(prepared_small), "train", 1)
    assert cal["scale"] == pytest.approx(float(np.median(peaks)), rel=1e-5)
    assert (cal["anchor"], cal["quantile"], cal["split"], cal["n_parts"]) == ("defective", 0.5, "train", len(peaks))
    assert read_checkpoint(checkpoint)["meta"]["calibration"] == cal
    assert cal["risk_cuts"] is None and "too few defective validation parts" in cal["risk_note"]
    assert "p_defective_cut" not in cal


def test_calibrate_good_anchor_on_good_validation_parts(ksdd2_raw: Path, checkpoint: Path, tmp_path: Path) -> None:
    data_root = tmp_path / "wide_val"
    prepare("ksdd2", ksdd2_raw, data_root, img_size=32, val_fraction=0.75, progress=False)
    data = PreparedDataset(data_root)
    peaks = _peaks(checkpoint, data, "val", 0)
    assert len(peaks) >= 20
    cal = calibrate(checkpoint, data_root, progress=False, device="cpu")
    assert cal["scale"] == pytest.approx(float(np.quantile(peaks, 0.99)) / 0.9, rel=1e-5)
    assert (cal["anchor"], cal["quantile"], cal["split"], cal["n_parts"], cal["note"]) == \
        ("good", 0.99, "val", len(peaks), "")
    p_good = _p_defective(checkpoint, data, "val", 0)
    assert cal["p_defective_cut"] == pytest.approx(float(np.quantile(p_good, 0.99)), rel=1e-5)
    assert calibration_source(cal)["p_defective_cut"] == cal["p_defective_cut"]
    cal = calibrate(checkpoint, data_root, quantile=0.5, options=ScoreOptions(threshold=0.8), progress=False,
                    device="cpu")
    assert cal["scale"] == pytest.approx(float(np.median(peaks)) / 0.8, rel=1e-5)


def test_calibrate_good_anchor_falls_back_to_good_training_parts(prepared_small: Path, checkpoint: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    data = PreparedDataset(prepared_small)
    n_val_good = int(((data.index["split"] == "val") & (data.index["label"] == 0)).sum())
    assert 0 < n_val_good < 20
    cal = calibrate(checkpoint, prepared_small, progress=False, device="cpu")
    peaks = _peaks(checkpoint, data, "train", 0)
    assert cal["scale"] == pytest.approx(float(np.quantile(peaks, 0.99)) / 0.9, rel=1e-5)
    assert (cal["split"], cal["n_parts"]) == ("train", len(peaks))
    expected = (f"only {n_val_good} good validation parts (fewer than 20): the scale is taken from the "
                f"{len(peaks)} good training parts instead")
    assert cal["note"].startswith(expected) and f"note: {expected}" in capsys.readouterr().out


def test_calibrate_cli_says_where_the_scale_came_from(prepared_small: Path, checkpoint: Path) -> None:
    result = runner.invoke(app, ["calibrate", "--model", str(checkpoint), "--data-root", str(prepared_small),
                                 "--anchor", "defective", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    cal = read_checkpoint(checkpoint)["meta"]["calibration"]
    assert (f"scale {cal['scale']:.6g} = 0.5 quantile of the map peaks of {cal['n_parts']} defective training parts "
            "(anchor defective)") in result.output


def test_calibrate_errors(ksdd2_raw: Path, checkpoint: Path, tmp_path: Path) -> None:
    root = tmp_path / "raw"
    rows = ["source,split"]
    for kind, split in (("good", "test"), ("defect", "train")):
        (root / kind).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((40, 40, 3), 60 + 40 * i, np.uint8)).save(root / kind / f"{i}.png")
            rows.append(f"{kind}/{i}.png,{split}")
    (root / "split.csv").write_text("\n".join(rows) + "\n")
    prepare("folder", root, tmp_path / "all_bad", img_size=32, split_file=root / "split.csv", progress=False)
    with pytest.raises(QrsError, match="has no good parts in its validation and training splits: cannot calibrate "
                                       r"with --anchor good \(use --anchor defective\)"):
        calibrate(checkpoint, tmp_path / "all_bad", progress=False, device="cpu")
    with pytest.raises(QrsError, match=r"--quantile must be in \(0, 1\], got 1.5"):
        calibrate(checkpoint, tmp_path / "all_bad", quantile=1.5, progress=False, device="cpu")
    with pytest.raises(QrsError, match="unknown --anchor 'best'"):
        calibrate(checkpoint, tmp_path / "all_bad", anchor="best", progress=False, device="cpu")
    torch.manual_seed(0)
    dead = build_model("resnet18")
    torch.nn.init.zeros_(dead.fc.weight)
    dead_path = tmp_path / "dead.pt"
    save_checkpoint(dead_path, dead, base_meta("resnet18", 32))
    with pytest.raises(QrsError, match="cannot calibrate .* on the train split .*: the class activation maps of all "
                                       r"\d+ defective parts are zero everywhere \(is the model trained\?\)"):
        calibrate(dead_path, tmp_path / "all_bad", anchor="defective", progress=False, device="cpu")


def test_checkpoint_calibrated_by_the_first_version_reads_as_defective_median(prepared_small: Path,
                                                                              checkpoint: Path) -> None:
    old = {"scale": 2.5, "method": "gradcam++", "threshold": 0.9, "norm": "dataset", "aggregation": "mass",
           "n_defective_train": 7, "risk_cuts": None, "risk_note": "no validation split: no risk levels"}
    update_checkpoint_meta(checkpoint, calibration=old)
    assert calibration_source(old) == {"anchor": "defective", "quantile": 0.5, "split": "train", "n_parts": 7}
    res = extract(prepared_small, checkpoint, modes=["test"], out_dir=Path(prepared_small).parent / "old_cal",
                  device="cpu", progress=False)
    assert res.scale == 2.5 and read_checkpoint(checkpoint)["meta"]["calibration"] == old


def test_paper_extract_command_line_and_file_contents(prepared_small: Path, checkpoint: Path,
                                                      tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = ["extract", "--data_dir", str(prepared_small), "--model_path", str(checkpoint),
            "--output_prefix", "gradcam_weights", "--excel_prefix", "over_0.9_weights", "--modes", '["train", "test"]',
            "--batch_size", "7", "--num_workers", "0", "--threshold", "0.9", "--img_size", "32", "32",
            "--out-dir", str(out), "--device", "cpu"]
    result = runner.invoke(app, _expand_multi_value_options(args))  # what `qrs` (main) does with argv
    assert result.exit_code == 0, result.output
    assert "has no calibration: calibrating it for gradcam++ at threshold 0.9 first (anchor good)" in result.output
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
    split = PreparedDataset(prepared_small).split("test", coords=left)
    with np.load(tmp_path / "o" / "gradcam_weights_test.npz") as npz:
        bits = npz["roi_bits"]
    assert bits.shape == (len(split), 32 * 32 // 8) and bits.dtype == np.uint8
    stored = unpack_roi(bits, (32, 32))
    assert torch.equal(stored, torch.stack([split[i]["roi"] for i in range(len(split))]))
    assert stored[:, :, :16].all() and not stored[:, :, 16:].any()
    assert torch.equal(pack_roi(stored), torch.from_numpy(bits))


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
    with pytest.raises(QrsError, match=r"trained on 32x32 images \(height x width\) but .* holds 48x48 images; "
                                       "prepare the data with --img-size 32 32"):
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
