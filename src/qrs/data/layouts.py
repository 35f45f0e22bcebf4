"""Readers of the raw dataset layouts (docs/method.md#dataset-layouts): each lists the records to prepare.

A reader only walks the file tree and tables; images are decoded later, in ``prepare``. Problems
that concern a single file (a missing mask, a special file, a name that is not UTF-8: see
:mod:`qrs.files`) become skipped records with a reason; problems with the whole source (wrong
layout, nothing found) raise :class:`LayoutError`. Ids name the prepared files, so they are made
unique and short enough for a file name (:func:`unique_ids`).
"""

from __future__ import annotations

import csv
import hashlib
import re
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from qrs.choices import SPLITS
from qrs.errors import QrsError
from qrs.files import MAX_NAME_BYTES, file_problem, is_image_file, list_entries, name_problem, printable, shorten


class LayoutError(QrsError, ValueError):
    """The source directory does not hold the expected layout; the message says what was expected."""


@dataclass
class Record:
    """One raw image to prepare. Paths are absolute; ``source`` is relative to the dataset root."""

    id: str
    source: str
    image: Path
    label: int | None = None
    """0/1 when known from the layout (folders); None when it comes from the mask (KSDD2)."""
    split: str | None = None
    mask: Path | None = None
    boxes: list[list[float]] | None = None
    """Defect boxes in pixels of the original image, when given by a table instead of a mask."""
    defect_type: str = ""


@dataclass
class Listing:
    """What a reader found: the records to prepare, the files skipped with their reasons (names as
    :func:`qrs.files.printable` writes them) and the number of directories with an image suffix."""

    records: list[Record] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    image_dirs: int = 0

    def skip(self, source: str, reason: str) -> None:
        """List ``source`` as skipped for ``reason``."""
        self.skipped.append((printable(source), reason))


def unique_ids(records: list[Record]) -> None:
    """Give every record whose id repeats (``a b.png`` and ``a_b.png`` both become ``a_b``, as do
    ``x.png`` and ``x.jpg``) or is too long for a file name (over :data:`qrs.files.MAX_NAME_BYTES`)
    a suffix from a hash of its source: prepared images are named ``<id>.png``, and none may
    overwrite another."""
    counts = Counter(r.id for r in records)
    for rec in records:
        if counts[rec.id] > 1 or len(rec.id.encode()) > MAX_NAME_BYTES:
            digest = hashlib.sha256(rec.source.encode()).hexdigest()[:10]
            rec.id = f"{shorten(rec.id, MAX_NAME_BYTES - len(digest) - 1)}_{digest}"


def _relative(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def _problem(path: Path, source: str) -> str | None:
    """Why a listed entry is skipped before it is decoded: not a regular file, not an image file
    extension, or a name that the outputs cannot hold."""
    problem = file_problem(path)
    if problem:
        return problem
    if not is_image_file(path):
        return "not an image file extension"
    return name_problem(source)


def _inputs(listing: Listing, directory: Path, root: Path, *, recursive: bool = True,
            ignore: Callable[[Path], bool] = lambda path: False) -> Iterator[tuple[Path, str]]:
    """(path, source relative to ``root``) of the entries under ``directory`` that are images to read;
    the others are listed as skipped with their reason, ignored ones (masks) are left out, and
    directories with an image suffix are counted."""
    entries = list_entries(directory, recursive=recursive)
    listing.image_dirs += entries.image_dirs
    for path in entries.files:
        if ignore(path):
            continue
        source = _relative(path, root)
        problem = _problem(path, source)
        if problem:
            listing.skip(source, problem)
            continue
        yield path, source


def read_ksdd2(root: Path) -> Listing:
    """KSDD2: ``ROOT/{train,test}/<id>.png`` with ``<id>_GT.png`` masks; the mask gives the label."""
    listing = Listing()
    splits = [s for s in ("train", "test") if (root / s).is_dir()]
    if not splits:
        raise LayoutError(
            f"{root} is not a KSDD2 dataset: expected ROOT/train/<id>.png with <id>_GT.png masks "
            "(and the same under ROOT/test/)"
        )
    for split in splits:
        for path, source in _inputs(listing, root / split, root, recursive=False,
                                    ignore=lambda p: p.stem.endswith("_GT")):
            listing.records.append(
                Record(
                    id=path.stem,
                    source=source,
                    image=path,
                    split=split,
                    mask=path.with_name(f"{path.stem}_GT.png"),
                )
            )
    duplicates = sorted(i for i, n in Counter(r.id for r in listing.records).items() if n > 1)
    if duplicates:
        raise LayoutError(f"KSDD2 ids must be unique across train and test; repeated: {duplicates[:5]}")
    unique_ids(listing.records)
    return listing


def read_sodf(root: Path) -> Listing:
    """Sensum SODF: ``ROOT/<category>/{negative,positive}/data/<NNN>.png``, masks under annotation/."""
    listing = Listing()
    categories = sorted(
        d for d in root.iterdir() if d.is_dir() and ((d / "negative").is_dir() or (d / "positive").is_dir())
    ) if root.is_dir() else []
    if not categories:
        raise LayoutError(
            f"{root} is not a Sensum SODF dataset: expected ROOT/<category>/{{negative,positive}}/data/<NNN>.png "
            "(categories such as capsule and softgel)"
        )
    for cat in categories:
        for cls, label in (("negative", 0), ("positive", 1)):
            data = cat / cls / "data"
            if not data.is_dir():
                continue
            for path, source in _inputs(listing, data, root, recursive=False):
                mask = cat / cls / "annotation" / path.name if label == 1 else None
                listing.records.append(
                    Record(
                        id=f"{cat.name}_{cls}_{path.stem}",
                        source=source,
                        image=path,
                        label=label,
                        mask=mask if mask is not None and mask.is_file() else None,
                        defect_type=cat.name,
                    )
                )
    unique_ids(listing.records)
    return listing


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")


def _find_masks(mask_dir: Path, suffix: str) -> dict[str, Path]:
    masks: dict[str, Path] = {}
    for path in sorted(p for p in mask_dir.rglob("*") if p.is_file() and is_image_file(p)):
        stem = path.stem
        if suffix and stem.endswith(suffix):
            stem = stem[: -len(suffix)]
        masks.setdefault(stem, path)
    return masks


def _read_boxes(csv_path: Path, root: Path) -> dict[str, list[tuple[list[float], str]]]:
    boxes: dict[str, list[tuple[list[float], str]]] = {}
    with open(csv_path, newline="") as fh:
        reader = csv.DictReader(fh)
        missing = {"image", "x0", "y0", "x1", "y1"} - set(reader.fieldnames or [])
        if missing:
            raise LayoutError(
                f"{csv_path}: boxes CSV needs the columns image,x0,y0,x1,y1[,defect_type]; missing {sorted(missing)}"
            )
        for row in reader:
            try:
                box = [float(row[k]) for k in ("x0", "y0", "x1", "y1")]
            except ValueError as exc:
                raise LayoutError(f"{csv_path}: bad number in row {row}: {exc}") from exc
            boxes.setdefault(Path(row["image"]).as_posix(), []).append((box, (row.get("defect_type") or "").strip()))
    return boxes


def _read_split_file(csv_path: Path) -> dict[str, str]:
    with open(csv_path, newline="") as fh:
        reader = csv.reader(fh)
        rows = [r for r in reader if r]
    if rows and rows[0][-1].strip().lower() == "split":
        rows = rows[1:]
    splits = {}
    for row in rows:
        if len(row) < 2 or row[1].strip() not in SPLITS:
            raise LayoutError(f"{csv_path}: each row must be 'id or source path, split' with split in {SPLITS}; got {row}")
        splits[row[0].strip()] = row[1].strip()
    return splits


def read_folder(
    root: Path,
    *,
    good: Sequence[str] = ("good",),
    defect: Sequence[str] = ("defect",),
    masks: str | None = None,
    mask_suffix: str = "",
    boxes_csv: Path | None = None,
    split_file: Path | None = None,
) -> Listing:
    """A user's own folders: good and defective image directories, optional masks/boxes/splits.

    Subfolders of a defect directory name the defect type. A mask is matched by the image's file stem
    (plus ``mask_suffix``) anywhere under the mask directory; mask files are never taken as images.
    """
    listing = Listing()
    dirs = [(d, 0) for d in good] + [(d, 1) for d in defect]
    missing = [d for d, _ in dirs if not (root / d).is_dir()]
    if missing:
        raise LayoutError(
            f"{root} is not a folder dataset: missing {', '.join(missing)}; expected a directory of good images "
            f"(--good, default 'good') and one of defective images (--defect, default 'defect') under --src"
        )
    mask_root = root / masks if masks else (root / "masks" if (root / "masks").is_dir() else None)
    if masks and not (mask_root and mask_root.is_dir()):
        raise LayoutError(f"mask directory {mask_root} does not exist")
    mask_map = _find_masks(mask_root, mask_suffix) if mask_root else {}
    mask_files = set(mask_map.values())
    box_map = _read_boxes(boxes_csv, root) if boxes_csv else {}
    split_map = _read_split_file(split_file) if split_file else {}

    def is_mask(path: Path) -> bool:
        return (path in mask_files or bool(mask_root and mask_root in path.parents)
                or bool(mask_suffix and path.stem.endswith(mask_suffix)))

    for d, label in dirs:
        base = root / d
        for path, source in _inputs(listing, base, root, ignore=is_mask):
            rid = _slug(str(Path(source).with_suffix("")))
            sub = path.relative_to(base).parts
            rec = Record(
                id=rid,
                source=source,
                image=path,
                label=label,
                mask=mask_map.get(path.stem),
                defect_type=sub[0] if label == 1 and len(sub) > 1 else "",
            )
            if source in box_map:
                rec.boxes = [b for b, _ in box_map[source]]
                types = sorted({t for _, t in box_map[source] if t})
                rec.defect_type = rec.defect_type or ",".join(types)
            if split_map:
                rec.split = split_map.get(rid, split_map.get(source))
                if rec.split is None:
                    listing.skip(source, "not listed in the split file")
                    continue
            listing.records.append(rec)
    unique_ids(listing.records)
    if mask_map and listing.records and not any(r.mask for r in listing.records):
        example = printable(next(iter(mask_map.values())).name)
        raise LayoutError(
            f"none of the {len(mask_map)} masks in {mask_root} matches an image's file stem (e.g. {example}); "
            "if mask names carry a suffix after the image's stem, give it with --mask-suffix (e.g. _mask)"
        )
    unknown = set(box_map) - {r.source for r in listing.records} - {s for s, _ in listing.skipped}
    if unknown:
        raise LayoutError(f"{boxes_csv}: boxes for images that are not in the dataset: {sorted(unknown)[:5]}")
    return listing
