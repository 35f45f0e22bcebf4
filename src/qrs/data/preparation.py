"""``qrs prepare``: a raw dataset -> a prepared dataset (docs/method.md#prepared-dataset).

Every image becomes an RGB PNG of ``img_size`` (height x width), every mask with defect pixels a nearest-neighbour
resized 0/255 PNG (an all-zero mask, e.g. a good KSDD2 part's, is not written: no mask file means no
defect pixels, as for SODF negatives; creating a file costs a tenth of decoding one on some disks),
and every region (ROI, defects) is kept in coordinates relative to the original image. The output is
built in a temporary directory beside the target and renamed at the end.
"""

from __future__ import annotations

import csv
import hashlib
import json
import multiprocessing
import os
import pickle
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.model_selection import train_test_split
from tqdm.auto import tqdm

from qrs import __version__
from qrs.atomic import atomic_dir
from qrs.choices import FORMATS, RESIZE_MODES, SPLITS
from qrs.errors import QrsError
from qrs.data.dataset import PreparedDataset
from qrs.data.layouts import LayoutError, Listing, Record, read_folder, read_ksdd2, read_sodf
from qrs.data.regions import RoiSpec, load_roi, mask_to_boxes, pixel_box_to_relative, roi_regions
from qrs.files import NO_SUCH_FILE, file_problem, printable
from qrs.images import ImageError, Size, check_size, encode_png, open_mask, open_rgb, resize_image

INDEX_COLUMNS = (
    "id", "split", "label", "source", "image", "mask", "orig_width", "orig_height", "defect_type", "roi", "defects",
)
IMAGE_COMPRESS_LEVEL = 0
"""Prepared images are stored uncompressed: they are small, read once into a cache, and compressing
texture costs as much as decoding the source. Masks (mostly zeros) compress fast and well."""
MASK_COMPRESS_LEVEL = 1


class PrepareError(QrsError):
    """A problem that stops ``prepare``; the message says what was found and what was expected."""


@dataclass(frozen=True)
class PrepareOptions:
    """Per-image settings shared with the worker processes."""

    img_size: Size
    resize: str
    roi: RoiSpec
    root: Path
    """The dataset being built: images go straight to ``images/<folder>/``, see :func:`first_folder`."""


def first_folder(split: str | None) -> str:
    """Where a worker writes an image: its given split, or ``train`` until the splits are drawn
    (only the few that end in another split are moved afterwards)."""
    return split or "train"


def resize_transform(mode: str, size: Size) -> str:
    """Human-readable description of the resize to ``size`` (height, width), recorded in meta.json."""
    out_h, out_w = size
    if mode == "stretch":
        return (f"stretch: each image resized to {out_h}x{out_w} (height x width, bilinear); relative coordinates "
                "unchanged")
    return (
        f"pad: scale s = min({out_w} / W, {out_h} / H), image resized to (W*s, H*s) and centred on a black "
        f"{out_h}x{out_w} (height x width) canvas; x' = (x*W*s + ({out_w} - W*s)/2) / {out_w}, "
        f"y' = (y*H*s + ({out_h} - H*s)/2) / {out_h}"
    )


def process_record(rec: Record, opts: PrepareOptions) -> dict[str, Any]:
    """Decode, check, resize and write one image (and its mask); returns its row or ``{"skip": reason}``.

    The image stays a Pillow image from decode to resize, and a mask becomes an array only when it
    has defect pixels to box: this loop is most of ``qrs prepare``'s time.
    """
    if rec.mask is not None and (problem := file_problem(rec.mask)):
        name = rec.mask.name
        return {"skip": f"missing mask {name}" if problem == NO_SUCH_FILE else f"mask {name}: {problem}"}
    try:
        image = open_rgb(rec.image)
    except ImageError as exc:
        return {"skip": str(exc)}
    width, height = image.size
    mask = None
    if rec.mask is not None:
        try:
            mask = open_mask(rec.mask)
        except ImageError as exc:
            return {"skip": f"mask {rec.mask.name}: {exc}"}
        if mask.size != (width, height):
            return {"skip": f"mask {rec.mask.name} is {mask.width}x{mask.height}, image is {width}x{height}"}
    has_mask = mask is not None and mask.getbbox() is not None
    label = rec.label if rec.label is not None else int(has_mask)
    if rec.boxes is not None:
        defects = [pixel_box_to_relative(b, width, height) for b in rec.boxes]
    elif has_mask:
        defects = mask_to_boxes(np.asarray(mask) > 0)
    else:
        defects = []
    roi = roi_regions(opts.roi, rec.id, image)
    image_png = encode_png(resize_image(image, opts.img_size, opts.resize), compress_level=IMAGE_COMPRESS_LEVEL)
    folder = first_folder(rec.split)
    (opts.root / "images" / folder / f"{rec.id}.png").write_bytes(image_png)
    if has_mask:
        small = resize_image(mask, opts.img_size, opts.resize, nearest=True)
        mask_png = encode_png(small, compress_level=MASK_COMPRESS_LEVEL)
        (opts.root / "masks" / folder / f"{rec.id}.png").write_bytes(mask_png)
    return {
        "id": rec.id,
        "label": label,
        "source": rec.source,
        "has_mask": has_mask,
        "orig_width": width,
        "orig_height": height,
        "defect_type": rec.defect_type,
        "roi": roi,
        "defects": defects,
        "split": rec.split,
        "folder": folder,
    }


_pool_job: tuple[list[Record], PrepareOptions] | None = None
"""The records and options in a pool's worker process, inherited through fork by
:func:`_init_pool_worker`: tasks are then index ranges, and nothing large (a per-image ROI file)
is pickled per image."""


def _init_pool_worker(records: list[Record], opts: PrepareOptions) -> None:
    global _pool_job
    _pool_job = (records, opts)


def _pool_worker(span: range) -> list[tuple[int, dict[str, Any]]]:
    assert _pool_job is not None, "the pool was started without _init_pool_worker"
    records, opts = _pool_job
    return [(i, process_record(records[i], opts)) for i in span]


def spans(n: int, num_workers: int, *, largest: int = 32) -> list[range]:
    """Consecutive index ranges, one task each, that shrink towards the end (guided scheduling).

    Large while many images remain, so the parent (whose wake-ups take CPU from the workers) hears
    from the pool rarely; small at the end, so no worker waits long for the last one to finish.
    """
    out: list[range] = []
    start = 0
    while start < n:
        size = max(1, min(largest, (n - start) // (2 * num_workers)))
        out.append(range(start, start + size))
        start += size
    return out


def _stratified(ids: list[str], labels: list[int], fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Split ``ids`` into (rest, held-out) with ``fraction`` held out, stratified by label when possible."""
    if fraction <= 0 or len(ids) < 2:
        return ids, []
    counts = Counter(labels)
    stratify = labels if min(counts.values()) >= 2 and len(counts) > 1 else None
    try:
        rest, held = train_test_split(ids, test_size=fraction, stratify=stratify, random_state=seed)
    except ValueError:
        rest, held = train_test_split(ids, test_size=fraction, stratify=None, random_state=seed)
    return sorted(rest), sorted(held)


def assign_splits(rows: list[dict[str, Any]], val_fraction: float, test_fraction: float, seed: int) -> None:
    """Fill ``split`` in place: keep given splits, carve test (when none is given) and val from train."""
    if all(r["split"] is None for r in rows):
        ids = [r["id"] for r in rows]
        labels = [r["label"] for r in rows]
        test_ids = set(_stratified(ids, labels, test_fraction, seed)[1])
        for r in rows:
            r["split"] = "test" if r["id"] in test_ids else "train"
    if not any(r["split"] == "val" for r in rows):
        train = [r for r in rows if r["split"] == "train"]
        n = len(train)
        frac = val_fraction if n == 0 else min(val_fraction, (n - 1) / n)
        _, val_ids = _stratified([r["id"] for r in train], [r["label"] for r in train], frac, seed)
        val_set = set(val_ids)
        for r in train:
            if r["id"] in val_set:
                r["split"] = "val"


def list_records(fmt: str, src: Path, **folder_options: Any) -> Listing:
    """Run the reader for ``fmt`` on ``src``."""
    if fmt == "ksdd2":
        return read_ksdd2(src)
    if fmt == "sodf":
        return read_sodf(src)
    if fmt == "folder":
        return read_folder(src, **folder_options)
    raise PrepareError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")


def prepare(
    fmt: str,
    src: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    img_size: int | Sequence[int] = 224,
    resize: str = "stretch",
    roi: str = "full",
    val_fraction: float = 0.2,
    test_fraction: float = 0.15,
    seed: int = 0,
    num_workers: int = 1,
    strict: bool = False,
    overwrite: bool = False,
    good: Sequence[str] = ("good",),
    defect: Sequence[str] = ("defect",),
    masks: str | None = None,
    mask_suffix: str = "",
    boxes: str | os.PathLike[str] | None = None,
    split_file: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> PreparedDataset:
    """Prepare the raw dataset at ``src`` (layout ``fmt``) into ``out`` and return it.

    ``img_size``: one side (a square) or (height, width).
    """
    src, out = Path(src), Path(out)
    if resize not in RESIZE_MODES:
        raise PrepareError(f"unknown resize mode {resize!r}; expected one of {', '.join(RESIZE_MODES)}")
    img_size = check_size(img_size)
    for name, value in (("val", val_fraction), ("test", test_fraction)):
        if not 0.0 <= value < 1.0:
            raise PrepareError(f"--{name}-fraction must be in [0, 1), got {value}")
    if not src.is_dir():
        raise PrepareError(f"source directory {src} does not exist")
    if out.exists() and not overwrite:
        raise PrepareError(f"{out} already exists; use --overwrite to replace it")
    roi_spec = load_roi(roi)
    try:
        listing = list_records(
            fmt, src, good=good, defect=defect, masks=masks, mask_suffix=mask_suffix,
            boxes_csv=Path(boxes) if boxes else None, split_file=Path(split_file) if split_file else None,
        ) if fmt == "folder" else list_records(fmt, src)
    except LayoutError as exc:
        raise PrepareError(str(exc)) from exc
    if strict and listing.skipped:
        source, reason = listing.skipped[0]
        raise PrepareError(f"{source}: {reason}")
    if not listing.records:
        raise PrepareError(f"no images found in {src} for format {fmt!r}")

    with atomic_dir(out, overwrite=overwrite) as tmp:
        for folder in {first_folder(r.split) for r in listing.records}:
            (tmp / "images" / folder).mkdir(parents=True)
            (tmp / "masks" / folder).mkdir(parents=True)
        opts = PrepareOptions(img_size, resize, roi_spec, tmp)
        rows, skipped = _run(listing.records, opts, num_workers, strict, progress)
        skipped = listing.skipped + skipped
        counts = Counter(r["label"] for r in rows)
        if len(counts) < 2:
            raise PrepareError(
                f"only one class found ({counts.get(0, 0)} good, {counts.get(1, 0)} defective, {len(skipped)} skipped): "
                "training needs both good and defective parts"
            )
        assign_splits(rows, val_fraction, test_fraction, seed)
        _write_outputs(tmp, rows, skipped, fmt=fmt, src=src, img_size=img_size, resize=resize, roi=roi, seed=seed,
                       val_fraction=val_fraction, test_fraction=test_fraction, image_dirs=listing.image_dirs)
    return PreparedDataset(out)


def _run(records: list[Record], opts: PrepareOptions, num_workers: int, strict: bool,
         progress: bool) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    rows: list[dict[str, Any]] = []
    skipped: list[tuple[str, str]] = []
    bar = tqdm(total=len(records), desc="prepare", unit="img", disable=not progress)
    pool = (multiprocessing.get_context("fork").Pool(num_workers, _init_pool_worker, (records, opts))
            if num_workers > 1 else None)
    try:
        if pool:
            batches = pool.imap(_pool_worker, spans(len(records), num_workers))
            results: Iterator[tuple[int, dict[str, Any]]] = (pair for batch in batches for pair in batch)
        else:
            results = ((i, process_record(r, opts)) for i, r in enumerate(records))
        for i, result in results:
            rec = records[i]
            bar.update()
            if "skip" in result:
                if strict:
                    raise PrepareError(f"{rec.source}: {result['skip']}")
                skipped.append((rec.source, result["skip"]))
            else:
                rows.append(result)
    finally:
        bar.close()
        if pool:
            pool.terminate()
    return rows, skipped


def _write_outputs(tmp: Path, rows: list[dict[str, Any]], skipped: list[tuple[str, str]], **meta: Any) -> None:
    rows.sort(key=lambda r: (SPLITS.index(r["split"]), r["id"]))
    for split in {r["split"] for r in rows}:
        (tmp / "images" / split).mkdir(parents=True, exist_ok=True)
        (tmp / "masks" / split).mkdir(parents=True, exist_ok=True)
    index_rows = []
    for r in rows:
        image = f"images/{r['split']}/{r['id']}.png"
        mask = f"masks/{r['split']}/{r['id']}.png" if r["has_mask"] else ""
        if r["folder"] != r["split"]:
            os.replace(tmp / "images" / r["folder"] / f"{r['id']}.png", tmp / image)
            if mask:
                os.replace(tmp / "masks" / r["folder"] / f"{r['id']}.png", tmp / mask)
        index_rows.append({
            "id": r["id"], "split": r["split"], "label": r["label"], "source": r["source"], "image": image,
            "mask": mask, "orig_width": r["orig_width"], "orig_height": r["orig_height"],
            "defect_type": r["defect_type"], "roi": json.dumps(r["roi"]), "defects": json.dumps(r["defects"]),
        })
    for folder in [*(tmp / "images").iterdir(), *(tmp / "masks").iterdir()]:
        if not any(folder.iterdir()):
            folder.rmdir()  # e.g. no defective part in a split, or every image of a folder skipped
    if not any((tmp / "masks").iterdir()):
        (tmp / "masks").rmdir()
    with open(tmp / "index.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=INDEX_COLUMNS)
        writer.writeheader()
        writer.writerows(index_rows)
    coords = {r["id"]: {"roi": r["roi"], "defects": r["defects"]} for r in rows}
    (tmp / "coords.json").write_text(json.dumps(coords), encoding="utf-8")
    with open(tmp / "coords.pkl", "wb") as fh:
        pickle.dump(coords, fh)
    if skipped:
        with open(tmp / "skipped.csv", "w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(["file", "reason"])
            writer.writerows((file, printable(reason)) for file, reason in skipped)
    counts: dict[str, dict[str, int]] = {s: {"good": 0, "defective": 0} for s in SPLITS}
    for r in rows:
        counts[r["split"]]["defective" if r["label"] else "good"] += 1
    sizes = Counter(f"{r['orig_width']}x{r['orig_height']}" for r in rows)
    meta_obj = {
        "format": meta["fmt"],
        "source": printable(Path(meta["src"]).resolve()),
        "counts": counts,
        "n_images": len(rows),
        "n_skipped": len(skipped),
        "n_ignored_dirs": meta["image_dirs"],
        "img_size": list(meta["img_size"]),
        "orig_sizes": dict(sizes.most_common(20)),
        "resize": meta["resize"],
        "resize_transform": resize_transform(meta["resize"], meta["img_size"]),
        "roi": meta["roi"],
        "val_fraction": meta["val_fraction"],
        "test_fraction": meta["test_fraction"],
        "seed": meta["seed"],
        "dataset_hash": hashlib.sha256((tmp / "index.csv").read_bytes()).hexdigest()[:16],
        "qrs_version": __version__,
    }
    (tmp / "meta.json").write_text(json.dumps(meta_obj, indent=2) + "\n", encoding="utf-8")
