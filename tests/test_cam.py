"""Class activation maps: formulas checked by hand, fast path vs autograd, grad-cam compatibility."""

from __future__ import annotations

import gc

import numpy as np
import pytest
import torch
from pytorch_grad_cam import GradCAM, GradCAMPlusPlus, HiResCAM, LayerCAM, XGradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import Tensor, nn
from torchvision.models import resnet18

from qrs.cam import METHODS, CamResult, closed_form_cam, compute_cams, gap_linear, maps_from_raw
from qrs.model import build_model

GRAD_CAM_CLASSES = {
    "evidence": GradCAM,  # with the log-odds as its target, see grad_cam_targets
    "gradcam": GradCAM,
    "gradcam++": GradCAMPlusPlus,
    "xgradcam": XGradCAM,
    "layercam": LayerCAM,
    "hirescam": HiResCAM,
}


def grad_cam_targets(method: str, n: int) -> list:
    """The grad-cam package's targets for class 1: its logit, or its log-odds for the evidence map."""
    return [(lambda out: out[1] - out[0]) if method == "evidence" else ClassifierOutputTarget(1)] * n


def tiny_resnet(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return resnet18(num_classes=2).eval()


class Wrapped(nn.Module):
    """Same network and head, but not a torchvision ResNet: compute_cams must take the autograd path."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


@pytest.fixture(scope="module")
def model() -> nn.Module:
    return tiny_resnet()


@pytest.fixture(scope="module")
def images() -> Tensor:
    torch.manual_seed(1)
    return torch.randn(4, 3, 96, 96)


# ---------------------------------------------------------------- hand-built Grad-CAM++ and friends

# Activations of the toy target layer: K=2 channels on a 2x2 grid.
TOY_A = [
    [[1.0, 2.0], [3.0, 4.0]],  # S_1 = 10
    [[0.0, 1.0], [0.0, 1.0]],  # S_2 = 2
]
# The class-1 logit is sum_kij V_k(i,j) A_k(i,j), so g = V exactly: mixed signs, zeros, varying over (i,j).
TOY_G = [
    [[0.5, -1.0], [0.0, 0.25]],
    [[1.0, 1.0], [-0.5, 0.0]],
]


class ToyLayer(nn.Module):
    """Outputs the fixed TOY_A for every image of the batch."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.tensor(TOY_A))

    def forward(self, x: Tensor) -> Tensor:
        return self.a.expand(x.shape[0], -1, -1, -1) * 1.0


class ToyModel(nn.Module):
    """logits[b, c] = sum_kij V[c,k,i,j] * A[b,k,i,j]; class 1 uses V = TOY_G."""

    def __init__(self, class1_weights: list) -> None:
        super().__init__()
        self.layer4 = ToyLayer()
        self.v = nn.Parameter(torch.stack([torch.full((2, 2, 2), 0.3), torch.tensor(class1_weights)]))

    def forward(self, x: Tensor) -> Tensor:
        return torch.einsum("bkij,ckij->bc", self.layer4(x), self.v)


def reference_cam(method: str, a: list, g: list, compat: bool = False) -> list[list[float]]:
    """The methods' definitions written out with plain Python loops, independently of qrs.cam. ``g`` is the
    gradient of the class-1 logit; the evidence map is Grad-CAM of the log-odds, whose gradient is g minus
    the class-0 weights (0.3 everywhere in ToyModel)."""
    k_range, ij = range(len(a)), [(i, j) for i in range(2) for j in range(2)]
    if method == "evidence":
        method, g = "gradcam", [[[v - 0.3 for v in row] for row in gk] for gk in g]
    relu = lambda v: max(v, 0.0)  # noqa: E731
    s = [sum(a[k][i][j] for i, j in ij) for k in k_range]
    if method in ("layercam", "hirescam"):
        f = relu if method == "layercam" else (lambda v: v)
        cam = [[sum(f(g[k][i][j]) * a[k][i][j] for k in k_range) for j in range(2)] for i in range(2)]
        return [[relu(v) for v in row] for row in cam]
    if method == "gradcam":
        w = [sum(g[k][i][j] for i, j in ij) / 4 for k in k_range]
    elif method == "xgradcam":
        w = [sum(g[k][i][j] * a[k][i][j] for i, j in ij) / (s[k] + 1e-7) for k in k_range]
    elif compat:
        w = [
            sum(
                relu(g[k][i][j]) * g[k][i][j] ** 2 / (2 * g[k][i][j] ** 2 + s[k] * g[k][i][j] ** 3 + 1e-6)
                for i, j in ij
                if g[k][i][j] != 0
            )
            for k in k_range
        ]
    else:
        w = [sum(relu(g[k][i][j]) / (2 + s[k] * g[k][i][j]) for i, j in ij if g[k][i][j] != 0) for k in k_range]
    return [[relu(sum(w[k] * a[k][i][j] for k in k_range)) for j in range(2)] for i in range(2)]


def test_gradcampp_toy_by_hand() -> None:
    # alpha = 1 / (2 + S g) where g != 0; w_k = sum relu(g) alpha:
    # w_1 = 0.5 / (2 + 10*0.5) + 0.25 / (2 + 10*0.25) = 0.5/7 + 0.25/4.5   (g=-1 and g=0 give nothing)
    # w_2 = 1 / (2 + 2*1) + 1 / (2 + 2*1) = 0.5                               (g=-0.5 and g=0 give nothing)
    w1, w2 = 0.5 / 7 + 0.25 / 4.5, 0.5
    expected = torch.tensor(
        [
            [w1 * 1.0 + w2 * 0.0, w1 * 2.0 + w2 * 1.0],
            [w1 * 3.0 + w2 * 0.0, w1 * 4.0 + w2 * 1.0],
        ]
    )
    result = compute_cams(ToyModel(TOY_G).eval(), torch.zeros(2, 3, 4, 4))
    assert isinstance(result, CamResult)
    assert result.raw.dtype == torch.float32 and result.raw.shape == (2, 2, 2)
    torch.testing.assert_close(result.raw[0], expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(result.raw[1], expected, atol=1e-6, rtol=0)
    # Bilinear 2 -> 4 with half-pixel centres samples source x = -0.25 (clamped to 0), 0.25, 0.75, 1.25
    # (clamped to 1): row 0 of the map is C00, 0.75 C00 + 0.25 C01, 0.25 C00 + 0.75 C01, C01.
    c00, c01 = expected[0, 0].item(), expected[0, 1].item()
    row0 = torch.tensor([c00, 0.75 * c00 + 0.25 * c01, 0.25 * c00 + 0.75 * c01, c01])
    torch.testing.assert_close(result.maps[0, 0], row0, atol=1e-6, rtol=0)
    # The class-1 logit of the same pass: sum V*A = 0.5*1 - 1*2 + 0.25*4 + 1*1 = 0.5
    assert result.logits[0, 1].item() == pytest.approx(0.5, abs=1e-6)


@pytest.mark.parametrize("compat", [False, True])
@pytest.mark.parametrize("method", METHODS)
def test_methods_match_loop_reference_on_toy(method: str, compat: bool) -> None:
    result = compute_cams(ToyModel(TOY_G).eval(), torch.zeros(1, 3, 4, 4), method=method, compat=compat)
    expected = torch.tensor(reference_cam(method, TOY_A, TOY_G, compat))
    torch.testing.assert_close(result.raw[0], expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_toy_compat_matches_grad_cam_package(method: str) -> None:
    model = ToyModel(TOY_G).eval()
    x = torch.zeros(1, 3, 4, 4)
    with GRAD_CAM_CLASSES[method](model, target_layers=[model.layer4]) as cam:
        expected = cam(x, targets=grad_cam_targets(method, 1))
    ours = compute_cams(model, x, method=method, compat=True).maps
    np.testing.assert_allclose(ours.numpy(), expected, atol=1e-4, rtol=0)


def test_all_zero_map_is_kept_not_rescaled() -> None:
    # Every gradient <= 0: Grad-CAM++ weights are all 0, so C = 0 everywhere; compat scaling maps it to 0.
    negative = [[[-1.0, -0.5], [0.0, -2.0]], [[-0.1, 0.0], [-3.0, -1.0]]]
    model = ToyModel(negative).eval()
    for compat in (False, True):
        result = compute_cams(model, torch.zeros(1, 3, 4, 4), compat=compat)
        assert torch.equal(result.raw, torch.zeros(1, 2, 2))
        assert torch.equal(result.maps, torch.zeros(1, 4, 4))


# ---------------------------------------------------------------- fast path vs general path


@pytest.mark.parametrize("compat", [False, True])
@pytest.mark.parametrize("method", METHODS)
def test_fast_path_matches_autograd_path(model: nn.Module, images: Tensor, method: str, compat: bool) -> None:
    fast = compute_cams(model, images, method=method, compat=compat)
    general = compute_cams(Wrapped(model).eval(), images, method=method, compat=compat, layer="net.layer4")
    assert fast.raw.shape == (4, 3, 3) and fast.maps.shape == (4, 96, 96)
    assert fast.raw.abs().max() > 0
    torch.testing.assert_close(fast.raw, general.raw, atol=1e-5, rtol=0)
    torch.testing.assert_close(fast.maps, general.maps, atol=1e-5, rtol=0)
    torch.testing.assert_close(fast.logits, general.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(fast.logits, model(images), atol=1e-5, rtol=0)


def test_fast_path_needs_no_autograd(model: nn.Module, images: Tensor, monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("autograd used")

    monkeypatch.setattr(torch.autograd, "grad", forbidden)
    result = compute_cams(model, images[:1])
    assert not result.raw.requires_grad and result.raw.abs().max() > 0
    with pytest.raises(AssertionError, match="autograd used"):
        compute_cams(Wrapped(model).eval(), images[:1], layer="net.layer4")


def test_maps_are_raw_upsampled_with_half_pixel_centres(model: nn.Module, images: Tensor) -> None:
    result = compute_cams(model, images)
    # 3 -> 96 is a factor 32: output pixel 16 + 32 i samples source x = i + 1/64, near source pixel i;
    # output pixels 0..15 sit left of source centre 0 and are clamped to it.
    torch.testing.assert_close(result.maps[:, :16, :16], result.raw[:, :1, :1].expand(-1, 16, 16))
    # Output pixel (48, 48) samples (1 + 1/64, 1 + 1/64): weights 63/64 and 1/64 along each axis.
    c = result.raw
    near, far = 63 / 64, 1 / 64
    expected = near * near * c[:, 1, 1] + near * far * (c[:, 1, 2] + c[:, 2, 1]) + far * far * c[:, 2, 2]
    torch.testing.assert_close(result.maps[:, 48, 48], expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("compat", [False, True])
def test_maps_from_raw_gives_back_the_maps_of_the_pass(model: nn.Module, images: Tensor, compat: bool) -> None:
    result = compute_cams(model, images, compat=compat)
    assert torch.equal(maps_from_raw(result.raw, tuple(images.shape[-2:]), compat=compat), result.maps)


# ---------------------------------------------------------------- compatibility with pytorch-grad-cam


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("method", METHODS)
def test_compat_matches_grad_cam_package(model: nn.Module, images: Tensor, method: str, batch: int) -> None:
    x = images[:batch]
    with GRAD_CAM_CLASSES[method](model, target_layers=[model.layer4]) as cam:
        expected = cam(x, targets=grad_cam_targets(method, batch))
    model.zero_grad(set_to_none=True)
    ours = compute_cams(model, x, method=method, compat=True)
    assert ours.maps.shape == expected.shape
    np.testing.assert_allclose(ours.maps.numpy(), expected, atol=1e-4, rtol=0)


def test_compat_matches_grad_cam_package_on_inner_layer(model: nn.Module, images: Tensor) -> None:
    with GradCAMPlusPlus(model, target_layers=[model.layer3]) as cam:
        expected = cam(images, targets=[ClassifierOutputTarget(1)] * 4)
    model.zero_grad(set_to_none=True)
    ours = compute_cams(model, images, layer="layer3", compat=True)
    assert ours.raw.shape == (4, 6, 6)
    np.testing.assert_allclose(ours.maps.numpy(), expected, atol=1e-4, rtol=0)


# ---------------------------------------------------------------- general path: no side effects


def test_frozen_parameters_on_general_path(images: Tensor) -> None:
    frozen = tiny_resnet()
    for p in frozen.parameters():
        p.requires_grad_(False)
    trainable = tiny_resnet()
    for layer in ("net.layer3", "net.layer4"):
        a = compute_cams(Wrapped(frozen).eval(), images, layer=layer)
        b = compute_cams(Wrapped(trainable).eval(), images, layer=layer)
        assert a.raw.abs().max() > 0
        torch.testing.assert_close(a.raw, b.raw, atol=1e-6, rtol=0)
    assert all(p.grad is None for p in frozen.parameters())
    assert all(p.grad is None for p in trainable.parameters())
    assert all(p.requires_grad for p in trainable.parameters())


def test_general_path_inside_inference_mode(model: nn.Module, images: Tensor) -> None:
    expected = compute_cams(model, images[:2], layer="layer3").raw
    with torch.inference_mode():
        x = images[:2].clone()
        result = compute_cams(model, x, layer="layer3")
    torch.testing.assert_close(result.raw, expected)


def hook_counts(model: nn.Module) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) + len(m._backward_pre_hooks)
        for m in model.modules()
    )


def live_tensors() -> int:
    gc.collect()
    return sum(1 for obj in gc.get_objects() if issubclass(type(obj), Tensor))


def test_200_batches_leave_no_hooks_and_no_tensors() -> None:
    wrapped = Wrapped(tiny_resnet()).eval()
    x = torch.randn(1, 3, 32, 32)
    for layer in ("net.layer3", "net.layer4"):
        compute_cams(wrapped, x, layer=layer)
        compute_cams(wrapped.net, x, layer=layer[4:])
    before = live_tensors()
    for i in range(200):
        model, layer = [(wrapped, "net.layer4"), (wrapped, "net.layer3"), (wrapped.net, "layer4")][i % 3]
        compute_cams(model, x, layer=layer, method=METHODS[i % len(METHODS)], compat=bool(i % 2))
    assert hook_counts(wrapped) == 0
    assert live_tensors() <= before


def test_hook_removed_when_the_call_fails(model: nn.Module, images: Tensor) -> None:
    wrapped = Wrapped(model).eval()
    with pytest.raises(ValueError, match="out of range"):
        compute_cams(wrapped, images[:1], layer="net.layer4", target_class=5)
    with pytest.raises(ValueError, match="B x K x h x w"):
        compute_cams(wrapped, images[:1], layer="net.fc")
    assert hook_counts(wrapped) == 0


# ---------------------------------------------------------------- input validation


def test_unknown_method_lists_valid_ones(model: nn.Module, images: Tensor) -> None:
    with pytest.raises(ValueError,
                       match=r"unknown method 'scorecam'; valid methods: gradcam\+\+, evidence, gradcam, xgradcam"):
        compute_cams(model, images, method="scorecam")


def test_images_must_be_4d_float(model: nn.Module, images: Tensor) -> None:
    with pytest.raises(ValueError, match=r"4-D B x 3 x H x W tensor, got \(3, 96, 96\)"):
        compute_cams(model, images[0])
    with pytest.raises(ValueError, match="floating-point"):
        compute_cams(model, images.to(torch.uint8))


@pytest.mark.parametrize("target_class", [2, -1])
def test_target_class_out_of_range(model: nn.Module, images: Tensor, target_class: int) -> None:
    with pytest.raises(ValueError, match=f"target_class {target_class} out of range for 2 classes"):
        compute_cams(model, images[:1], target_class=target_class)


def test_target_class_must_be_integer(model: nn.Module, images: Tensor) -> None:
    with pytest.raises(ValueError, match="target_class must be an integer"):
        compute_cams(model, images[:1], target_class=1.0)  # type: ignore[arg-type]


def test_layer_errors(model: nn.Module, images: Tensor) -> None:
    with pytest.raises(ValueError, match="layer 'layer9' not found"):
        compute_cams(model, images[:1], layer="layer9")
    with pytest.raises(ValueError, match="not a submodule"):
        compute_cams(model, images[:1], layer=nn.Conv2d(3, 3, 1))
    with pytest.raises(ValueError, match=r"no default target layer \('layer4' for torchvision ResNets, 'bn2' for "
                                         r"EfficientNet-Lite0\); pass layer="):
        compute_cams(Wrapped(model).eval(), images[:1])


def test_training_mode_is_refused(images: Tensor) -> None:
    with pytest.raises(ValueError, match="model.eval"):
        compute_cams(tiny_resnet().train(), images[:1])


def test_layer_that_runs_twice_is_refused(images: Tensor) -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.block = nn.Conv2d(3, 3, 3, padding=1)
            self.fc = nn.Linear(3, 2)

        def forward(self, x: Tensor) -> Tensor:
            return self.fc(self.block(self.block(x)).mean(dim=(2, 3)))

    with pytest.raises(ValueError, match="ran 2 times"):
        compute_cams(Twice().eval(), images[:1], layer="block")



# ---------------------------------------------------------------- EfficientNet-Lite0 (timm), the same fast path


@pytest.fixture(scope="module")
def lite0() -> nn.Module:
    torch.manual_seed(0)
    return build_model("efficientnet_lite0", pretrained="imagenet").eval()


def test_lite0_takes_the_closed_form_path_at_its_head_activation(lite0: nn.Module) -> None:
    split = gap_linear(lite0)
    assert split is not None and split.linear is lite0.classifier
    assert gap_linear(lite0, "blocks.6") is None and gap_linear(Wrapped(lite0), "net.bn2") is None
    assert gap_linear(tiny_resnet(), "layer3") is None and gap_linear(tiny_resnet()).linear.out_features == 2


@pytest.mark.parametrize("method", METHODS)
def test_lite0_fast_path_matches_autograd_path(lite0: nn.Module, images: Tensor, method: str) -> None:
    fast = compute_cams(lite0, images, method=method)
    general = compute_cams(Wrapped(lite0).eval(), images, method=method, layer="net.bn2")
    assert fast.raw.shape == (4, 3, 3) and fast.raw.abs().max() > 0
    torch.testing.assert_close(fast.raw, general.raw, atol=1e-5, rtol=0)
    torch.testing.assert_close(fast.maps, general.maps, atol=1e-5, rtol=0)
    torch.testing.assert_close(fast.logits, lite0(images), atol=1e-5, rtol=0)


def test_lite0_compat_matches_grad_cam_package(lite0: nn.Module, images: Tensor) -> None:
    with GradCAMPlusPlus(lite0, target_layers=[lite0.bn2]) as cam:
        expected = cam(images, targets=[ClassifierOutputTarget(1)] * 4)
    lite0.zero_grad(set_to_none=True)
    ours = compute_cams(lite0, images, compat=True)
    assert expected.max() == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_allclose(ours.maps.numpy(), expected, atol=1e-4, rtol=0)


# ---------------------------------------------------------------- finer maps: output stride 16 and 8


@pytest.mark.parametrize("output_stride", [16, 8])
@pytest.mark.parametrize(("arch", "layer"), [("resnet18", "layer4"), ("resnet50", "layer4"),
                                             ("efficientnet_lite0", "bn2")])
def test_dilated_models_closed_form_and_compat(arch: str, layer: str, output_stride: int) -> None:
    torch.manual_seed(0)
    net = build_model(arch, output_stride=output_stride).eval()
    x = torch.randn(2, 3, 64, 96)
    fast = compute_cams(net, x)
    general = compute_cams(Wrapped(net).eval(), x, layer=f"net.{layer}")
    assert gap_linear(net) is not None
    assert fast.raw.shape == (2, 64 // output_stride, 96 // output_stride) and fast.raw.abs().max() > 0
    torch.testing.assert_close(fast.raw, general.raw, atol=1e-5, rtol=0)
    torch.testing.assert_close(fast.maps, general.maps, atol=1e-5, rtol=0)
    with GradCAMPlusPlus(net, target_layers=[net.get_submodule(layer)]) as cam:
        expected = cam(x, targets=[ClassifierOutputTarget(1)] * 2)
    net.zero_grad(set_to_none=True)
    ours = compute_cams(net, x, compat=True)
    assert ours.maps.shape == expected.shape == (2, 64, 96)
    np.testing.assert_allclose(ours.maps.numpy(), expected, atol=1e-4, rtol=0)


# ---------------------------------------------------------------- the class-evidence map (Grad-CAM of the log-odds)


def test_evidence_map_is_the_log_odds_share_of_each_cell(model: nn.Module, images: Tensor) -> None:
    result = compute_cams(model, images, method="evidence")
    with torch.no_grad():
        a = model.layer4(model.layer3(model.layer2(model.layer1(model.maxpool(model.relu(model.bn1(model.conv1(images))))))))
        signed = torch.einsum("k,bkij->bij", model.fc.weight[1] - model.fc.weight[0], a) / (a.shape[-2] * a.shape[-1])
        logits = model(images)
    torch.testing.assert_close(result.raw, signed.clamp(min=0), atol=1e-6, rtol=0)
    # The mean of the signed map over the cells is the log-odds minus the difference of the biases.
    log_odds = logits[:, 1] - logits[:, 0]
    torch.testing.assert_close(signed.mean(dim=(1, 2)) * 9, log_odds - (model.fc.bias[1] - model.fc.bias[0]),
                               atol=1e-5, rtol=0)
    general = compute_cams(Wrapped(model).eval(), images, method="evidence", layer="net.layer4")
    torch.testing.assert_close(result.raw, general.raw, atol=1e-5, rtol=0)
    for target_class in (0, 1):
        split = gap_linear(model)
        torch.testing.assert_close(
            closed_form_cam(split, a, target_class, method="evidence"),
            compute_cams(model, images, method="evidence", target_class=target_class).raw, atol=1e-6, rtol=0)


def test_evidence_compat_matches_grad_cam_with_a_log_odds_target(model: nn.Module, images: Tensor) -> None:
    with GradCAM(model, target_layers=[model.layer4]) as cam:
        expected = cam(images, targets=[lambda out: out[1] - out[0]] * 4)
    model.zero_grad(set_to_none=True)
    ours = compute_cams(model, images, method="evidence", compat=True)
    np.testing.assert_allclose(ours.maps.numpy(), expected, atol=1e-4, rtol=0)
