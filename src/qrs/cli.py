"""The ``qrs`` command line: a thin typer layer over the library (no logic lives here).

Every option shows its default in ``--help``. Options of the paper's README keep their underscored
spellings (``--data_root``) beside the dashed ones (``--data-root``).
"""

from __future__ import annotations

import sys
import traceback
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from qrs.choices import (
    Aggregation, Anchor, Arch, Augment, BackendName, ClassWeights, ExportFormat, Format, KeepImages, MaskLoss, Method,
    Norm, Optimizer, OutputFormat, Pretrained, ResizeMode, RiskLevel, Schedule, Split,
)
from qrs.errors import QrsError

if TYPE_CHECKING:
    from qrs.extract import ScoreOptions
    from qrs.records import Filters, RecordSettings

app = typer.Typer(
    name="qrs",
    help="Explainable visual inspection: a ResNet pass/fail classifier, Grad-CAM++ maps and a "
    "Quality Risk Score (QRS) per part.",
    no_args_is_help=True,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"], "show_default": True},
    pretty_exceptions_enable=False,
)


@app.command()
def synth(
    out: Annotated[Path, typer.Option(help="Directory to write the raw synthetic dataset into.")],
    layout: Annotated[Format, typer.Option(help="Raw layout to write.")] = "ksdd2",
    n_train: Annotated[int, typer.Option(help="Number of training images (all images for folder).")] = 200,
    n_test: Annotated[int, typer.Option(help="Number of test images.")] = 100,
    defect_rate: Annotated[float, typer.Option(help="Share of defective parts in each split.")] = 0.2,
    size: Annotated[str, typer.Option(help="Image size WIDTHxHEIGHT in pixels (KSDD2 is about 230x630).")] = "230x630",
    seed: Annotated[int, typer.Option(help="Random seed: the same seed writes the same bytes.")] = 0,
) -> None:
    """Write synthetic inspection images in a raw dataset layout (the demo's and the tests' data).

    Textured parts with scratches, spots, cracks and dents, and their exact masks.
    """
    from qrs.data.synth import parse_size, synthesize

    try:
        summary = synthesize(out, layout, n_train=n_train, n_test=n_test, defect_rate=defect_rate,
                             size=parse_size(size), seed=seed)
    except ValueError as exc:
        raise QrsError(str(exc)) from exc
    typer.echo(f"wrote {layout} dataset to {out}: {summary['counts']}")


@app.command()
def prepare(
    src: Annotated[Path, typer.Option(help="Root directory of the raw dataset.")],
    out: Annotated[Path, typer.Option(help="Directory of the prepared dataset to create.")],
    format: Annotated[Format, typer.Option("--format", help="Raw layout.")] = "ksdd2",
    img_size: Annotated[list[int], typer.Option(help="Size of the prepared images in pixels: H W (height width), "
                                                     "or one number for a square.")] = [224],
    resize: Annotated[ResizeMode, typer.Option(help="stretch (the paper's: every image resized to H x W) or pad "
                                                    "(fit inside H x W keeping the aspect ratio, centred on "
                                                    "black).")] = "stretch",
    roi: Annotated[str, typer.Option(help="Region of interest: full (whole image), auto (Otsu: the part against "
                                          "its background) or a JSON FILE of relative boxes/polygons per image id (or one list for every image).")] = "full",
    val_fraction: Annotated[float, typer.Option(help="Share of the training images held out for validation "
                                                      "(stratified, seeded).")] = 0.2,
    test_fraction: Annotated[float, typer.Option(help="Share held out for testing, for layouts without a test split.")] = 0.15,
    seed: Annotated[int, typer.Option(help="Seed of the split.")] = 0,
    num_workers: Annotated[int, typer.Option(help="Worker processes decoding and resizing images.")] = 1,
    strict: Annotated[bool, typer.Option(help="Stop at the first bad file (exit code 2) instead of skipping it.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output directory.")] = False,
    good: Annotated[Optional[list[str]], typer.Option(help="folder: directory of good images, relative to --src "
                                                         "(repeatable). (default: good)")] = None,
    defect: Annotated[Optional[list[str]], typer.Option(help="folder: directory of defective images, relative to "
                                                           "--src (repeatable; subfolders name the defect type). "
                                                           "(default: defect)")] = None,
    masks: Annotated[Optional[str], typer.Option(help="folder: directory of masks relative to --src, matched by "
                                                      "file stem. (default: masks, when it exists)")] = None,
    mask_suffix: Annotated[str, typer.Option(help="folder: suffix of a mask's stem after the image's stem, e.g. _mask. (default: none)")] = "",
    boxes: Annotated[Optional[Path], typer.Option(help="folder: CSV of defect boxes in pixels: "
                                                       "image,x0,y0,x1,y1[,defect_type], image relative to --src. (default: none)")] = None,
    split_file: Annotated[Optional[Path], typer.Option(help="CSV of 'id or source path, split' (train/val/test). (default: none: "
                                                             "stratified seeded splits)")] = None,
) -> None:
    """Prepare a raw dataset (KSDD2, Sensum SODF or your own folders) for training.

    Writes RGB images of one size (H x W), masks, relative ROI/defect coordinates, an index with
    stratified splits, and metadata.
    """
    from qrs.data.preparation import prepare as run_prepare

    ds = run_prepare(
        format, src, out, img_size=img_size, resize=resize, roi=roi, val_fraction=val_fraction,
        test_fraction=test_fraction, seed=seed, num_workers=num_workers, strict=strict, overwrite=overwrite,
        good=good or ["good"], defect=defect or ["defect"], masks=masks, mask_suffix=mask_suffix,
        boxes=boxes, split_file=split_file,
    )
    typer.echo(ds.summary())


@app.command()
def train(
    data_root: Annotated[Path, typer.Option("--data_root", "--data-root", help="Prepared dataset (from `qrs prepare`).")],
    num_epochs: Annotated[int, typer.Option("--num_epochs", "--num-epochs", help="Maximum number of epochs.")] = 100,
    batch_size: Annotated[int, typer.Option("--batch_size", "--batch-size",
                                            help="Batch size per process (under torchrun the effective batch is "
                                                 "batch_size x number of processes).")] = 64,
    learning_rate: Annotated[float, typer.Option("--learning_rate", "--learning-rate", "--lr",
                                                 help="Adam learning rate (used as given, whatever the number "
                                                      "of processes). The paper's 1e-4 leaves a pretrained "
                                                      "backbone near chance after the tens of steps a few hundred "
                                                      "parts give: see docs/architecture.md, 'Training defaults "
                                                      "and the agreement of QRS (measured)'.")] = 1e-3,
    patience: Annotated[int, typer.Option(help="Early stopping: epochs without a lower validation loss.")] = 10,
    best_loss_path: Annotated[Optional[Path], typer.Option("--best_loss_path", "--best-loss-path",
                                                           help="Checkpoint of the lowest validation loss. "
                                                                "(default: OUT/best_loss.pt)")] = None,
    best_acc_path: Annotated[Optional[Path], typer.Option("--best_acc_path", "--best-acc-path",
                                                          help="Checkpoint of the highest validation accuracy. "
                                                               "(default: OUT/best_acc.pt)")] = None,
    arch: Annotated[Arch, typer.Option(help="torchvision ResNet (the paper uses resnet50) or timm's "
                                            "efficientnet_lite0 (its ImageNet weights come installed).")] = "resnet50",
    output_stride: Annotated[int, typer.Option(help="Input pixels per cell of the explained map: 32 (the "
                                                    "backbone's own, the paper's; 7 x 7 at 224 px), 16 or 8 (the "
                                                    "last stage(s) dilated: a 14 x 14 or 28 x 28 map at 224 px, "
                                                    "same weights, more compute).")] = 32,
    pretrained: Annotated[Pretrained, typer.Option(help="Start from ImageNet weights (ResNets: downloaded by "
                                                        "torchvision; efficientnet_lite0: from the installed "
                                                        "package, offline) or from scratch.")] = "none",
    weights: Annotated[Optional[Path], typer.Option(help="Start from a torchvision-format state dict file. (default: none)")] = None,
    seed: Annotated[int, typer.Option(help="Seed: same seed and data give the same checkpoint on CPU.")] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or mps.")] = "auto",
    num_workers: Annotated[int, typer.Option("--num_workers", "--num-workers", help="DataLoader worker processes.")] = 0,
    amp: Annotated[bool, typer.Option(help="Mixed precision (float16 on CUDA, bfloat16 on CPU).")] = False,
    class_weights: Annotated[ClassWeights, typer.Option(help="auto: weight the loss by inverse class frequency.")] = "auto",
    augment: Annotated[Augment, typer.Option(help="none, flip (h/v flips) or standard (flips, 90-degree turns, "
                                                  "brightness/contrast).")] = "flip",
    precise_bn: Annotated[bool, typer.Option(help="Recompute the BatchNorm statistics on the training images after "
                                                  "every epoch, before validation (with few steps the running "
                                                  "statistics lag behind the weights).")] = False,
    optimizer: Annotated[Optimizer, typer.Option(help="adam (the paper's) or adamw (decoupled weight decay).")] = "adam",
    schedule: Annotated[Schedule, typer.Option(help="Learning-rate schedule, stepped every batch: constant, cosine "
                                                    "(decay to 0) or onecycle (warm up to the learning rate, then "
                                                    "anneal).")] = "constant",
    warmup_epochs: Annotated[float, typer.Option(help="Linear warm-up in epochs (fractions allowed) for constant and "
                                                      "cosine; for onecycle the rising phase (0: 30% of the run).")] = 0.0,
    weight_decay: Annotated[float, typer.Option(help="Weight decay of the optimiser.")] = 0.0,
    label_smoothing: Annotated[float, typer.Option(help="Label smoothing of the cross-entropy loss (bounds the "
                                                        "logits, so defect evidence is on a similar scale across "
                                                        "parts).")] = 0.0,
    mask_loss: Annotated[MaskLoss, typer.Option(help="Mask guidance (docs/method.md#mask-guided-training): energy "
                                                     "adds, for defective training images with a mask or boxes, "
                                                     "1 - (share of the Grad-CAM++ map inside the dilated defect) "
                                                     "to the loss; none: classification loss only (the paper's); "
                                                     "auto: energy when the training split has masks or boxes, "
                                                     "else none.")] = "auto",
    mask_weight: Annotated[float, typer.Option(help="Weight lambda of the mask term.")] = 3.0,
    mask_warmup: Annotated[float, typer.Option(help="Share of the training steps over which lambda ramps up "
                                                    "linearly from 0.")] = 0.2,
    mask_dilate: Annotated[Optional[int], typer.Option(help="Dilation of the defect masks in pixels. (default: 15 "
                                                            "at 224 px, scaled with the image size)",
                                                       show_default=False)] = None,
    mask_fraction: Annotated[float, typer.Option(help="Share of the defective training images whose mask is used "
                                                      "(seeded; mixed supervision).")] = 1.0,
    mask_map: Annotated[Method, typer.Option(help="The map the mask term shapes (the map QRS is computed on, "
                                                  "`qrs calibrate --method`).")] = "gradcam++",
    out: Annotated[Optional[Path], typer.Option(help="Run directory for last.pt and the epoch log. "
                                                     "(default: runs/ beside the data)")] = None,
    resume: Annotated[bool, typer.Option(help="Continue from OUT/last.pt (model, optimiser, epoch, RNG).")] = False,
    tensorboard: Annotated[Optional[Path], typer.Option(
        help="Also log to TensorBoard in this directory: the curves' values per step and per epoch, and every "
             "epoch the Grad-CAM++ overlays of 3 defective and 3 good validation parts. Needs the tensorboard "
             "extra (pip install -e '.[tensorboard]'). (default: none)")] = None,
) -> None:
    """Train the pass/fail classifier; keep the best-loss and best-accuracy checkpoints.

    Every epoch OUT/log.csv and the training curves OUT/curves.png (and .svg) are rewritten.
    """
    from qrs.distributed import is_main_process
    from qrs.train import TrainConfig, train as run_train

    result = run_train(TrainConfig(
        data_root=data_root, out=out, arch=arch, output_stride=output_stride, pretrained=pretrained, weights=weights, num_epochs=num_epochs,
        batch_size=batch_size, learning_rate=learning_rate, optimizer=optimizer, schedule=schedule,
        warmup_epochs=warmup_epochs, weight_decay=weight_decay, label_smoothing=label_smoothing,
        mask_loss=mask_loss, mask_weight=mask_weight, mask_warmup=mask_warmup, mask_dilate=mask_dilate,
        mask_fraction=mask_fraction, mask_map=mask_map,
        patience=patience, seed=seed,
        device=device, num_workers=num_workers, amp=amp, class_weights=class_weights, augment=augment,
        precise_bn=precise_bn,
        best_loss_path=best_loss_path, best_acc_path=best_acc_path, resume=resume, tensorboard=tensorboard,
    ))
    if result.history and is_main_process():
        last = result.history[-1]
        typer.echo(f"trained {len(result.history)} epochs{' (early stop)' if result.stopped_early else ''}; "
                   f"last val loss {last['val_loss']:.4f}, acc {last['val_acc']:.4f}; checkpoints: "
                   f"{result.best_loss_path}, {result.best_acc_path}, {result.last_path}")


NResamplesOpt = Annotated[int, typer.Option("--n-resamples", help="Bootstrap resamples of the 95% confidence "
                                                                    "intervals (stratified by class, seeded); 0: no "
                                                                    "intervals.")]


@app.command()
def evaluate(
    data_root: Annotated[Path, typer.Option("--data_root", "--data-root", help="Prepared dataset.")],
    model: Annotated[list[Path], typer.Option(help="Checkpoint to evaluate (repeatable).")],
    split: Annotated[Split, typer.Option(help="Split to evaluate on.")] = "test",
    out: Annotated[Optional[Path], typer.Option(help="metrics.json to write (predictions.csv goes beside it). (default: none, print only)")] = None,
    batch_size: Annotated[int, typer.Option("--batch_size", "--batch-size", help="Batch size.")] = 64,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or mps.")] = "auto",
    num_workers: Annotated[int, typer.Option("--num_workers", "--num-workers", help="DataLoader workers.")] = 0,
    n_resamples: NResamplesOpt = 1000,
) -> None:
    """F1 (the paper's table), precision, recall, accuracy, AP, AUROC and confusion per checkpoint.

    F1, precision, recall, AP and AUROC come with 95% stratified bootstrap intervals: 0.964 [0.941, 0.982].
    """
    from qrs.evaluate import evaluate as run_evaluate, format_table

    results = run_evaluate(data_root, list(model), split=split, out=out, batch_size=batch_size, device=device,
                           num_workers=num_workers, n_resamples=n_resamples)
    typer.echo(format_table(results))
    if out:
        typer.echo(f"wrote {out}")


@app.command()
def score(
    images: Annotated[list[Path], typer.Argument(help="Image files, or directories searched recursively for images.",
                                                 show_default=False)],
    model: Annotated[Path, typer.Option(help="Checkpoint, or with --backend onnx a model from `qrs export`; "
                                             "calibrated (`qrs calibrate`) for comparable QRS and risk levels, else "
                                             "scored with per-image min-max maps.")],
    roi: Annotated[str, typer.Option(help="Region of interest: full (whole image), auto (Otsu: the part against its "
                                          "background) or a JSON FILE of relative boxes/polygons per image file "
                                          "name or stem (or one list for all).")] = "full",
    out: Annotated[Path, typer.Option(help="Directory for scores.jsonl or scores.csv, and overlays/.")] = Path("."),
    format: Annotated[OutputFormat, typer.Option("--format", help="Output format.")] = "jsonl",
    overlay: Annotated[bool, typer.Option(help="Write a PNG per image: the heat map over the image, the ROI outline "
                                               "and the outline of the region over the threshold.")] = False,
    batch_size: Annotated[int, typer.Option("--batch_size", "--batch-size", help="Images per batch.")] = 16,
    resize: Annotated[Optional[ResizeMode], typer.Option(help="How images are resized to the model's input: stretch "
                                                              "or pad. Default: the training data's mode when its "
                                                              "meta.json is still there, else stretch.",
                                                         show_default=False)] = None,
    backend: BackendOpt = "torch",
    device: DeviceOpt = "auto",
    db: Annotated[Optional[str], typer.Option(help="Also keep an inspection record of every image in this database "
                                                   "(SQLAlchemy URL, e.g. sqlite:///qrs-records.sqlite or "
                                                   "postgresql+psycopg://user@host/db). (default: no records)",
                                              show_default=False)] = None,
    station: StationOpt = None,
    keep_images: KeepImagesOpt = "flagged",
    keep_days: KeepDaysOpt = 30,
    images_dir: ImagesDirOpt = None,
) -> None:
    """Score raw images of new parts: pass/fail, p_defective, QRS, risk level, optional overlays.

    Unreadable files get a row with their error and exit code 1 at the end; the others are still scored.
    With --db, records that could not be kept also end with exit code 1 (the scores are written).
    """
    from qrs.predict import score_files
    from qrs.records import FileRecording

    settings = _record_settings(db, station, keep_images, keep_days, images_dir)
    recording = FileRecording(settings) if settings is not None else None
    result = score_files(images, model, out=out, fmt=format, roi=roi, overlay=overlay, batch_size=batch_size,
                         device=device, resize=resize, backend=backend, recording=recording)
    if result.note:
        typer.echo(f"note: {result.note}", err=True)
    typer.echo(result.headline())
    if recording is not None:
        typer.echo(recording.summary(), err=bool(recording.lost))
    if result.n_errors or (recording is not None and recording.lost):
        raise typer.Exit(1)


@app.command()
def serve(
    model: Annotated[Path, typer.Option(help="Checkpoint to serve, or with --backend onnx a model from `qrs export`.")],
    host: Annotated[str, typer.Option(help="Address to bind; loopback unless the service must be reachable from "
                                           "other machines.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    api_key: Annotated[Optional[str], typer.Option(envvar="QRS_API_KEY", show_default=False,
                                                   help="Require 'Authorization: Bearer KEY' on every /v1 route "
                                                        "(health routes stay open). Default: no key.")] = None,
    max_upload_mb: Annotated[float, typer.Option(help="Largest request body in MB (413 above).")] = 20,
    max_batch: Annotated[int, typer.Option(help="Most images per model batch, gathered from concurrent requests.")] = 16,
    max_wait_ms: Annotated[float, typer.Option(help="Longest wait for more requests to fill a batch.")] = 5,
    resize: Annotated[Optional[ResizeMode], typer.Option(help="stretch or pad. Default: the training data's mode when "
                                                              "its meta.json is still there, else stretch.",
                                                         show_default=False)] = None,
    backend: BackendOpt = "torch",
    device: DeviceOpt = "auto",
    db: Annotated[str, typer.Option(help="Where to keep an inspection record of every scored image: an SQLAlchemy "
                                         "URL (an SQLite file, or e.g. postgresql+psycopg://user@host/db), or none "
                                         "for no records.")] = "sqlite:///qrs-records.sqlite",
    station: StationOpt = None,
    keep_images: KeepImagesOpt = "flagged",
    keep_days: KeepDaysOpt = 30,
    images_dir: ImagesDirOpt = None,
) -> None:
    """Serve the model over HTTP: POST /v1/score, GET /v1/model, the inspection records (/v1/inspections,
    /v1/drift), /healthz, /readyz, /docs and a web page at /."""
    from qrs.serve import run

    run(model, host=host, port=port, api_key=api_key, max_upload_mb=max_upload_mb, max_batch=max_batch,
        max_wait_ms=max_wait_ms, device=device, resize=resize, backend=backend,
        records=_record_settings(db, station, keep_images, keep_days, images_dir))


@app.command()
def history(
    db: DbOpt,
    since: SinceOpt = None,
    until: UntilOpt = None,
    station: Annotated[Optional[str], typer.Option(help="Only this station. (default: all)", show_default=False)] = None,
    prediction: Annotated[Optional[int], typer.Option(min=0, max=1, help="Only flagged (1) or passed (0) parts. "
                                                                         "(default: all)", show_default=False)] = None,
    risk_level: Annotated[Optional[RiskLevel], typer.Option(help="Only this risk level. (default: all)",
                                                            show_default=False)] = None,
    reviewed: Annotated[Optional[bool], typer.Option("--reviewed/--not-reviewed", help="Only reviewed or only "
                                                     "unreviewed parts. (default: all)", show_default=False)] = None,
    csv: Annotated[Optional[Path], typer.Option(help="Also write the table as CSV to this file. (default: none)",
                                                show_default=False)] = None,
) -> None:
    """What the inspection records say, per station and per UTC day: parts, unscorable, flagged parts and their
    share, QRS quantiles, and the share of passed parts with QRS > 0."""
    from qrs.history import history as run_history
    from qrs.records import RecordStore

    store = RecordStore(db).open()
    typer.echo(run_history(store, _filters(since, until, station, prediction, risk_level, reviewed), csv))
    if csv:
        typer.echo(f"wrote {csv}")


reviews_app = typer.Typer(help="The inspectors' reviews of inspection records.", no_args_is_help=True)
app.add_typer(reviews_app, name="reviews")


@reviews_app.command("export")
def reviews_export(
    db: DbOpt,
    out: Annotated[Path, typer.Option(help="Folder dataset to write: good/, defect/, split.csv, records.csv.")],
    images_dir: ImagesDirOpt = None,
    val_fraction: Annotated[float, typer.Option(help="Share of the parts in val (by their image's SHA-256, so "
                                                     "a part keeps its split in later exports).")] = 0.2,
    test_fraction: Annotated[float, typer.Option(help="Share of the parts in test.")] = 0.2,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output folder.")] = False,
) -> None:
    """Write the reviewed parts whose images were kept as a folder dataset, labelled by the inspectors' truth,
    for `qrs prepare --format folder --src OUT --split-file OUT/split.csv`."""
    from qrs.history import export_reviews
    from qrs.records import RecordStore

    store = RecordStore(db, images_dir=images_dir).open()
    result = export_reviews(store, out, val_fraction=val_fraction, test_fraction=test_fraction, overwrite=overwrite)
    typer.echo(result.headline())


def _record_settings(db: str | None, station: str | None, keep_images: str, keep_days: float,
                     images_dir: Path | None) -> "RecordSettings | None":
    from qrs.records import RecordSettings

    return RecordSettings.from_option(db, station=station, keep_images=keep_images, keep_days=keep_days,
                                      images_dir=images_dir)


def _filters(since: datetime | None, until: datetime | None, station: str | None, prediction: int | None,
             risk_level: str | None, reviewed: bool | None) -> "Filters":
    from qrs.records import Filters

    return Filters(since=since, until=until, station=station, prediction=prediction, risk_level=risk_level,
                   reviewed=reviewed)


@app.command()
def export(
    model: Annotated[Path, typer.Option(help="Checkpoint to export (calibrated for the normalised map, QRS and risk "
                                             "cuts of `qrs score`; else they use per-image min-max maps).")],
    out: Annotated[Path, typer.Option(help="ONNX file to write (atomically; one self-contained file).")],
    format: Annotated[ExportFormat, typer.Option("--format", help="Export format.")] = "onnx",
    opset: Annotated[int, typer.Option(help="ONNX opset (18 or newer; the runtime on the line must support it).")] = 18,
    batch: Annotated[str, typer.Option(help="Batch size of the graph: dynamic (any) or a fixed N.")] = "dynamic",
    resize: Annotated[Optional[ResizeMode], typer.Option(help="Resize mode recorded for clients: stretch or pad. "
                                                              "Default: the training data's mode when its "
                                                              "meta.json is still there, else stretch.",
                                                         show_default=False)] = None,
) -> None:
    """Export the classifier with its Grad-CAM++ map and QRS as one ONNX graph, for ONNX Runtime on the line.

    Input: uint8 images B x H x W x 3 (RGB, resized like the training data; normalisation inside). Outputs:
    logits, p_defective, raw_map, map, normalized_map, qrs. The calibration, threshold and risk cuts go into
    the model's metadata. The file is checked against PyTorch with ONNX Runtime before it is written.
    """
    from qrs.export import export_onnx, parse_batch

    result = export_onnx(model, out, fmt=format, opset=opset, batch=parse_batch(batch), resize=resize)
    typer.echo(result.headline())


def _score_options(method: str, threshold: float, norm: str, aggregation: str, compat: bool) -> "ScoreOptions":
    from qrs.extract import ScoreOptions

    return ScoreOptions(method=method, threshold=threshold, norm=norm, aggregation=aggregation, compat=compat)


MethodOpt = Annotated[Method, typer.Option(help="Class activation map method (the paper's is gradcam++).")]
ThresholdOpt = Annotated[float, typer.Option(help="QRS threshold tau on the normalised map, in (0, 1].")]
NormOpt = Annotated[Norm, typer.Option(help="dataset: divide by the calibration scale (comparable across images); "
                                            "image: per-image min-max.")]
AggregationOpt = Annotated[Aggregation, typer.Option(help="mass: mean of M over tau in the ROI; area: share of the "
                                                          "ROI over tau.")]
DeviceOpt = Annotated[str, typer.Option(help="auto, cpu, cuda or mps.")]
StationOpt = Annotated[Optional[str], typer.Option(help="Station recorded with each part. (default: this "
                                                      "machine's host name)", show_default=False)]
KeepImagesOpt = Annotated[KeepImages, typer.Option(help="Which images to keep with their records (with the overlay): "
                                                        "none, flagged (failed parts) or all.")]
KeepDaysOpt = Annotated[float, typer.Option(help="Days to keep those images (those of reviewed parts stay).")]
ImagesDirOpt = Annotated[Optional[Path], typer.Option(help="Where kept images go. (default: beside an SQLite "
                                                           "file, <name>-images/; else qrs-images/)",
                                                      show_default=False)]
DbOpt = Annotated[str, typer.Option(help="The records database (SQLAlchemy URL, e.g. sqlite:///qrs-records.sqlite).")]
SinceOpt = Annotated[Optional[datetime], typer.Option(help="From this time on (UTC unless it has an offset). "
                                                             "(default: all)", show_default=False)]
UntilOpt = Annotated[Optional[datetime], typer.Option(help="Before this time. (default: all)", show_default=False)]
BackendOpt = Annotated[BackendName, typer.Option(help="torch: a checkpoint run by PyTorch; onnx: a model from `qrs "
                                                      "export` run by ONNX Runtime (same rows).")]


@app.command()
def calibrate(
    model: Annotated[Path, typer.Option(help="Checkpoint to calibrate (rewritten atomically with the result).")],
    data_root: Annotated[Path, typer.Option("--data_root", "--data-root", help="Prepared dataset.")],
    method: MethodOpt = "gradcam++",
    threshold: ThresholdOpt = 0.9,
    norm: NormOpt = "dataset",
    aggregation: AggregationOpt = "mass",
    anchor: Annotated[Anchor, typer.Option(help="Parts whose map peaks set the scale: good (validation parts; "
                                                "scale = quantile / threshold) or defective (training parts; "
                                                "scale = quantile, the first version's rule).")] = "good",
    quantile: Annotated[Optional[float], typer.Option(help="Quantile of those peaks. (default: 0.99 for good, "
                                                           "0.5 for defective)", show_default=False)] = None,
    batch_size: Annotated[int, typer.Option("--batch_size", "--batch-size", help="Batch size.")] = 32,
    num_workers: Annotated[int, typer.Option("--num_workers", "--num-workers", help="DataLoader workers.")] = 0,
    device: DeviceOpt = "auto",
) -> None:
    """Store the QRS calibration scale and the risk cut points in a checkpoint.

    Default: scale = 0.99 quantile of the map peaks of the good validation parts / threshold, so about
    99% of good parts score QRS 0. Cuts: from the validation split; the output says what each risk level
    holds there. The rules: docs/method.md#calibration and docs/method.md#risk-levels.
    """
    from qrs.distributed import is_main_process
    from qrs.extract import calibrate as run_calibrate, describe_calibration

    cal = run_calibrate(model, data_root, options=_score_options(method, threshold, norm, aggregation, False),
                        anchor=anchor, quantile=quantile, batch_size=batch_size, device=device,
                        num_workers=num_workers)
    if not is_main_process():
        return
    typer.echo(f"calibrated {model}: {describe_calibration(cal)}\nrisk levels: {cal['risk_note']}")


@app.command()
def extract(
    data_dir: Annotated[Path, typer.Option("--data_dir", "--data-dir", help="Prepared dataset.")],
    model_path: Annotated[Path, typer.Option("--model_path", "--model-path", help="Checkpoint to explain.")],
    coords_path: Annotated[Optional[Path], typer.Option("--coords_path", "--coords-path",
                                                        help="coords.pkl/json of relative ROI/defect coordinates. "
                                                             "(default: the prepared dataset's)")] = None,
    output_prefix: Annotated[str, typer.Option("--output_prefix", "--output-prefix",
                                               help="Prefix of the npz and csv files.")] = "gradcam_weights",
    excel_prefix: Annotated[Optional[str], typer.Option("--excel_prefix", "--excel-prefix",
                                                        help="Prefix of the xlsx files. (default: over_<threshold>_weights)")] = None,
    modes: Annotated[list[str], typer.Option(help="Splits to extract: train test (also the README's [\"train\", \"test\"]).")] = ["train", "test"],
    batch_size: Annotated[int, typer.Option("--batch_size", "--batch-size", help="Batch size (per process).")] = 32,
    num_workers: Annotated[int, typer.Option("--num_workers", "--num-workers", help="DataLoader workers.")] = 0,
    threshold: ThresholdOpt = 0.9,
    img_size: Annotated[Optional[list[int]], typer.Option("--img_size", "--img-size",
                                                          help="Expected image size H W, or one number for a square "
                                                               "(checked against the data and the model). (default: "
                                                               "the data's)")] = None,
    method: MethodOpt = "gradcam++",
    norm: NormOpt = "dataset",
    aggregation: AggregationOpt = "mass",
    compat: Annotated[bool, typer.Option(help="Reproduce the grad-cam package's maps (its 1e-6 and per-image "
                                              "min-max); implies --norm image.")] = False,
    out_dir: Annotated[Path, typer.Option(help="Directory of the output files.")] = Path("."),
    device: DeviceOpt = "auto",
) -> None:
    """Grad-CAM++ maps and the QRS of every image of the chosen splits (npz, xlsx and csv per split)."""
    from qrs.extract import extract as run_extract

    result = run_extract(data_dir, model_path, modes=modes, coords_path=coords_path, output_prefix=output_prefix,
                         excel_prefix=excel_prefix, out_dir=out_dir,
                         options=_score_options(method, threshold, norm, aggregation, compat),
                         batch_size=batch_size, num_workers=num_workers, img_size=img_size, device=device)
    for mode, files in result.files.items():
        typer.echo(f"{mode}: {len(result.rows[mode])} images -> {', '.join(str(f) for f in files)}")


@app.command()
def analyze(
    extract_dir: Annotated[Path, typer.Option(help="Directory holding the outputs of `qrs extract`.")],
    metrics: Annotated[Optional[Path], typer.Option(help="metrics.json of `qrs evaluate`, for the F1 table. (default: none, no F1 table)")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Output directory. (default: EXTRACT_DIR/analysis)")] = None,
    output_prefix: Annotated[str, typer.Option("--output_prefix", "--output-prefix",
                                               help="Prefix of the extract files to read.")] = "gradcam_weights",
    n_resamples: NResamplesOpt = 1000,
    sweep: Annotated[bool, typer.Option(help="Threshold sweep: QRS AUROC, Mann-Whitney p and good parts at 0 for "
                                             "tau in 0.5 ... 0.95, from the stored maps (no model run).")] = True,
    faithfulness: Annotated[bool, typer.Option(help="Deletion test (ROAD): remove the 5/10/20/50% most and least "
                                                    "relevant pixels of each map and run the model again; needs the "
                                                    "extract's checkpoint and prepared data, 8 forward passes per "
                                                    "part.")] = False,
    faithfulness_split: Annotated[Split, typer.Option(help="Split of the deletion test.")] = "test",
    batch_size: Annotated[int, typer.Option("--batch_size", "--batch-size",
                                            help="Images per forward pass of the deletion test.")] = 32,
    num_workers: Annotated[int, typer.Option("--num_workers", "--num-workers",
                                             help="DataLoader workers imputing the deletion test's images.")] = 0,
    device: DeviceOpt = "auto",
) -> None:
    """Statistics, distribution plots and the self-contained HTML report of an extraction.

    With "How sure are these numbers": bootstrap intervals, the threshold sweep and (--faithfulness) the deletion test.
    """
    from qrs.report import analyze as run_analyze

    result = run_analyze(extract_dir, metrics=metrics, out=out, output_prefix=output_prefix, n_resamples=n_resamples,
                         sweep=sweep, faithfulness=faithfulness, faithfulness_split=faithfulness_split,
                         device=device, batch_size=batch_size, num_workers=num_workers)
    typer.echo(result.headline())


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Directory for everything the demo writes.")] = Path("demo-out"),
    overwrite: Annotated[bool, typer.Option(help="Start again in an existing OUT.")] = False,
) -> None:
    """Run the whole pipeline on built-in synthetic data (what `make demo` runs).

    synth, prepare, train, evaluate, calibrate, extract, analyze; an interrupted demo continues.
    """
    from qrs.demo import run_demo

    run_demo(out, overwrite=overwrite)


REPEAT_SETS = ("seed", "out", "resume", "best_loss_path", "best_acc_path")
"""Train options that ``qrs repeat`` sets per seed itself."""


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def repeat(
    ctx: typer.Context,
    out: Annotated[Path, typer.Option(help="Directory of the seeds' runs (OUT/seed-<k>) and of repeat.csv/json.")],
    seeds: Annotated[list[int], typer.Option(help="Training seeds, e.g. --seeds 0 1 2 3 4.")] = [0, 1, 2, 3, 4],
    faithfulness: Annotated[bool, typer.Option(help="Run the deletion test (qrs analyze --faithfulness) on each "
                                                    "seed's test split; its area goes into the table.")] = False,
) -> None:
    """Train, evaluate, calibrate, extract and analyze once per seed; a table of mean ± std over the seeds.

    The `qrs train` options follow a `--`, e.g.

    qrs repeat --seeds 0 1 2 --out runs/rep -- --data_root data --arch resnet18

    A seed already complete is skipped. Under torchrun every process trains, calibrates and extracts.
    """
    from qrs.pipeline import repeat as run_repeat
    from qrs.train import TrainConfig

    train_command = typer.main.get_command(app).commands["train"]
    try:
        parsed = train_command.make_context("qrs repeat ... --", list(ctx.args))
    except typer.TyperException as exc:
        raise QrsError(f"after --, the `qrs train` options: {exc.format_message()}") from exc
    given = [name for name in REPEAT_SETS
             if getattr(parsed.get_parameter_source(name), "name", "") == "COMMANDLINE"]
    if given:
        raise QrsError(f"qrs repeat sets {', '.join('--' + g for g in given)} itself (per seed, under --out): "
                       "leave them out of the train options")
    run_repeat(TrainConfig(**parsed.params), list(seeds), out, faithfulness=faithfulness)


MULTI_VALUE_OPTIONS = ("--modes", "--seeds", "--img-size", "--img_size")
"""Options that take several values after one flag."""


def _expand_multi_value_options(argv: list[str], names: tuple[str, ...] = MULTI_VALUE_OPTIONS) -> list[str]:
    """``--modes train test`` (the paper's spelling) -> ``--modes train --modes test``; the same for
    ``--seeds`` and ``--img-size H W`` (a negative number is a value, so that it reaches the size check).
    Nothing after ``--`` changes (``qrs repeat``'s train options)."""
    out: list[str] = []
    current = None
    for k, arg in enumerate(argv):
        if arg == "--":
            return out + argv[k:]
        if arg in names:
            current = arg
        elif arg.startswith("-") and not arg[1:].isdigit():
            current = None
        elif current is not None and out[-1] != current:
            out.append(current)
        out.append(arg)
    return out


def _leave_worker(status: int, message: str = "") -> None:
    """In a torchrun worker, :func:`qrs.distributed.leave`; elsewhere (torch not even imported) nothing."""
    if "torch.distributed" in sys.modules:
        from qrs.distributed import leave

        leave(status, message)


def main() -> None:
    """Console entry point: user errors print one line and exit with status 2. A torchrun worker that
    fails exits at once with its status (2, or 1 with its traceback for any other error), before the
    process group's teardown lets a peer fail first and torchrun report the peer instead."""
    try:
        app(args=_expand_multi_value_options(sys.argv[1:]), prog_name="qrs")
    except QrsError as exc:
        typer.secho(f"error: {exc}", err=True, fg=typer.colors.RED)
        _leave_worker(2)
        sys.exit(2)
    except Exception:
        _leave_worker(1, traceback.format_exc())
        raise
