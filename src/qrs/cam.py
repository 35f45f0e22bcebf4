"""Class activation maps (Grad-CAM++ and relatives) for one target class; torch in, torch out.

The machinery is written once: get the target layer's activations A (B x K x h x w), the gradients
g = dy/dA of the target y, and the logits, then each method is a small function of (A, g). The target
is the target class's logit, or for ``evidence`` its log-odds (z_c - z_other for two classes): Grad-CAM
of the log-odds, whose map for a GAP + linear head is the class-evidence map sum_k (W[c,k] - W[o,k]) A_k
/ (h w), the share of each cell in the decision (its mean over the cells is the log-odds minus the
difference of the biases).
Two ways to get (A, g), chosen automatically (docs/method.md#without-a-backward-pass):

- fast path: a model qrs can explain in closed form (:class:`GapLinear`: its target feature map is
  followed by global average pooling, optional dropout and one Linear layer; torchvision ResNets at
  ``layer4``, timm's EfficientNet-Lite0 at ``bn2``) has g_k(i,j) = W[c,k] / (h w) constant over
  (i,j), so the map costs one forward pass and no autograd at all;
- general path (any other model or layer): a forward hook captures A for the length of the call and
  ``torch.autograd.grad`` differentiates the logits with respect to A only, never the parameters.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models import ResNet

from qrs.choices import METHODS

_XGRADCAM_EPS = 1e-7
"""Keeps XGrad-CAM's division by sum_ij A finite; the grad-cam package's value."""
_COMPAT_ALPHA_EPS = 1e-6
"""Additive term in the grad-cam package's Grad-CAM++ alpha denominator."""
_COMPAT_SCALE_EPS = 1e-7
"""Additive term in the grad-cam package's min-max scaling (``scale_cam_image``)."""

CamFunction = Callable[[Tensor, Tensor], Tensor]
"""(A, g), both B x K x h x w, -> the map before the final ReLU, B x h x w."""


@dataclass(frozen=True)
class CamResult:
    """Maps and logits from one forward pass.

    raw: B x h x w float32, C = relu(sum_k w_k A_k) on the target layer's grid.
    maps: B x H x W float32 at the input size: raw upsampled bilinearly (align_corners=False), or
        with ``compat=True`` the grad-cam package's per-image [0, 1] maps.
    logits: B x num_classes, the model's output of the same forward pass.
    """

    raw: Tensor
    maps: Tensor
    logits: Tensor


def _spatial_sum(x: Tensor) -> Tensor:
    return x.sum(dim=(2, 3), keepdim=True)


def _weighted_sum(weights: Tensor, a: Tensor) -> Tensor:
    """sum_k w_k A_k for channel weights of shape B x K x 1 x 1."""
    return (weights * a).sum(dim=1)


def _gradcam(a: Tensor, g: Tensor) -> Tensor:
    """Grad-CAM: w_k = mean_ij g."""
    return _weighted_sum(g.mean(dim=(2, 3), keepdim=True), a)


def _gradcam_pp(a: Tensor, g: Tensor) -> Tensor:
    """Grad-CAM++ in the stable form of docs/method.md#explanation-map: w_k = sum_ij relu(g) / (2 + S_k g).

    Only g > 0 contributes (relu), which also keeps a zero denominator at g < 0 out of the sum.
    """
    return _weighted_sum(_spatial_sum(torch.where(g > 0, g / (2 + _spatial_sum(a) * g), 0.0)), a)


def _gradcam_pp_compat(a: Tensor, g: Tensor) -> Tensor:
    """Grad-CAM++ exactly as the grad-cam package computes it (eps 1e-6 in alpha's denominator)."""
    g2 = g * g
    alpha = g2 / (2 * g2 + _spatial_sum(a) * (g2 * g) + _COMPAT_ALPHA_EPS)
    alpha = torch.where(g != 0, alpha, 0.0)
    return _weighted_sum(_spatial_sum(g.clamp(min=0) * alpha), a)


def _xgradcam(a: Tensor, g: Tensor) -> Tensor:
    """XGrad-CAM: w_k = sum_ij g A / (sum_ij A + eps)."""
    return _weighted_sum(_spatial_sum(g * a / (_spatial_sum(a) + _XGRADCAM_EPS)), a)


def _layercam(a: Tensor, g: Tensor) -> Tensor:
    """Layer-CAM: sum_k relu(g) A, weights per position."""
    return (g.clamp(min=0) * a).sum(dim=1)


def _hirescam(a: Tensor, g: Tensor) -> Tensor:
    """HiResCAM: sum_k g A, weights per position."""
    return (g * a).sum(dim=1)


_CAMS: dict[str, CamFunction] = {
    "gradcam": _gradcam,
    "gradcam++": _gradcam_pp,
    "xgradcam": _xgradcam,
    "layercam": _layercam,
    "hirescam": _hirescam,
}
_CAMS["evidence"] = _gradcam
_COMPAT_CAMS: dict[str, CamFunction] = {"gradcam++": _gradcam_pp_compat}
"""Methods whose grad-cam package formula differs from ours; the others only differ in scaling."""
LOG_ODDS_METHODS = frozenset({"evidence"})
"""Methods whose target is the class's log-odds instead of its logit."""


@dataclass(frozen=True)
class GapLinear:
    """How a model qrs can explain in closed form computes its logits: ``features(x)`` is the target
    feature map A (B x K x h x w), and ``head(A) = linear(dropout(mean_ij A))``.

    The gradient of a logit with respect to A is then the linear layer's weight row over h w, the
    same at every position (docs/method.md#without-a-backward-pass), so no backward pass is needed.
    """

    features: Callable[[Tensor], Tensor]
    head: Callable[[Tensor], Tensor]
    linear: nn.Linear

    def gradient(self, a: Tensor, target_class: int, *, log_odds: bool = False) -> Tensor:
        """g = dy / dA, expanded to A's shape: W[c, k] / (h w) for the logit of class c, and with
        ``log_odds`` (two classes) (W[c, k] - W[o, k]) / (h w) for its log-odds z_c - z_o."""
        h, w = a.shape[-2:]
        weight = self.linear.weight
        row = weight[target_class]
        if log_odds:
            if weight.shape[0] != 2:
                raise ValueError(f"the log-odds map in closed form needs two classes, the head has {weight.shape[0]}")
            row = row - weight[1 - target_class]
        return (row / (h * w)).to(a.dtype).view(1, -1, 1, 1).expand_as(a)


def _resnet_split(model: nn.Module, layer: nn.Module) -> GapLinear | None:
    """torchvision ResNet with its own forward, explained at ``layer4``, 1x1 average pool, Linear fc."""
    if not (isinstance(model, ResNet) and type(model).forward is ResNet.forward
            and type(model)._forward_impl is ResNet._forward_impl and layer is model.layer4
            and isinstance(model.avgpool, nn.AdaptiveAvgPool2d) and model.avgpool.output_size in (1, (1, 1))
            and isinstance(model.fc, nn.Linear)):
        return None

    def features(x: Tensor) -> Tensor:
        x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
        return model.layer4(model.layer3(model.layer2(model.layer1(x))))

    return GapLinear(features, lambda a: model.fc(torch.flatten(model.avgpool(a), 1)), model.fc)


def _efficientnet_split(model: nn.Module, layer: nn.Module) -> GapLinear | None:
    """timm EfficientNet (EfficientNet-Lite0) with its own forward, explained at ``bn2`` (the head
    convolution's activation), average pooling, dropout, Linear classifier."""
    if not type(model).__module__.startswith("timm."):
        return None
    from timm.layers import SelectAdaptivePool2d
    from timm.models.efficientnet import EfficientNet

    cls = type(model)
    if not (isinstance(model, EfficientNet) and cls.forward is EfficientNet.forward
            and cls.forward_features is EfficientNet.forward_features
            and cls.forward_head is EfficientNet.forward_head and layer is model.bn2
            and isinstance(model.global_pool, SelectAdaptivePool2d) and model.global_pool.pool_type == "avg"
            and isinstance(model.global_pool.flatten, nn.Flatten) and isinstance(model.classifier, nn.Linear)):
        return None
    return GapLinear(model.forward_features, model.forward_head, model.classifier)


_SPLITS = (_resnet_split, _efficientnet_split)
_DEFAULT_LAYERS = (("layer4", "torchvision ResNets"), ("bn2", "EfficientNet-Lite0"))


def gap_linear(model: nn.Module, layer: nn.Module | str | None = None) -> GapLinear | None:
    """The closed-form split of ``model`` at ``layer`` (default: its usual target layer), or None when
    the model's logits are not GAP + dropout + Linear of that layer's output (use autograd then).

    Hooks on the model itself rule it out: the split calls the submodules, not the model's forward.
    """
    target = target_layer(model, layer)
    if model._forward_hooks or model._forward_pre_hooks:
        return None
    for split in _SPLITS:
        found = split(model, target)
        if found is not None:
            return found
    return None


def target_layer(model: nn.Module, layer: nn.Module | str | None = None) -> nn.Module:
    """The module whose output is explained: ``layer`` (a module or dotted name) checked to be in the
    model, or, for None, the model's usual target layer (``layer4``, or ``bn2`` of EfficientNet-Lite0)."""
    if layer is None:
        for name, _ in _DEFAULT_LAYERS:
            found = getattr(model, name, None)
            if isinstance(found, nn.Module):
                return found
        known = ", ".join(f"'{name}' for {what}" for name, what in _DEFAULT_LAYERS)
        raise ValueError(f"model has no default target layer ({known}); pass layer= (a module or a dotted name)")
    if isinstance(layer, str):
        try:
            return model.get_submodule(layer)
        except AttributeError:
            raise ValueError(f"layer {layer!r} not found in the model") from None
    if isinstance(layer, nn.Module):
        if not any(m is layer for m in model.modules()):
            raise ValueError("layer is not a submodule of the model")
        return layer
    raise ValueError(f"layer must be None, an nn.Module or a dotted name, got {type(layer).__name__}")


def closed_form_cam(split: GapLinear, a: Tensor, target_class: int = 1, method: str = "gradcam++") -> Tensor:
    """The raw map C (B x h x w) of ``method`` (Grad-CAM++ by default) of a closed-form model from its
    activations A, with autograd left on: differentiable in A and in the linear layer's weights
    (docs/method.md#mask-guided-training)."""
    if method not in _CAMS:
        raise ValueError(f"unknown method {method!r}; valid methods: {', '.join(METHODS)}")
    g = split.gradient(a.float(), target_class, log_odds=method in LOG_ODDS_METHODS)
    return _CAMS[method](a.float(), g).clamp(min=0)


def _check_target(logits: Tensor, target_class: int) -> None:
    if logits.dim() != 2:
        raise ValueError(f"model output must be B x num_classes logits, got shape {tuple(logits.shape)}")
    if not 0 <= target_class < logits.shape[1]:
        raise ValueError(f"target_class {target_class} out of range for {logits.shape[1]} classes")


def _fast_activations(split: GapLinear, images: Tensor, target_class: int,
                      log_odds: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(A, g, logits) of a closed-form model from one forward pass, without autograd."""
    with torch.no_grad():
        a = split.features(images)
        logits = split.head(a)
        _check_target(logits, target_class)
        g = split.gradient(a, target_class, log_odds=log_odds)
    return a, g, logits


def _target(logits: Tensor, target_class: int, log_odds: bool) -> Tensor:
    """Per image, the logit of ``target_class`` or its log-odds log p_c - log(1 - p_c) = z_c - logsumexp of
    the other logits (z_c - z_o for two classes)."""
    if not log_odds:
        return logits[:, target_class]
    others = torch.cat([logits[:, :target_class], logits[:, target_class + 1:]], dim=1)
    return logits[:, target_class] - torch.logsumexp(others, dim=1)


def _autograd_activations(
    model: nn.Module, layer: nn.Module, images: Tensor, target_class: int, log_odds: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """(A, g, logits) for any layer: hook the activation, differentiate the summed targets (logits or log-odds).

    The hook hands the rest of the network a copy of a detached leaf, so gradients stop at A (no
    backward through earlier layers, parameters frozen or not) and in-place operations downstream
    leave the captured values alone. Summing the batch's target logits gives per-sample gradients.
    """
    captured: list[Tensor] = []

    def capture(module: nn.Module, inputs: tuple[object, ...], output: object) -> Tensor:
        if not isinstance(output, Tensor) or output.dim() != 4:
            raise ValueError("the target layer must output a B x K x h x w tensor")
        leaf = output.detach().requires_grad_(True)
        captured.append(leaf)
        return leaf.clone()

    with torch.inference_mode(False), torch.enable_grad():
        if images.is_inference():
            images = images.clone()
        handle = layer.register_forward_hook(capture)
        try:
            logits = model(images)
        finally:
            handle.remove()
        if len(captured) != 1:
            raise ValueError(f"the target layer ran {len(captured)} times in one forward pass, not once")
        if not isinstance(logits, Tensor):
            raise ValueError(f"model output must be a logits tensor, got {type(logits).__name__}")
        _check_target(logits, target_class)
        (a,) = captured
        y = _target(logits, target_class, log_odds).sum()
        (g,) = torch.autograd.grad(y, a, allow_unused=True) if y.requires_grad else (None,)
    if g is None:
        raise ValueError("the target-class logit does not depend on the target layer's output")
    return a.detach(), g, logits.detach()


def upsample(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear, half-pixel centres (align_corners=False); the same as OpenCV's INTER_LINEAR."""
    return F.interpolate(maps.unsqueeze(1), size=size, mode="bilinear", align_corners=False).squeeze(1)


def _minmax_compat(maps: Tensor) -> Tensor:
    """The grad-cam package's per-image scaling: (x - min) / (1e-7 + max(x - min)); constant -> 0."""
    shifted = maps - maps.amin(dim=(1, 2), keepdim=True)
    return shifted / (_COMPAT_SCALE_EPS + shifted.amax(dim=(1, 2), keepdim=True))


def maps_from_raw(raw: Tensor, size: tuple[int, int], *, compat: bool = False) -> Tensor:
    """The input-size maps of :class:`CamResult` from its raw maps: bilinear upsampling, and with
    ``compat`` the grad-cam package's per-image min-max before and after it, in its order. The
    stored raw maps of an extraction give back exactly the maps its QRS was computed from."""
    return _minmax_compat(upsample(_minmax_compat(raw), size)) if compat else upsample(raw, size)


def compute_cams(
    model: nn.Module,
    images: Tensor,
    *,
    method: str = "gradcam++",
    target_class: int = 1,
    layer: nn.Module | str | None = None,
    compat: bool = False,
) -> CamResult:
    """Class activation maps of ``target_class`` for a batch, plus the logits of the same pass.

    model: in eval mode. images: B x 3 x H x W, already normalised; moved to the model's device.
    layer: None for the model's usual target layer (``layer4`` of a ResNet, ``bn2`` of EfficientNet-Lite0),
    a submodule, or a dotted submodule name.
    compat: reproduce the grad-cam package (its Grad-CAM++ alpha, and its per-image min-max scaling
    applied before and after the upsampling, in its order) instead of the raw maps of docs/method.md#explanation-map.
    method ``evidence`` explains the log-odds of ``target_class`` rather than its logit.
    """
    if method not in _CAMS:
        raise ValueError(f"unknown method {method!r}; valid methods: {', '.join(METHODS)}")
    if not isinstance(images, Tensor) or images.dim() != 4:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"images must be a 4-D B x 3 x H x W tensor, got {shape}")
    if not images.is_floating_point():
        raise ValueError(f"images must be a normalised floating-point tensor, got {images.dtype}")
    try:
        target_class = operator.index(target_class)
    except TypeError:
        raise ValueError(f"target_class must be an integer, got {target_class!r}") from None
    if model.training:
        raise ValueError("model is in training mode; call model.eval() first")
    target = target_layer(model, layer)
    reference = next(model.parameters(), None)
    if reference is not None:
        images = images.to(reference.device)

    split = gap_linear(model, target)
    log_odds = method in LOG_ODDS_METHODS
    if split is not None and (not log_odds or split.linear.out_features == 2):
        a, g, logits = _fast_activations(split, images, target_class, log_odds)
    else:
        a, g, logits = _autograd_activations(model, target, images, target_class, log_odds)

    cam = (_COMPAT_CAMS if compat else _CAMS).get(method, _CAMS[method])
    with torch.no_grad():
        raw = cam(a.float(), g.float()).clamp(min=0)
        size = (images.shape[-2], images.shape[-1])
        maps = maps_from_raw(raw, size, compat=compat)
    return CamResult(raw=raw, maps=maps, logits=logits)
