"""``qrs score``: pass/fail, p_defective, QRS, risk level and overlay of raw images of new parts.

A raw image is resized exactly like the prepared data the model was trained on (to its height x
width), and its ROI (given relative to the original image, like ``qrs prepare``'s) is rasterised on
the same grid. Batches go
through the one scoring path of :func:`qrs.extract.score_batch` (the forward pass on the backend: PyTorch,
or ONNX Runtime on a model from ``qrs export``, then :func:`qrs.extract.score_maps`), so a part gets the
same numbers here, in the HTTP service (which uses :class:`Scorer` too) and in ``qrs extract``.
"""

from __future__ import annotations

import csv
import io
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn
from tqdm.auto import tqdm

from qrs import __version__
from qrs.atomic import write_bytes, write_text
from qrs.cam import CamResult
from qrs.choices import BACKENDS, OUTPUT_FORMATS, RESIZE_MODES
from qrs.data.regions import Region, RoiSpec, load_roi, rasterize, roi_regions, to_prepared
from qrs.errors import QrsError
from qrs.extract import ScoreOptions, calibration_source, model_cams, score_maps
from qrs.files import (
    Entries, file_problem, ignored_dirs_note, is_image_file, list_entries, name_problem, printable, shorten,
)
from qrs.images import ImageError, open_rgb, pad_geometry, resize_image
from qrs.model import load_checkpoint, model_output_stride, model_size, resolve_device
from qrs.overlay import png_bytes, render_overlay
from qrs.score import normalize_maps, risk_level
from qrs.scoring import scoring

CSV_COLUMNS = ("file", "verdict", "prediction", "p_defective", "qrs", "risk_level", "area", "n_over", "mean_over",
               "max_over", "peak", "norm", "overlay", "error")
OVERLAY_MAX_SIDE = 512
"""Longest side of an overlay PNG: big enough to see a defect, small enough to send back."""

def training_resize(meta: dict[str, Any]) -> str:
    """The resize mode of the model's training data.

    Checkpoints do not record it, but their training dataset's ``meta.json`` does: it is used when
    that dataset is still at the recorded path with the same hash; otherwise ``stretch`` (the
    default of ``qrs prepare``, and the paper's).
    """
    root = (meta.get("train_config") or {}).get("data_root")
    if root:
        try:
            data_meta = json.loads((Path(root) / "meta.json").read_text())
        except (OSError, UnicodeDecodeError, ValueError):
            data_meta = {}
        if data_meta.get("dataset_hash") == meta.get("dataset_hash") and data_meta.get("resize") in RESIZE_MODES:
            return str(data_meta["resize"])
    return "stretch"


@dataclass(frozen=True)
class Prepared:
    """One raw image made ready for the model: the input at the model's size, its ROI on the same grid,
    and (for an overlay) the original image at overlay size with its relative ROI regions."""

    name: str
    image: np.ndarray
    roi: np.ndarray
    regions: list[Region]
    orig_size: tuple[int, int]
    view: np.ndarray | None
    overlay_if_flagged: bool = False
    """Render the overlay (from ``view``) only when the part is flagged (fails)."""


@dataclass(frozen=True)
class Scored:
    """The result row of one image and, when asked for, its overlay PNG."""

    row: dict[str, Any]
    overlay_png: bytes | None = None


class Backend(Protocol):
    """What runs the forward pass of a :class:`Scorer`: PyTorch on a checkpoint (:class:`TorchBackend`) or
    ONNX Runtime on an exported model (:class:`qrs.runtime.OnnxBackend`)."""

    name: str
    meta: dict[str, Any]
    resize: str
    """The resize mode of the training data (the default of ``--resize``)."""

    def cams(self, images: Tensor, options: ScoreOptions) -> CamResult:
        """uint8 B x 3 x H x W images -> logits, raw and full-size maps."""
        ...


class TorchBackend:
    """A loaded checkpoint, run by PyTorch through :func:`qrs.extract.model_cams`."""

    name = "torch"

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.meta: dict[str, Any] = model.qrs_meta
        self.resize = training_resize(self.meta)

    def cams(self, images: Tensor, options: ScoreOptions) -> CamResult:
        return model_cams(self.model, images, options)


class Scorer:
    """A model with everything needed to score raw images the way it was calibrated (see
    :func:`qrs.scoring.scoring`), on either backend: the same rows from a checkpoint and from its exported
    ONNX model.
    """

    def __init__(self, model: nn.Module | Backend, *, resize: str | None = None) -> None:
        if resize is not None and resize not in RESIZE_MODES:
            raise QrsError(f"unknown resize mode {resize!r}; expected one of {', '.join(RESIZE_MODES)}")
        self.backend: Backend = TorchBackend(model) if isinstance(model, nn.Module) else model
        self.source: Path | None = None
        """The file the model was loaded from (None for a model built in memory)."""
        self.meta = self.backend.meta
        self.size = model_size(self.meta)
        self.resize = resize or self.backend.resize
        how = scoring(self.meta)
        self.options, self.scale, self.cuts, self.note = how.options, how.scale, how.cuts, how.note

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, device: str = "auto", resize: str | None = None,
             backend: str = "torch") -> "Scorer":
        """Load a checkpoint (backend ``torch``) or a model from ``qrs export`` (``onnx``) onto ``device``
        (auto, cpu, cuda or mps)."""
        if backend == "onnx":
            from qrs.runtime import OnnxBackend

            scorer = cls(OnnxBackend.load(path, device=device), resize=resize)
        elif backend != "torch":
            raise QrsError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
        elif Path(path).suffix == ".onnx":
            raise QrsError(f"{path} is an ONNX model: score it with --backend onnx (the torch backend reads "
                           "checkpoints)")
        else:
            scorer = cls(load_checkpoint(path, device=resolve_device(device)), resize=resize)
        scorer.source = Path(path)
        return scorer

    def info(self) -> dict[str, Any]:
        """What a client needs to know about the model and how it scores (``GET /v1/model``)."""
        calibration = self.meta.get("calibration") or {}
        return {
            "arch": self.meta["arch"],
            "img_size": list(self.size),
            "output_stride": model_output_stride(self.meta),
            "class_names": list(self.meta["class_names"]),
            "epoch": self.meta.get("epoch"),
            "resize": self.resize,
            "method": self.options.method,
            "threshold": self.options.threshold,
            "norm": self.options.norm,
            "aggregation": self.options.aggregation,
            "calibrated": bool(calibration),
            "scale": self.scale,
            "calibration": calibration_source(calibration) if calibration else None,
            "risk_cuts": {"low": self.cuts[0], "high": self.cuts[1]} if self.cuts else None,
            "note": self.note,
            "backend": self.backend.name,
            "qrs_version": __version__,
            "checkpoint_qrs_version": self.meta.get("qrs_version"),
        }

    def prepare(self, name: str, image: np.ndarray | Image.Image, roi: RoiSpec = "full", *,
                overlay: bool | Literal["flagged"] = False) -> Prepared:
        """Resize ``image`` (HxWx3 uint8, or an RGB Pillow image as :func:`qrs.images.open_rgb` gives) like
        the training data and rasterise its ROI on the same grid; ``overlay``: prepare an overlay for the
        image, or (``"flagged"``) only if it fails."""
        img = image if isinstance(image, Image.Image) else Image.fromarray(image)
        width, height = img.size
        regions = roi_regions(roi, name, img)
        grid = rasterize([to_prepared(r, (width, height), self.resize, self.size) for r in regions], *self.size)
        view = None
        if overlay:
            factor = min(1.0, OVERLAY_MAX_SIDE / max(width, height))
            size = (max(1, round(width * factor)), max(1, round(height * factor)))
            view = np.asarray(img.resize(size, Image.Resampling.BILINEAR))
        return Prepared(name, resize_image(img, self.size, self.resize), grid, regions, (width, height), view,
                        overlay == "flagged")

    @torch.inference_mode()
    def score(self, items: Sequence[Prepared]) -> list[Scored]:
        """Score prepared images as one batch, with an overlay for those prepared with ``overlay=True``."""
        images = torch.from_numpy(np.stack([it.image for it in items])).permute(0, 3, 1, 2)
        roi = torch.from_numpy(np.stack([it.roi for it in items]))
        cams = self.backend.cams(images, self.options)
        scored = score_maps(cams, roi, scale=self.scale, options=self.options)
        out = {k: scored[k].cpu() for k in ("prediction", "p_defective", "qrs", "area", "mean_over", "max_over", "peak",
                                            "n_over")}
        if any(item.view is not None for item in items):
            out["strength"] = normalize_maps(scored["maps"], norm=self.options.effective_norm, scale=self.scale,
                                             clip=False).cpu()
        levels = risk_level(out["qrs"], self.cuts) if self.cuts else None
        results = []
        for i, item in enumerate(items):
            row: dict[str, Any] = {
                "file": item.name,
                "verdict": "fail" if int(out["prediction"][i]) else "pass",
                "prediction": int(out["prediction"][i]),
                "p_defective": float(out["p_defective"][i]),
                "qrs": float(out["qrs"][i]),
            }
            if levels is not None:
                row["risk_level"] = levels[i]
            row.update({k: float(out[k][i]) for k in ("area", "mean_over", "max_over", "peak")})
            row["n_over"] = int(out["n_over"][i])
            row["norm"] = self.options.norm
            wanted = item.view is not None and (row["prediction"] == 1 or not item.overlay_if_flagged)
            png = self._overlay(item, item.view, out["strength"][i].numpy()) if wanted else None
            results.append(Scored(row, png))
        return results

    def _overlay(self, item: Prepared, view: np.ndarray, strength: np.ndarray) -> bytes:
        """The heat map of the evidence (:func:`qrs.overlay.evidence_view`) over the original image
        (``view``, at overlay size), with the ROI outline and the outline of the ROI's pixels at or over
        the threshold."""
        width, height = item.orig_size
        if self.resize == "pad":
            scale, off_x, off_y = pad_geometry(width, height, self.size)
            box = (off_x, off_y, off_x + width * scale, off_y + height * scale)
        else:
            box = (0.0, 0.0, float(self.size[1]), float(self.size[0]))
        view_h, view_w = view.shape[:2]
        strength_view = np.asarray(Image.fromarray(strength.astype(np.float32)).resize(
            (view_w, view_h), Image.Resampling.BILINEAR, box=box))
        roi = rasterize(item.regions, view_h, view_w)
        return png_bytes(render_overlay(view, strength_view, self.options.threshold, roi))


class Recording(Protocol):
    """Where :func:`score_files` hands what it scored, a batch at a time (``qrs score --db``:
    :class:`qrs.records.FileRecording`)."""

    overlays: bool | Literal["flagged"]
    """The overlays it needs (besides those of ``--overlay``): every image's, the flagged ones' or none."""

    def start(self, scorer: Scorer) -> None:
        """Called once the model is loaded."""

    def batch(self, items: list[tuple[Path, dict[str, Any], bytes | None, float]]) -> None:
        """(file, row, overlay PNG, seconds from reading the file to its row) of each image since the last call."""


def collect_images(inputs: Sequence[str | os.PathLike[str]]) -> Entries:
    """Files as given, and the entries with an image suffix under directories (recursively, sorted),
    special files included (they get error rows); directories with an image suffix are counted."""
    files: list[Path] = []
    image_dirs = 0
    for entry in map(Path, inputs):
        if entry.is_dir():
            found = list_entries(entry)
            files.extend(p for p in found.files if is_image_file(p))
            image_dirs += found.image_dirs
        else:
            files.append(entry)
    if not files:
        raise QrsError(f"no image files in {', '.join(printable(p) for p in inputs) or 'the arguments'}")
    return Entries(files, image_dirs)


@dataclass
class ScoreFilesResult:
    """The rows (input order), the file they were written to, the number of unreadable images and of
    directories with an image suffix that were ignored."""

    rows: list[dict[str, Any]]
    output: Path
    n_errors: int
    note: str
    image_dirs: int = 0

    def headline(self) -> str:
        """A summary line, then one line per unreadable file."""
        verdicts = [r.get("verdict") for r in self.rows]
        ignored = ignored_dirs_note(self.image_dirs)
        lines = [f"scored {len(self.rows) - self.n_errors} of {len(self.rows)} images: {verdicts.count('fail')} "
                 f"fail, {verdicts.count('pass')} pass, {self.n_errors} unreadable -> {self.output}"
                 + (f"; {ignored}" if ignored else "")]
        lines += [f"unreadable {r['file']}: {r['error']}" for r in self.rows if "error" in r]
        return "\n".join(lines)


def _overlay_paths(files: Sequence[Path], directory: Path) -> list[Path]:
    """One overlay PNG per input, named by its stem (shortened, see :func:`qrs.files.shorten`), with a
    suffix where stems repeat."""
    used: set[str] = set()
    paths = []
    for file in files:
        stem = shorten(file.stem)
        name, k = stem, 1
        while name in used:
            k += 1
            name = f"{stem}_{k}"
        used.add(name)
        paths.append(directory / f"{name}.png")
    return paths


def _write_rows(path: Path, rows: list[dict[str, Any]], fmt: str) -> None:
    if fmt == "jsonl":
        write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
        return
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, restval="")
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, buf.getvalue())


def score_files(inputs: Sequence[str | os.PathLike[str]], model_path: str | os.PathLike[str], *,
                out: str | os.PathLike[str] = ".", fmt: str = "jsonl", roi: str = "full", overlay: bool = False,
                batch_size: int = 16, device: str = "auto", resize: str | None = None, backend: str = "torch",
                progress: bool = True, recording: Recording | None = None) -> ScoreFilesResult:
    """Score image files and directories with a checkpoint (``backend="torch"``) or a model from ``qrs export``
    (``"onnx"``); write ``OUT/scores.<fmt>`` (and ``OUT/overlays/*.png``).

    An unreadable file gets a row with its error and the others are still scored; the caller
    decides what the errors mean (the CLI exits with 1). Special files are never opened and a file
    whose name is not UTF-8 is not scored (see :mod:`qrs.files`): both get error rows, the name
    written by :func:`qrs.files.printable`. With ``recording``, every batch's rows (error rows included)
    are handed to it once scored.
    """
    if fmt not in OUTPUT_FORMATS:
        raise QrsError(f"unknown --format {fmt!r}; expected one of {', '.join(OUTPUT_FORMATS)}")
    if batch_size < 1:
        raise QrsError(f"--batch-size must be >= 1, got {batch_size}")
    collected = collect_images(inputs)
    files = collected.files
    roi_spec = load_roi(roi)
    scorer = Scorer.load(model_path, device=device, resize=resize, backend=backend)
    if recording is not None:
        recording.start(scorer)
    overlays = overlay or (recording.overlays if recording is not None else False)
    out = Path(out)
    overlay_paths = _overlay_paths(files, out / "overlays") if overlay else []
    rows: list[dict[str, Any]] = [{} for _ in files]
    pending: list[tuple[int, Prepared, float]] = []
    done: list[tuple[Path, dict[str, Any], bytes | None, float]] = []

    def flush() -> None:
        results = scorer.score([p for _, p, _ in pending]) if pending else []
        now = time.perf_counter()
        for (i, _, started), scored in zip(pending, results):
            rows[i] = scored.row
            if overlay and scored.overlay_png is not None:
                write_bytes(overlay_paths[i], scored.overlay_png)
                rows[i]["overlay"] = str(overlay_paths[i])
            done.append((files[i], rows[i], scored.overlay_png, now - started))
        bar.update(len(pending))
        pending.clear()
        if recording is not None:
            recording.batch(done)
        done.clear()

    with tqdm(total=len(files), desc="score", unit="img", disable=not progress) as bar:
        for i, file in enumerate(files):
            started = time.perf_counter()
            error = file_problem(file) or name_problem(file)
            if not error:
                try:
                    pending.append((i, scorer.prepare(str(file), open_rgb(file), roi_spec, overlay=overlays), started))
                except ImageError as exc:
                    error = str(exc)
            if error:
                rows[i] = {"file": printable(file), "error": error}
                done.append((file, rows[i], None, time.perf_counter() - started))
                bar.update()
            if len(pending) == batch_size:
                flush()
        if pending or done:
            flush()
    output = out / f"scores.{fmt}"
    _write_rows(output, rows, fmt)
    return ScoreFilesResult(rows, output, sum("error" in r for r in rows), scorer.note, collected.image_dirs)
