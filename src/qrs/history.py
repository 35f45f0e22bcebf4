"""What the inspection records say (``qrs history``), and the reviewed parts as training data
(``qrs reviews export``).

The export is a folder dataset that ``qrs prepare --format folder`` reads as it is: ``good/`` and
``defect/`` (what the inspectors said the parts are, not what the model said), ``split.csv`` and
``records.csv`` (which record and review each file comes from). A part's split follows from its
image's SHA-256, so it keeps its split in every later export: a part once used for testing never
moves into training as more reviews arrive.
"""

from __future__ import annotations

import csv
import io
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from qrs.atomic import atomic_dir, write_text
from qrs.errors import QrsError
from qrs.records import Filters, RecordStore

QUANTILES = (0.5, 0.9, 0.99)
CLASS_DIRS = {"good": "good", "defective": "defect"}


def summary(frame: pd.DataFrame) -> pd.DataFrame:
    """Per station and UTC day (and per station over all days, day ``all``): parts, unscorable, flagged
    (failed) parts and their share among the scored ones, QRS quantiles of the scored parts, and the
    share of passed parts with QRS > 0 (compare it with the calibration's 1 - quantile)."""
    frame = frame.assign(day=frame["time"].dt.strftime("%Y-%m-%d"), scored=frame["prediction"].notna(),
                         flagged=frame["prediction"] == 1, passed=frame["prediction"] == 0)
    frame["passed_over"] = frame["passed"] & (frame["qrs"] > 0)

    quantiles = [f"qrs_p{round(q * 100)}" for q in QUANTILES]

    def table(groups: pd.core.groupby.DataFrameGroupBy) -> pd.DataFrame:
        out = groups.agg(parts=("time", "size"), scored=("scored", "sum"), flagged=("flagged", "sum"),
                         passed=("passed", "sum"), passed_over=("passed_over", "sum"))
        out["unscorable"] = out["parts"] - out["scored"]
        out["share_flagged"] = out["flagged"] / out["scored"].where(out["scored"] > 0)
        for name, q in zip(quantiles, QUANTILES):
            out[name] = groups["qrs"].quantile(q)
        out["passed_qrs_over_0"] = out["passed_over"] / out["passed"].where(out["passed"] > 0)
        return out[["parts", "unscorable", "flagged", "share_flagged", *quantiles, "passed_qrs_over_0"]]

    by_day = table(frame.groupby(["station", "day"]))
    overall = table(frame.groupby("station")).assign(day="all").set_index("day", append=True)
    return pd.concat([by_day, overall]).sort_index().reset_index()


def format_summary(table: pd.DataFrame) -> str:
    if table.empty:
        return "no inspection records match"
    shown = table.copy()
    for column in shown.columns:
        if shown[column].dtype.kind == "f":
            shown[column] = shown[column].map(lambda v: "" if pd.isna(v) else f"{v:.4f}")
    return shown.to_string(index=False)


def history(store: RecordStore, filters: Filters, csv_path: str | os.PathLike[str] | None = None) -> str:
    """``qrs history``: the summary table as text (and as CSV when ``csv_path`` is given)."""
    table = summary(store.frame(filters))
    if csv_path is not None:
        write_text(csv_path, table.to_csv(index=False, float_format="%.6g"))
    return format_summary(table)


@dataclass
class ExportResult:
    out: Path
    counts: pd.DataFrame
    """Parts per split (rows) and class (columns)."""
    missing: int
    """Reviewed parts left out: their image was not kept (or is in a format ``qrs prepare`` does not read)."""

    def headline(self) -> str:
        total = int(self.counts.to_numpy().sum())
        lines = [f"exported {total} reviewed parts to {self.out} ({self.missing} reviewed parts left out: image "
                 "not kept, or not PNG, JPEG, BMP or TIFF)", self.counts.to_string()]
        absent = [cls for cls in self.counts.columns if self.counts[cls].sum() == 0]
        if absent:
            lines.append(f"note: no {absent[0]} parts at all, and qrs prepare needs both classes: with --keep-images "
                         "flagged only failed parts keep their images (confirmed defects, false alarms); serve with "
                         "--keep-images all for a while to collect passed parts too, or add these files to your "
                         "training data's folders")
            return "\n".join(lines)
        empty = [f"{split} has no {cls} parts" for split in self.counts.index for cls in self.counts.columns
                 if self.counts.loc[split, cls] == 0]
        if empty:
            lines.append("note: " + "; ".join(empty) + " (review more parts, or prepare without --split-file "
                                                     "for a stratified split)")
        lines.append(f"next: qrs prepare --format folder --src {self.out} --split-file {self.out / 'split.csv'} "
                     "--out PREPARED")
        return "\n".join(lines)


def split_of(image_sha256: str, val_fraction: float, test_fraction: float) -> str:
    """test, val or train from the image's SHA-256 (uniform in [0, 1) from its first 8 hex digits)."""
    u = int(image_sha256[:8], 16) / 16**8
    return "test" if u < test_fraction else "val" if u < test_fraction + val_fraction else "train"


def export_reviews(store: RecordStore, out: str | os.PathLike[str], *, val_fraction: float = 0.2,
                   test_fraction: float = 0.2, overwrite: bool = False) -> ExportResult:
    """Write the reviewed parts whose images were kept as a folder dataset (see the module's docstring):
    one file per image, labelled by its latest review and named ``inspection-<id>`` after that review's
    record; an image scored more than once is one part."""
    if not (0 <= val_fraction and 0 <= test_fraction and val_fraction + test_fraction < 1):
        raise QrsError(f"--val-fraction and --test-fraction must be >= 0 with a sum below 1, got {val_fraction} "
                       f"and {test_fraction}")
    reviewed = {row["image_sha256"]: row for row in store.reviewed()}  # an image's latest review wins
    latest: dict[str, dict] = {}
    for sha, row in reviewed.items():
        path = store.kept_image(sha)
        if path is not None and path.suffix != ".bin":
            latest[sha] = {**row, "path": path}
    missing = len(reviewed) - len(latest)
    if not latest:
        raise QrsError(f"none of the {len(reviewed)} reviewed parts has its image kept, so there is nothing to export "
                       "(qrs serve --keep-images flagged keeps the images of failed parts only; --keep-images all "
                       "keeps every part's, missed defects included)")
    counts = pd.DataFrame(0, index=["train", "val", "test"], columns=["good", "defective"])
    records = io.StringIO()
    splits = io.StringIO()
    record_writer, split_writer = csv.writer(records), csv.writer(splits)
    record_writer.writerow(["source", "inspection_id", "part_id", "station", "file", "image_sha256", "truth",
                            "outcome"])
    split_writer.writerow(["source", "split"])
    out = Path(out)
    try:
        with atomic_dir(out, overwrite=overwrite) as tmp:
            for directory in CLASS_DIRS.values():
                (tmp / directory).mkdir()
            for sha, row in sorted(latest.items(), key=lambda item: item[1]["id"]):
                source = f"{CLASS_DIRS[row['truth']]}/inspection-{row['id']}{row['path'].suffix}"
                shutil.copyfile(row["path"], tmp / source)
                split = split_of(sha, val_fraction, test_fraction)
                counts.loc[split, row["truth"]] += 1
                split_writer.writerow([source, split])
                record_writer.writerow([source, row["id"], row["part_id"], row["station"], row["file"], sha,
                                        row["truth"], row["outcome"]])
            (tmp / "split.csv").write_text(splits.getvalue(), encoding="utf-8")
            (tmp / "records.csv").write_text(records.getvalue(), encoding="utf-8")
    except FileExistsError as exc:
        raise QrsError(str(exc)) from exc
    return ExportResult(out, counts, missing)
