"""The closed sets of option values, shared by the library and the CLI (and light to import)."""

from typing import Literal, get_args

Format = Literal["ksdd2", "sodf", "folder"]
Split = Literal["train", "val", "test"]
ResizeMode = Literal["stretch", "pad"]
Arch = Literal["resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "efficientnet_lite0"]
Pretrained = Literal["imagenet", "none"]
Augment = Literal["none", "flip", "standard"]
ClassWeights = Literal["auto", "none"]
Optimizer = Literal["adam", "adamw"]
Schedule = Literal["constant", "cosine", "onecycle"]
MaskLoss = Literal["auto", "none", "energy"]
Method = Literal["gradcam++", "evidence", "gradcam", "xgradcam", "layercam", "hirescam"]
Norm = Literal["dataset", "image"]
Aggregation = Literal["mass", "area"]
Anchor = Literal["good", "defective"]
OutputFormat = Literal["jsonl", "csv"]
BackendName = Literal["torch", "onnx"]
ExportFormat = Literal["onnx"]
KeepImages = Literal["none", "flagged", "all"]
Truth = Literal["defective", "good"]
RiskLevel = Literal["low", "medium", "high"]

FORMATS: tuple[str, ...] = get_args(Format)
SPLITS: tuple[str, ...] = get_args(Split)
RESIZE_MODES: tuple[str, ...] = get_args(ResizeMode)
ARCHS: tuple[str, ...] = get_args(Arch)
OUTPUT_FORMATS: tuple[str, ...] = get_args(OutputFormat)
METHODS: tuple[str, ...] = get_args(Method)
NORMS: tuple[str, ...] = get_args(Norm)
AGGREGATIONS: tuple[str, ...] = get_args(Aggregation)
ANCHORS: tuple[str, ...] = get_args(Anchor)
BACKENDS: tuple[str, ...] = get_args(BackendName)
EXPORT_FORMATS: tuple[str, ...] = get_args(ExportFormat)
KEEP_IMAGES: tuple[str, ...] = get_args(KeepImages)
TRUTHS: tuple[str, ...] = get_args(Truth)
RISK_LEVELS: tuple[str, ...] = get_args(RiskLevel)
