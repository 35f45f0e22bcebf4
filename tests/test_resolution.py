"""Non-square images and finer maps end to end: a 160 x 64 (height x width) dataset at output stride
16 through prepare, guided training, evaluate, calibrate, extract, analyze, score, the service and
the ONNX export; a checkpoint of the square-only version scores as it did; bad sizes and strides
are refused before anything is written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from typer.testing import CliRunner

from qrs.cli import _expand_multi_value_options, app, main
from qrs.data.dataset import PreparedDataset
from qrs.data.preparation import prepare
from qrs.errors import QrsError
from qrs.model import read_checkpoint, save_checkpoint
from qrs.predict import score_files
from qrs.serve import create_app
from qrs.train import TrainConfig, train
from scoring_setup import make_checkpoint, part_image, png

runner = CliRunner()
HEIGHT, WIDTH, STRIDE = 160, 64, 16


def invoke(*args: str) -> str:
    result = runner.invoke(app, _expand_multi_value_options(list(args)))
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def run(ksdd2_raw: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The whole pipeline through the command line at 160 x 64, stride 16."""
    root = tmp_path_factory.mktemp("resolution")
    data, runs = root / "data", root / "runs"
    invoke("prepare", "--src", str(ksdd2_raw), "--out", str(data), "--img-size", str(HEIGHT), str(WIDTH))
    output = invoke("train", "--data_root", str(data), "--arch", "resnet18", "--output-stride", str(STRIDE),
                    "--num_epochs", "1", "--batch_size", "8", "--learning_rate", "1e-3", "--device", "cpu",
                    "--out", str(runs))
    assert "mask guidance: energy loss" in output
    invoke("evaluate", "--data_root", str(data), "--model", str(runs / "best_loss.pt"), "--out",
           str(runs / "metrics.json"), "--n-resamples", "0")
    invoke("calibrate", "--model", str(runs / "best_loss.pt"), "--data_root", str(data), "--device", "cpu")
    invoke("extract", "--data_dir", str(data), "--model_path", str(runs / "best_loss.pt"), "--modes", "train", "test",
           "--img_size", str(HEIGHT), str(WIDTH), "--out-dir", str(root / "extract"), "--device", "cpu")
    invoke("analyze", "--extract-dir", str(root / "extract"), "--metrics", str(runs / "metrics.json"),
           "--n-resamples", "0")
    return root


def test_prepared_images_masks_and_checkpoint_have_the_size_and_stride(run: Path, ksdd2_raw: Path) -> None:
    data = PreparedDataset(run / "data")
    assert data.img_size == (HEIGHT, WIDTH) and data.meta["img_size"] == [HEIGHT, WIDTH]
    rows = data.index
    with Image.open(run / "data" / rows["image"].iat[0]) as img:
        assert img.size == (WIDTH, HEIGHT)
    with Image.open(run / "data" / rows.loc[rows["mask"] != "", "mask"].iat[0]) as mask:
        assert mask.size == (WIDTH, HEIGHT)
    assert data.image_cache("train", progress=False).shape[1:] == (HEIGHT, WIDTH, 3)
    meta = read_checkpoint(run / "runs" / "best_loss.pt")["meta"]
    assert meta["img_size"] == [HEIGHT, WIDTH] and meta["output_stride"] == STRIDE
    assert meta["mask_guidance"]["n_masked"] > 0 and "calibration" in meta
    assert json.loads((run / "runs" / "metrics.json").read_text())["best_loss.pt"]["split"] == "test"


def test_extract_keeps_the_fine_maps_and_the_report_is_written(run: Path) -> None:
    npz = np.load(run / "extract" / "gradcam_weights_test.npz")
    n = len(npz["ids"])
    assert npz["raw_maps"].shape == (n, HEIGHT // STRIDE, WIDTH // STRIDE)
    assert npz["roi_bits"].shape == (n, HEIGHT * WIDTH // 8)
    options = json.loads(str(npz["options"]))
    assert options["img_size"] == [HEIGHT, WIDTH] and options["output_stride"] == STRIDE
    stats = json.loads((run / "extract" / "analysis" / "stats.json").read_text())
    assert stats["modes"]["test"]["qrs"]["n_defective"] + stats["modes"]["test"]["qrs"]["n_good"] == n
    assert (run / "extract" / "analysis" / "report.html").is_file()


def test_score_service_and_onnx_give_the_same_rows(run: Path, ksdd2_raw: Path, tmp_path: Path) -> None:
    checkpoint = run / "runs" / "best_loss.pt"
    images = sorted((ksdd2_raw / "test").glob("*[0-9].png"))[:6]
    torch_rows = score_files(images, checkpoint, out=tmp_path / "torch", overlay=True, progress=False).rows
    with Image.open(torch_rows[0]["overlay"]) as overlay, Image.open(images[0]) as raw:
        assert overlay.size == raw.size  # drawn over the original part, 115 x 315
    invoke("export", "--model", str(checkpoint), "--out", str(tmp_path / "model.onnx"))
    import onnx

    graph = onnx.load(str(tmp_path / "model.onnx"))
    dims = [d.dim_param or d.dim_value for d in graph.graph.input[0].type.tensor_type.shape.dim]
    assert dims[1:] == [HEIGHT, WIDTH, 3]
    onnx_rows = score_files(images, tmp_path / "model.onnx", backend="onnx", out=tmp_path / "onnx", progress=False).rows
    with TestClient(create_app(checkpoint)) as client:
        info = client.get("/v1/model").json()
        assert info["img_size"] == [HEIGHT, WIDTH] and info["output_stride"] == STRIDE
        served = client.post("/v1/score", files=[("files", (p.name, p.read_bytes(), "image/png"))
                                                 for p in images]).json()["results"]
    for want, got_onnx, got_served in zip(torch_rows, onnx_rows, served):
        assert Path(want["file"]).name == Path(got_onnx["file"]).name == got_served["file"]
        for got in (got_onnx, got_served):
            assert got["verdict"] == want["verdict"]
            assert got["p_defective"] == pytest.approx(want["p_defective"], abs=1e-5)
            assert got["qrs"] == pytest.approx(want["qrs"], abs=1e-4)
            assert got["peak"] == pytest.approx(want["peak"], abs=1e-4)


def test_resume_continues_at_the_size_and_stride(run: Path, tmp_path: Path) -> None:
    config = TrainConfig(data_root=run / "data", out=tmp_path / "r", arch="resnet18", output_stride=8, num_epochs=2,
                         batch_size=8, learning_rate=1e-3, device="cpu", progress=False, mask_loss="none")

    def crash(epoch: int, batch: int) -> None:
        if epoch == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(config, on_batch=crash)
    resumed = train(TrainConfig(**{**config.__dict__, "resume": True}))
    meta = read_checkpoint(resumed.last_path)["meta"]
    assert meta["epoch"] == 2 and meta["output_stride"] == 8 and meta["img_size"] == [HEIGHT, WIDTH]


# Rows that qrs before non-square sizes and output strides gave for these parts with this checkpoint
# (scoring_setup.make_checkpoint, its metadata with one side and no stride).
SQUARE_ONLY_ROWS = [
    ("pass", 0.47665470838546753, 0.9005976915359497, 0.625971794128418, "high"),
    ("pass", 0.46362239122390747, 0.0, 0.6159690618515015, "low"),
    ("pass", 0.47953295707702637, 0.0, 0.5672949552536011, "low"),
    ("pass", 0.47646254301071167, 0.913449227809906, 0.6349040865898132, "high"),
]


def test_a_checkpoint_of_the_square_only_version_scores_unchanged(tmp_path: Path) -> None:
    path = make_checkpoint(tmp_path / "old.pt")
    payload = read_checkpoint(path)
    meta = payload["meta"]
    meta["img_size"] = 32
    del meta["output_stride"]
    torch.save(payload, path)
    files = []
    for seed in range(4):
        files.append(tmp_path / f"part_{seed}.png")
        files[-1].write_bytes(png(part_image(seed, seed % 2 == 1)))
    rows = score_files(files, path, out=tmp_path / "scores", progress=False).rows
    for row, (verdict, p, qrs, peak, risk) in zip(rows, SQUARE_ONLY_ROWS):
        assert (row["verdict"], row["risk_level"]) == (verdict, risk)
        assert (row["p_defective"], row["qrs"], row["peak"]) == pytest.approx((p, qrs, peak), abs=1e-6)


@pytest.mark.parametrize(("size", "message"), [
    (["0"], "--img-size 0 0: height and width must be between 16 and 8192 px"),
    (["-5", "64"], "--img-size -5 64: height and width must be between 16 and 8192 px"),
    (["64", "100000"], "--img-size 64 100000: height and width must be between 16 and 8192 px"),
    (["64", "64", "64"], "--img-size: an image size is one side or a (height, width) pair, got [64, 64, 64]"),
])
def test_bad_sizes_are_refused_and_nothing_is_written(ksdd2_raw: Path, tmp_path: Path, size: list[str],
                                                      message: str, capsys: pytest.CaptureFixture[str],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "p"
    monkeypatch.setattr("sys.argv", ["qrs", "prepare", "--src", str(ksdd2_raw), "--out", str(out), "--img-size", *size])
    with pytest.raises(SystemExit) as exc:
        main()
    assert exc.value.code == 2
    assert capsys.readouterr().err.strip() == f"error: {message}"
    assert list(tmp_path.iterdir()) == []


def test_a_stride_no_arch_takes_is_refused_before_anything_is_written(ksdd2_raw: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    prepare("ksdd2", ksdd2_raw, data, img_size=(48, 32), progress=False)
    result = runner.invoke(app, ["train", "--data_root", str(data), "--arch", "resnet18", "--output-stride", "4",
                                 "--out", str(tmp_path / "runs")])
    assert isinstance(result.exception, QrsError)
    assert str(result.exception) == "--output-stride must be one of 32, 16, 8, got 4"
    assert not (tmp_path / "runs").exists()


def test_pad_fits_a_tall_part_inside_a_wide_canvas(ksdd2_raw: Path, tmp_path: Path) -> None:
    data = PreparedDataset(prepare("ksdd2", ksdd2_raw, tmp_path / "pad", img_size=(32, 96), resize="pad",
                                   progress=False).root)
    image = np.asarray(Image.open(data.root / data.index["image"].iat[0]))
    assert image.shape == (32, 96, 3)
    # 115 x 315 scaled by min(96 / 115, 32 / 315) = 32 / 315 -> 12 x 32, centred: columns 42..53 hold the part.
    assert image[:, :41].max() == 0 and image[:, 55:].max() == 0 and image[:, 43:53].max() > 0
