"""``qrs score``: raw images resized and ROI-mapped like the prepared data, the one scoring path,
error rows for unreadable files, overlays, jsonl/csv output and the CLI's exit codes."""

from __future__ import annotations

import csv
import io
import json
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from qrs.cli import app, main
from qrs.data.regions import rasterize, to_prepared
from qrs.errors import QrsError
from qrs.extract import ScoreOptions, score_batch
from qrs.images import open_rgb, resize_image
from qrs.model import load_checkpoint
from qrs.data.regions import parse_roi
from qrs.predict import CSV_COLUMNS, OVERLAY_MAX_SIDE, Scorer, score_files, training_resize
from qrs.records import RecordSettings
from qrs.score import risk_level
from scoring_setup import EXPORT_SIDE, PART_SIZE, RISK_CUTS, SIDE, Exported, make_checkpoint, part_image, png

RESULT_KEYS = {"file", "verdict", "prediction", "p_defective", "qrs", "risk_level", "area", "mean_over", "max_over",
               "peak", "n_over", "norm"}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("model") / "calibrated.pt")


@pytest.fixture(scope="module")
def parts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """good_0/defect_1/... PNGs, a JPEG and a 16-bit grayscale PNG in a subfolder, and a non-image."""
    root = tmp_path_factory.mktemp("parts")
    for seed in range(4):
        (root / f"{'defect' if seed % 2 else 'good'}_{seed}.png").write_bytes(png(part_image(seed, seed % 2 == 1)))
    (root / "more").mkdir()
    Image.fromarray(part_image(7)).save(root / "more" / "jpeg_7.jpg", quality=90)
    gray16 = (part_image(8)[:, :, 0].astype(np.uint16) * 257)
    Image.fromarray(gray16).save(root / "more" / "gray16_8.png")
    (root / "notes.png").write_bytes(b"this is text, not a PNG")
    return root


def expected(model_path: Path, image: np.ndarray, roi: np.ndarray | None = None, mode: str = "stretch"
             ) -> dict[str, torch.Tensor]:
    """score_batch on the image resized by hand: what every scoring front end must reproduce."""
    model = load_checkpoint(model_path)
    cal = model.qrs_meta["calibration"]
    batch = torch.from_numpy(np.stack([resize_image(image, SIDE, mode)])).permute(0, 3, 1, 2)
    return score_batch(model, batch, None if roi is None else torch.from_numpy(roi[None]), scale=cal["scale"],
                       options=ScoreOptions(threshold=cal["threshold"]))


def test_rows_match_the_extract_path_and_errors_get_a_row(checkpoint: Path, parts: Path, tmp_path: Path) -> None:
    result = score_files([parts], checkpoint, out=tmp_path, batch_size=3, progress=False)
    names = [Path(r["file"]).name for r in result.rows]
    # Directories are searched recursively and sorted; the non-image gets an error row in its place.
    assert names == ["defect_1.png", "defect_3.png", "good_0.png", "good_2.png", "gray16_8.png", "jpeg_7.jpg",
                     "notes.png"]
    assert result.n_errors == 1 and result.output == tmp_path / "scores.jsonl"
    bad = next(r for r in result.rows if "error" in r)
    assert bad == {"file": str(parts / "notes.png"), "error": "not an image file (Pillow cannot identify it)"}
    written = [json.loads(line) for line in result.output.read_text().splitlines()]
    assert written == result.rows
    for row in result.rows:
        if "error" in row:
            continue
        assert set(row) == RESULT_KEYS
        want = expected(checkpoint, np.asarray(open_rgb(Path(row["file"]))))
        assert row["p_defective"] == pytest.approx(float(want["p_defective"][0]), abs=1e-5)
        assert row["qrs"] == pytest.approx(float(want["qrs"][0]), abs=1e-5)
        assert row["n_over"] == int(want["n_over"][0])
        assert row["prediction"] == int(row["p_defective"] > 0.5)
        assert row["verdict"] == ("fail" if row["prediction"] else "pass")
        assert row["risk_level"] == risk_level([row["qrs"]], (RISK_CUTS["low"], RISK_CUTS["high"]))[0]
        assert row["norm"] == "dataset"
    assert "1 unreadable" in result.headline() and "notes.png: not an image file" in result.headline()


def test_csv_has_fixed_columns(checkpoint: Path, parts: Path, tmp_path: Path) -> None:
    result = score_files([parts / "good_0.png", parts / "notes.png"], checkpoint, out=tmp_path, fmt="csv",
                         progress=False)
    rows = list(csv.DictReader(io.StringIO((tmp_path / "scores.csv").read_text())))
    assert tuple(rows[0]) == CSV_COLUMNS
    assert rows[0]["verdict"] == result.rows[0]["verdict"] and float(rows[0]["qrs"]) == result.rows[0]["qrs"]
    assert rows[0]["error"] == "" and rows[1]["error"].startswith("not an image file") and rows[1]["qrs"] == ""


def test_roi_file_boxes_by_stem_and_auto(checkpoint: Path, parts: Path, tmp_path: Path) -> None:
    box = [0.25, 0.5, 1.0, 1.0]
    roi_file = tmp_path / "roi.json"
    roi_file.write_text(json.dumps({"defect_1": [box], "good_0.png": box}))
    result = score_files([parts / "defect_1.png", parts / "good_0.png", parts / "defect_3.png"], checkpoint,
                         out=tmp_path, roi=str(roi_file), progress=False)
    full = score_files([parts / "defect_3.png"], checkpoint, out=tmp_path / "full", progress=False)
    w, h = PART_SIZE
    mask = rasterize([to_prepared(box, (w, h), "stretch", SIDE)], SIDE, SIDE)
    for row in result.rows[:2]:
        want = expected(checkpoint, np.asarray(open_rgb(Path(row["file"]))), mask)
        assert row["qrs"] == pytest.approx(float(want["qrs"][0]), abs=1e-6)
        assert row["area"] == pytest.approx(float(want["area"][0]), abs=1e-6)
    # An image without an entry is inspected whole, as in `qrs prepare`.
    assert result.rows[2]["qrs"] == pytest.approx(full.rows[0]["qrs"], abs=1e-6)
    auto = score_files([parts / "defect_1.png"], checkpoint, out=tmp_path / "auto", roi="auto", progress=False)
    assert auto.rows[0]["p_defective"] == pytest.approx(result.rows[0]["p_defective"], abs=1e-6)


def test_pad_resize_letterboxes_image_and_roi(checkpoint: Path) -> None:
    scorer = Scorer(load_checkpoint(checkpoint), resize="pad")
    rgb = part_image(1)
    item = scorer.prepare("p.png", rgb, [[0.0, 0.0, 0.5, 1.0]])
    assert np.array_equal(item.image, resize_image(rgb, SIDE, "pad"))
    # A 48x96 part padded into 32x32 is 16 px wide and centred: columns 8..23; its left half is 8..15.
    cols = np.flatnonzero(item.roi.any(axis=0))
    assert cols.tolist() == list(range(8, 16))
    assert item.roi.any(axis=1).all()


def test_training_resize_from_the_training_data(tmp_path: Path) -> None:
    (tmp_path / "meta.json").write_text(json.dumps({"dataset_hash": "abc", "resize": "pad"}))
    meta = {"dataset_hash": "abc", "train_config": {"data_root": str(tmp_path)}}
    assert training_resize(meta) == "pad"
    assert training_resize({**meta, "dataset_hash": "other"}) == "stretch"
    assert training_resize({"dataset_hash": "abc", "train_config": {"data_root": str(tmp_path / "gone")}}) == "stretch"
    assert training_resize({}) == "stretch"


def test_uncalibrated_checkpoint_uses_image_norm_and_no_levels(parts: Path, tmp_path: Path) -> None:
    raw = make_checkpoint(tmp_path / "raw.pt", calibrated=False)
    result = score_files([parts / "defect_1.png"], raw, out=tmp_path, progress=False)
    row = result.rows[0]
    assert row["norm"] == "image" and "risk_level" not in row
    assert "not calibrated" in result.note
    model = load_checkpoint(raw)
    batch = torch.from_numpy(np.stack([resize_image(part_image(1, True), SIDE, "stretch")])).permute(0, 3, 1, 2)
    want = score_batch(model, batch, None, scale=None, options=ScoreOptions(norm="image"))
    assert row["qrs"] == pytest.approx(float(want["qrs"][0]), abs=1e-6)


def test_checkpoint_without_risk_cuts_omits_the_level(parts: Path, tmp_path: Path) -> None:
    ckpt = make_checkpoint(tmp_path / "nocuts.pt", risk_cuts=None)
    result = score_files([parts / "defect_1.png"], ckpt, out=tmp_path, progress=False)
    assert "risk_level" not in result.rows[0] and result.rows[0]["norm"] == "dataset"
    assert "no risk levels" in result.note


def test_checkpoint_calibrated_by_the_first_version_still_scores(parts: Path, tmp_path: Path) -> None:
    ckpt = make_checkpoint(tmp_path / "v1.pt")
    payload = torch.load(ckpt, weights_only=True)
    cal = payload["meta"]["calibration"]
    payload["meta"]["calibration"] = {k: cal[k] for k in ("scale", "method", "threshold", "norm", "aggregation",
                                                          "risk_cuts", "risk_note")} | {"n_defective_train": 4}
    torch.save(payload, ckpt)
    scorer = Scorer.load(ckpt, device="cpu")
    assert scorer.info()["calibration"] == {"anchor": "defective", "quantile": 0.5, "split": "train", "n_parts": 4}
    row = score_files([parts / "defect_1.png"], ckpt, out=tmp_path, progress=False).rows[0]
    batch = torch.from_numpy(np.stack([resize_image(part_image(1, True), SIDE, "stretch")])).permute(0, 3, 1, 2)
    want = score_batch(scorer.backend.model, batch, None, scale=cal["scale"], options=ScoreOptions())
    assert row["norm"] == "dataset" and row["qrs"] == pytest.approx(float(want["qrs"][0]), abs=1e-6)
    assert row["risk_level"] == risk_level(want["qrs"], (RISK_CUTS["low"], RISK_CUTS["high"]))[0]


def test_overlay_png_over_the_original_aspect(checkpoint: Path, parts: Path, tmp_path: Path) -> None:
    roi_file = tmp_path / "roi.json"
    roi_file.write_text(json.dumps([[0.1, 0.1, 0.9, 0.9]]))
    result = score_files([parts / "defect_1.png", parts / "defect_3.png"], checkpoint, out=tmp_path,
                         roi=str(roi_file), overlay=True, progress=False)
    for row in result.rows:
        path = Path(row["overlay"])
        assert path.parent == tmp_path / "overlays" and path.stem == Path(row["file"]).stem
        with Image.open(path) as img:
            overlay = np.asarray(img.convert("RGB"))
        assert overlay.shape == (PART_SIZE[1], PART_SIZE[0], 3)  # small images keep their size
        original = np.asarray(open_rgb(Path(row["file"])))
        assert not np.array_equal(overlay, original)
        # The ROI outline runs along the box's top edge, row 10 (0.1 * 96) over columns 5..43: cyan, or white
        # where the region over the threshold touches it; nothing is drawn above it.
        edge = overlay[10, 8:40]
        assert ((edge == [0, 255, 255]).all(axis=1) | (edge == 255).all(axis=1)).all()
        assert not (overlay[:10] == [0, 255, 255]).all(axis=2).any()
    # With per-image min-max maps only the peak is over tau, so most of the ROI outline is cyan.
    scorer = Scorer(load_checkpoint(make_checkpoint(tmp_path / "raw.pt", calibrated=False)))
    [scored] = scorer.score([scorer.prepare("p.png", part_image(1), [[0.1, 0.1, 0.9, 0.9]], overlay=True)])
    with Image.open(io.BytesIO(scored.overlay_png)) as img:
        edge = np.asarray(img.convert("RGB"))[10, 8:40]
    assert (edge == [0, 255, 255]).all(axis=1).mean() > 0.5
    big = np.repeat(np.repeat(part_image(1), 8, axis=0), 8, axis=1)  # 384 x 768
    scorer = Scorer(load_checkpoint(checkpoint))
    [scored] = scorer.score([scorer.prepare("big.png", big, overlay=True)])
    with Image.open(io.BytesIO(scored.overlay_png)) as img:
        assert img.size == (OVERLAY_MAX_SIDE // 2, OVERLAY_MAX_SIDE)


def test_duplicate_stems_get_distinct_overlays(checkpoint: Path, parts: Path, tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "good_0.png").write_bytes((parts / "good_0.png").read_bytes())
    result = score_files([parts / "good_0.png", tmp_path / "a"], checkpoint, out=tmp_path / "o", overlay=True,
                         progress=False)
    assert [Path(r["overlay"]).name for r in result.rows] == ["good_0.png", "good_0_2.png"]


@pytest.mark.parametrize(("value", "message"), [
    ([], "non-empty list"),
    ([[0.5, 0.5, 0.2, 0.9]], "x0 >= x1"),
    ([[[0, 0], [1, 1]]], "polygon"),
    ({}, "empty object"),
    ({"a.png": "box"}, "a.png"),
    ("everything", "non-empty list"),
])
def test_parse_roi_rejects_bad_regions(value: object, message: str) -> None:
    with pytest.raises(QrsError, match=message):
        parse_roi(value)


def test_parse_roi_accepts_a_single_box_and_polygons() -> None:
    assert parse_roi([0, 0, 1, 1]) == [[0.0, 0.0, 1.0, 1.0]]
    assert parse_roi({"x": [[[0, 0], [1, 0], [0, 1]]]}) == {"x": [[[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]]]}
    assert parse_roi("auto") == "auto"


def test_cli_exit_codes(checkpoint: Path, parts: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                        capsys: pytest.CaptureFixture[str]) -> None:
    runner = CliRunner()
    good = runner.invoke(app, ["score", "--model", str(checkpoint), str(parts / "good_0.png"), "--out",
                               str(tmp_path / "ok"), "--format", "csv"])
    assert good.exit_code == 0, good.output
    assert "scored 1 of 1 images" in good.output and (tmp_path / "ok" / "scores.csv").is_file()
    bad = runner.invoke(app, ["score", "--model", str(checkpoint), str(parts / "good_0.png"),
                              str(parts / "notes.png"), str(parts / "missing.png"), "--out", str(tmp_path / "bad")])
    assert bad.exit_code == 1
    rows = [json.loads(line) for line in (tmp_path / "bad" / "scores.jsonl").read_text().splitlines()]
    assert "verdict" in rows[0] and rows[2]["error"].startswith("no such file")
    monkeypatch.setattr(sys, "argv", ["qrs", "score", "--model", str(checkpoint), str(parts), "--format", "xml"])
    with pytest.raises(SystemExit) as exc:
        main()
    assert exc.value.code == 2 and "Invalid value for '--format'" in capsys.readouterr().err
    with pytest.raises(QrsError, match="unknown --format 'xml'; expected one of jsonl, csv"):
        score_files([parts / "good_0.png"], checkpoint, fmt="xml", out=tmp_path / "xml")


def test_cli_serve_passes_options_and_reads_the_key_from_env(checkpoint: Path, monkeypatch: pytest.MonkeyPatch
                                                             ) -> None:
    calls: list[dict] = []
    monkeypatch.setattr("qrs.serve.run", lambda model, **kw: calls.append({"model": model, **kw}))
    result = CliRunner().invoke(app, ["serve", "--model", str(checkpoint), "--max-batch", "4"],
                                env={"QRS_API_KEY": "s3cret"})
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(app, ["serve", "--model", "model.onnx", "--backend", "onnx", "--db", "none"])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(app, ["serve", "--model", "m.pt", "--db", "postgresql+psycopg://qc@db/line",
                                      "--station", "press 4", "--keep-images", "all", "--keep-days", "7",
                                      "--images-dir", "kept"])
    assert result.exit_code == 0, result.output
    common = {"host": "127.0.0.1", "port": 8000, "max_upload_mb": 20, "max_wait_ms": 5, "device": "auto",
              "resize": None}
    assert calls == [
        {"model": checkpoint, **common, "api_key": "s3cret", "max_batch": 4, "backend": "torch",
         "records": RecordSettings("sqlite:///qrs-records.sqlite", station=socket.gethostname())},
        {"model": Path("model.onnx"), **common, "api_key": None, "max_batch": 16, "backend": "onnx", "records": None},
        {"model": Path("m.pt"), **common, "api_key": None, "max_batch": 16, "backend": "torch",
         "records": RecordSettings("postgresql+psycopg://qc@db/line", images_dir=Path("kept"), keep_images="all",
                                   keep_days=7, station="press 4")},
    ]


def test_the_onnx_backend_gives_the_rows_of_the_torch_backend(exported: Exported, parts: Path, tmp_path: Path) -> None:
    """Same files, ROI (boxes and polygons, some images inspected whole) and overlays: the same rows."""
    roi_file = tmp_path / "roi.json"
    roi_file.write_text(json.dumps({"defect_1.png": [[0.2, 0.1, 0.8, 0.6]],
                                    "good_0": [[[0.1, 0.1], [0.9, 0.2], [0.5, 0.9]]]}))
    results = {backend: score_files([parts], model, out=tmp_path / backend, roi=str(roi_file), overlay=True,
                                    batch_size=3, backend=backend, progress=False)
               for backend, model in (("torch", exported.checkpoint), ("onnx", exported.onnx))}
    torch_rows, onnx_rows = results["torch"].rows, results["onnx"].rows
    assert len(onnx_rows) == 7 and results["onnx"].n_errors == 1 and results["onnx"].note == ""
    assert {r["n_over"] for r in torch_rows if "n_over" in r} != {EXPORT_SIDE ** 2}, "the ROI must matter"
    for want, got in zip(torch_rows, onnx_rows):
        assert set(got) == set(want)
        for key, value in want.items():
            if isinstance(value, float):
                assert got[key] == pytest.approx(value, abs=1e-5), key
            elif key == "overlay":
                assert got[key] == value.replace(str(tmp_path / "torch"), str(tmp_path / "onnx"))
                assert Image.open(got[key]).size == Image.open(value).size
            else:
                assert got[key] == value, key


def test_cli_scores_with_the_onnx_backend_and_refuses_a_checkpoint(exported: Exported, parts: Path, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    result = CliRunner().invoke(app, ["score", "--model", str(exported.onnx), "--backend", "onnx",
                                      str(parts / "good_0.png"), "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert result.output.strip().endswith(f"scored 1 of 1 images: 0 fail, 1 pass, 0 unreadable -> "
                                          f"{tmp_path / 'scores.jsonl'}")
    assert json.loads((tmp_path / "scores.jsonl").read_text())["file"] == str(parts / "good_0.png")
    monkeypatch.setattr(sys, "argv", ["qrs", "score", "--model", str(exported.checkpoint), "--backend", "onnx",
                                      str(parts / "good_0.png"), "--out", str(tmp_path)])
    with pytest.raises(SystemExit) as exc:
        main()
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and err.startswith(
        f"error: {exported.checkpoint} is not a readable ONNX model (corrupted, truncated, or a checkpoint, which "
        "--backend torch reads): ")

