"""``qrs export``: ONNX Runtime reproduces ``qrs extract`` (every arch), dynamic and fixed batches, the
metadata a client needs, and clear errors for what cannot be exported."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from PIL import Image
from torchvision.models.resnet import BasicBlock, ResNet
from typer.testing import CliRunner

from qrs import __version__
from qrs.cli import app
from qrs.data.dataset import PreparedDataset
from qrs.data.preparation import prepare
from qrs.errors import QrsError
from qrs.export import export_onnx, parse_batch
from qrs.extract import ScoreOptions, calibrate, extract, score_batch
from qrs.model import IMAGENET_MEAN, IMAGENET_STD, base_meta, build_model, load_checkpoint, read_checkpoint, save_checkpoint
from qrs.predict import score_files
from qrs.scoring import UNCALIBRATED_NOTE
from qrs.runtime import OUTPUTS, OnnxBackend
from scoring_setup import EXPORT_SIDE, RISK_CUTS, Exported, part_image, png

PARITY_SIDE = 64


@pytest.fixture(scope="module")
def prepared64(ksdd2_raw: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("prepared") / "p64"
    prepare("ksdd2", ksdd2_raw, out, img_size=PARITY_SIDE, progress=False)
    return out


class Case(NamedTuple):
    arch: str
    checkpoint: Path
    onnx: Path
    extracted: dict[str, np.ndarray]
    images: np.ndarray
    """The test split's prepared images, uint8 B x S x S x 3, in the extract's row order."""


@pytest.fixture(scope="module", params=["resnet18", "efficientnet_lite0"])
def case(request: pytest.FixtureRequest, prepared64: Path, tmp_path_factory: pytest.TempPathFactory) -> Case:
    """A random model of each arch, calibrated and extracted on the test split like a trained one, then exported.

    The scale is the median good peak (quantile 0.5), so that many parts have QRS > 0 to compare.
    """
    arch = request.param
    root = tmp_path_factory.mktemp(arch)
    torch.manual_seed(0)
    checkpoint = root / "model.pt"
    save_checkpoint(checkpoint, build_model(arch).eval(), base_meta(arch, PARITY_SIDE))
    calibrate(checkpoint, prepared64, quantile=0.5, device="cpu", progress=False)
    extract(prepared64, checkpoint, modes=["test"], out_dir=root, device="cpu", progress=False)
    with np.load(root / "gradcam_weights_test.npz") as npz:
        extracted = {k: npz[k] for k in ("ids", "p_defective", "raw_maps", "qrs")}
    rows = PreparedDataset(prepared64).rows("test")
    assert rows["id"].astype(str).tolist() == extracted["ids"].tolist()
    images = np.stack([np.asarray(Image.open(prepared64 / path)) for path in rows["image"]])
    export_onnx(checkpoint, root / "model.onnx")
    return Case(arch, checkpoint, root / "model.onnx", extracted, images)


def plain_session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_onnx_runtime_reproduces_qrs_extract(case: Case) -> None:
    out = dict(zip(OUTPUTS, plain_session(case.onnx).run(None, {"images": case.images})))
    want = case.extracted
    assert (want["qrs"] > 0).sum() >= 5, "the comparison needs parts with QRS above 0"
    np.testing.assert_allclose(out["p_defective"], want["p_defective"], rtol=0, atol=1e-5)
    peak = want["raw_maps"].max(axis=(1, 2), keepdims=True)
    assert out["raw_map"].shape == want["raw_maps"].shape
    assert (np.abs(out["raw_map"] - want["raw_maps"]) / np.maximum(peak, 1e-12)).max() <= 1e-4
    np.testing.assert_allclose(out["qrs"], want["qrs"], rtol=0, atol=1e-4)


def test_the_graph_holds_the_scoring_path_outputs(case: Case) -> None:
    """logits, the full-size map and M are score_batch's, computed here by PyTorch on the same images."""
    model = load_checkpoint(case.checkpoint)
    cal = model.qrs_meta["calibration"]
    want = score_batch(model, torch.from_numpy(case.images).permute(0, 3, 1, 2), None, scale=cal["scale"],
                       options=ScoreOptions())
    out = dict(zip(OUTPUTS, plain_session(case.onnx).run(None, {"images": case.images})))
    np.testing.assert_allclose(out["logits"], want["logits"].numpy(), rtol=0, atol=1e-4)
    scale = float(want["maps"].abs().max())
    np.testing.assert_allclose(out["map"] / scale, want["maps"].numpy() / scale, rtol=0, atol=1e-4)
    np.testing.assert_allclose(out["normalized_map"], want["normalized"].numpy(), rtol=0, atol=1e-4)
    assert out["normalized_map"].min() >= 0 and out["normalized_map"].max() <= 1


def test_dynamic_batch_1_and_7_give_the_same_rows(case: Case) -> None:
    session = plain_session(case.onnx)
    seven = session.run(None, {"images": case.images[:7]})
    ones = [session.run(None, {"images": case.images[i:i + 1]}) for i in range(7)]
    for k, name in enumerate(OUTPUTS):
        single = np.concatenate([one[k] for one in ones])
        assert single.shape == seven[k].shape and single.shape[0] == 7
        span = max(float(np.abs(seven[k]).max()), 1.0)
        assert np.abs(single - seven[k]).max() / span <= 1e-5, name


def test_metadata_says_how_to_reproduce_a_row(case: Case) -> None:
    model = onnx.load(str(case.onnx))
    props = {p.key: p.value for p in model.metadata_props}
    meta = read_checkpoint(case.checkpoint)["meta"]
    cal = meta["calibration"]
    assert props["qrs_format"] == "qrs-onnx" and props["qrs_format_version"] == "1"
    assert props["qrs_version"] == __version__ and props["checkpoint_qrs_version"] == meta["qrs_version"]
    assert (props["arch"], json.loads(props["img_size"]), props["resize"]) == (case.arch, [PARITY_SIDE] * 2, "stretch")
    assert json.loads(props["output_stride"]) == 32
    assert json.loads(props["class_names"]) == ["non-defective", "defective"]
    assert json.loads(props["normalization"]) == {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
    assert (props["input"], props["input_layout"], props["input_dtype"]) == ("images", "NHWC", "uint8")
    assert (props["batch"], props["opset"]) == ("dynamic", "18")
    assert json.loads(props["outputs"]) == list(OUTPUTS)
    assert float(props["scale"]) == cal["scale"] and float(props["threshold"]) == cal["threshold"] == 0.9
    assert (props["method"], props["norm"], props["aggregation"]) == ("gradcam++", "dataset", "mass")
    assert props["calibrated"] == "true" and props["note"] == cal["risk_note"]
    assert json.loads(props["calibration"]) == {k: cal[k] for k in ("anchor", "quantile", "split", "n_parts",
                                                                     "p_defective_cut")}
    assert json.loads(props["calibration"])["quantile"] == 0.5
    assert json.loads(props["risk_cuts"]) == cal["risk_cuts"]
    assert json.loads(props["qrs_meta"]) == meta
    # The graph: one uint8 NHWC input with a symbolic batch, the outputs on the feature grid and at input size.
    (graph_input,) = model.graph.input
    dims = [d.dim_param or d.dim_value for d in graph_input.type.tensor_type.shape.dim]
    assert graph_input.name == "images" and graph_input.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert dims == ["batch", PARITY_SIDE, PARITY_SIDE, 3]
    grid = PARITY_SIDE // 32
    shapes = {o.name: [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim] for o in model.graph.output}
    assert shapes == {"logits": ["batch", 2], "p_defective": ["batch"], "raw_map": ["batch", grid, grid],
                      "map": ["batch", PARITY_SIDE, PARITY_SIDE],
                      "normalized_map": ["batch", PARITY_SIDE, PARITY_SIDE], "qrs": ["batch"]}


def test_fixed_batch_graph_runs_any_number_of_images(exported: Exported, tmp_path: Path) -> None:
    result = export_onnx(exported.checkpoint, tmp_path / "b3.onnx", batch=3)
    assert result.batch == 3 and result.n_checked == 3
    fixed = OnnxBackend.load(tmp_path / "b3.onnx", device="cpu")
    assert fixed.batch == 3 and OnnxBackend.load(exported.onnx, device="cpu").batch is None
    dims = [d.dim_value for d in onnx.load(str(tmp_path / "b3.onnx")).graph.input[0].type.tensor_type.shape.dim]
    assert dims == [3, EXPORT_SIDE, EXPORT_SIDE, 3]
    images = np.stack([np.asarray(Image.fromarray(part_image(s)).resize((EXPORT_SIDE, EXPORT_SIDE))) for s in range(5)])
    want = OnnxBackend.load(exported.onnx, device="cpu").run(images)
    got = fixed.run(images)  # two runs of 3, the second padded with copies of the fifth image
    for name, a, b in zip(OUTPUTS, got, want):
        assert a.shape[0] == 5
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * max(float(np.abs(b).max()), 1.0), err_msg=name)


def test_uncalibrated_checkpoint_exports_per_image_min_max(tmp_path: Path) -> None:
    """Like the torch backend: norm=image and a note, so the graph's M is each map's own min-max."""
    torch.manual_seed(0)
    checkpoint = tmp_path / "raw.pt"
    save_checkpoint(checkpoint, build_model("resnet18").eval(), base_meta("resnet18", PARITY_SIDE))
    result = export_onnx(checkpoint, tmp_path / "raw.onnx")
    assert not result.calibrated
    props = {p.key: p.value for p in onnx.load(str(tmp_path / "raw.onnx")).metadata_props}
    assert (props["calibrated"], props["norm"], props["scale"], props["risk_cuts"]) == ("false", "image", "null", "null")
    assert props["note"] == UNCALIBRATED_NOTE and props["calibration"] == "null"
    images = np.stack([np.asarray(Image.fromarray(part_image(s)).resize((PARITY_SIDE, PARITY_SIDE)))
                       for s in range(3)])
    out = dict(zip(OUTPUTS, plain_session(tmp_path / "raw.onnx").run(None, {"images": images})))
    maps = out["map"]
    low, high = maps.min(axis=(1, 2), keepdims=True), maps.max(axis=(1, 2), keepdims=True)
    assert (high > low).all()
    np.testing.assert_allclose(out["normalized_map"], (maps - low) / (high - low), rtol=0, atol=1e-5)


def test_the_cli_exports_and_says_how_close_it_came(exported: Exported, tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["export", "--model", str(exported.checkpoint), "--format", "onnx", "--out",
                                      str(tmp_path / "m.onnx"), "--batch", "2", "--resize", "pad"])
    assert result.exit_code == 0, result.output
    first, second = result.stdout.strip().splitlines()  # the progress bar is on stderr
    assert first.startswith(f"exported resnet18 ({EXPORT_SIDE}x{EXPORT_SIDE} px, calibrated) to {tmp_path / 'm.onnx'} (")
    assert first.endswith(" MB, opset 18, batch 2); outputs: logits, p_defective, raw_map, map, normalized_map, qrs")
    assert second.startswith("checked with ONNX Runtime against PyTorch on 2 random images: p_defective within ")
    props = {p.key: p.value for p in onnx.load(str(tmp_path / "m.onnx")).metadata_props}
    assert props["resize"] == "pad" and props["batch"] == "2" and json.loads(props["risk_cuts"]) == RISK_CUTS


def test_a_model_outside_the_closed_form_is_refused(tmp_path: Path) -> None:
    class Doubled(ResNet):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 2 * super().forward(x)

    hooked = build_model("resnet18").eval()
    hooked.register_forward_hook(lambda module, args, output: output)
    for model in (Doubled(BasicBlock, [2, 2, 2, 2], num_classes=2).eval(), hooked):
        model.qrs_meta = base_meta("resnet18", EXPORT_SIDE)
        with pytest.raises(QrsError) as exc:
            export_onnx(model, tmp_path / "m.onnx")
        assert str(exc.value) == (
            "cannot export this resnet18 model: its logits are not global average pooling and one linear layer of "
            "its last feature map (a torchvision ResNet's layer4, EfficientNet-Lite0's bn2, with their own forward "
            "and no hooks), so its map needs a backward pass at run time, which the exported graph does not have")
    assert list(tmp_path.iterdir()) == []


def test_bad_options_are_refused(exported: Exported, tmp_path: Path) -> None:
    with pytest.raises(QrsError, match=rf"^--out {exported.checkpoint} is the checkpoint itself: write the ONNX model "
                                       "to another file$"):
        export_onnx(exported.checkpoint, exported.checkpoint)
    with pytest.raises(QrsError, match=r"^--opset must be >= 18 \(the oldest the PyTorch exporter writes\), got 17$"):
        export_onnx(exported.checkpoint, tmp_path / "m.onnx", opset=17)
    with pytest.raises(QrsError, match=r"^unknown --format 'tflite'; expected one of onnx$"):
        export_onnx(exported.checkpoint, tmp_path / "m.onnx", fmt="tflite")
    assert parse_batch("dynamic") is None and parse_batch("8") == 8 and parse_batch(4) == 4
    for bad, shown in (("0", "0"), ("x", "'x'"), ("-3", "-3")):
        with pytest.raises(QrsError, match=rf"^--batch must be dynamic or a batch size >= 1, got {shown}$"):
            parse_batch(bad)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("package", ["onnx", "onnxscript", "onnxruntime"])
def test_a_missing_package_names_the_pip_command(package: str, exported: Exported, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, package, None)
    with pytest.raises(QrsError) as exc:
        export_onnx(exported.checkpoint, tmp_path / "m.onnx")
    assert str(exc.value) == (f"qrs export needs the package {package}, which is not installed: pip install onnx "
                              "onnxscript onnxruntime (in a qrs clone: pip install -e '.[onnx]')")


def test_a_failed_check_writes_nothing(exported: Exported, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "m.onnx"
    out.write_bytes(b"the previous export")
    monkeypatch.setattr("qrs.export.CHECK_TOLERANCE", {"p_defective": -1.0, "raw_map": -1.0})
    with pytest.raises(QrsError) as exc:
        export_onnx(exported.checkpoint, out)
    assert str(exc.value).startswith("the exported graph disagrees with PyTorch (p_defective by ")
    assert str(exc.value).endswith(f"); {out} was not written")
    assert out.read_bytes() == b"the previous export" and list(tmp_path.iterdir()) == [out]


def test_exporting_an_onnx_file_or_a_corrupt_checkpoint_exits_2(exported: Exported, tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "qrs", "export", "--model", str(exported.onnx), "--out",
                           str(tmp_path / "again.onnx")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert done.stderr.strip() == (f"error: {exported.onnx} is not a readable checkpoint (corrupted or truncated?): "
                                   "UnpicklingError")
    assert not (tmp_path / "again.onnx").exists()


def test_readme_onnxruntime_client_runs_as_written_without_torch(exported: Exported, tmp_path: Path) -> None:
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme.split("**Scoring with plain ONNX Runtime**", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    (tmp_path / "model.onnx").write_bytes(exported.onnx.read_bytes())
    (tmp_path / "part.png").write_bytes(png(part_image(5, defective=True)))
    blocked = "import sys\nsys.modules['torch'] = sys.modules['qrs'] = None\n"  # the client needs neither
    done = subprocess.run([sys.executable, "-c", blocked + code], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    row = score_files([tmp_path / "part.png"], exported.checkpoint, out=tmp_path / "scored", progress=False).rows[0]
    assert done.stdout == (f"{row['verdict']} p_defective={row['p_defective']:.4f} qrs={row['qrs']:.4f} "
                           f"risk={row['risk_level']}\n")

