"""``qrs history`` (the summary per station and day, checked against a count by hand, and its CSV) and
``qrs reviews export`` (a folder dataset that ``qrs prepare`` reads as it is and ``qrs train`` trains on)."""

from __future__ import annotations

import csv
import hashlib
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from qrs.cli import app
from qrs.errors import QrsError
from qrs.history import export_reviews, split_of, summary
from qrs.model import load_checkpoint
from qrs.records import Fingerprint, Inspection, RecordStore
from scoring_setup import part_image, png

FP = Fingerprint("d" * 64, "stretch", "torch", "resnet18", 32, 32, 1.5, "good", 0.99, 0.9)
T0 = datetime(2025, 3, 1, 22, 0, tzinfo=timezone.utc)
runner = CliRunner()


def inspection(i: int, prediction: int | None, qrs: float, station: str, hours: float, *,
               image: bytes | None = None) -> Inspection:
    row = ({"file": f"{i}.png", "error": "truncated"} if prediction is None else
           {"file": f"{i}.png", "prediction": prediction, "p_defective": 0.5, "qrs": qrs, "risk_level": "low"})
    return Inspection(file=f"{i}.png", row=row, image=image or f"image {i}".encode(), station=station,
                      part_id=f"P{i}", time=T0 + timedelta(hours=hours))


def test_history_counts_shares_and_quantiles_per_station_and_day(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'r.sqlite'}"
    store = RecordStore(url).open()
    rng = np.random.default_rng(0)
    items = []
    for i in range(60):
        prediction = None if i % 17 == 0 else int(rng.random() < 0.2)
        qrs = float(rng.choice([0.0, 0.0, 0.0, rng.uniform(0, 0.5)]))
        items.append(inspection(i, prediction, qrs, "s1" if i % 3 else "s2", hours=i / 10))
    store.add(store.model_id(FP), items)

    table = summary(store.frame())
    rows = pd.DataFrame([{"station": it.station, "day": (it.time).strftime("%Y-%m-%d"), **it.row} for it in items])
    assert sorted(set(zip(table["station"], table["day"]))) == sorted(
        {*zip(rows["station"], rows["day"]), ("s1", "all"), ("s2", "all")})
    for (station, day), group in [*rows.groupby(["station", "day"]), *((("s1", "all"), rows[rows.station == "s1"]),
                                                                      (("s2", "all"), rows[rows.station == "s2"]))]:
        got = table[(table.station == station) & (table.day == day)].iloc[0]
        scored = group[group["prediction"].notna()]
        passed = scored[scored["prediction"] == 0]
        assert got["parts"] == len(group) and got["unscorable"] == len(group) - len(scored)
        assert got["flagged"] == (scored["prediction"] == 1).sum()
        assert got["share_flagged"] == pytest.approx((scored["prediction"] == 1).mean())
        assert got["qrs_p50"] == pytest.approx(np.quantile(scored["qrs"], 0.5))
        assert got["qrs_p99"] == pytest.approx(np.quantile(scored["qrs"], 0.99))
        assert got["passed_qrs_over_0"] == pytest.approx((passed["qrs"] > 0).mean())

    result = runner.invoke(app, ["history", "--db", url, "--station", "s2", "--csv", str(tmp_path / "h.csv")])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split() == ["station", "day", "parts", "unscorable", "flagged", "share_flagged", "qrs_p50",
                                "qrs_p90", "qrs_p99", "passed_qrs_over_0"]
    assert [line.split()[:2] for line in lines[1:-1]] == [["s2", "2025-03-01"], ["s2", "2025-03-02"], ["s2", "all"]]
    assert lines[-1] == f"wrote {tmp_path / 'h.csv'}"
    written = pd.read_csv(tmp_path / "h.csv")
    assert written["parts"].tolist() == table[table.station == "s2"]["parts"].tolist()
    empty = runner.invoke(app, ["history", "--db", url, "--station", "nowhere"])
    assert empty.exit_code == 0 and empty.output.strip() == "no inspection records match"


def test_the_split_follows_the_image_hash() -> None:
    shas = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(2000)]
    splits = [split_of(s, 0.2, 0.2) for s in shas]
    assert splits.count("test") / 2000 == pytest.approx(0.2, abs=0.03)
    assert splits.count("val") / 2000 == pytest.approx(0.2, abs=0.03)
    assert split_of("0" * 64, 0.2, 0.2) == "test" and split_of("f" * 64, 0.2, 0.2) == "train"


@pytest.mark.timeout(600)
def test_reviewed_parts_export_prepare_and_train(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'line.sqlite'}"
    store = RecordStore(url).open()
    model = store.model_id(FP)
    images = [png(part_image(seed, defective=seed % 2 == 1)) for seed in range(30)]
    # The model passed every part; the inspectors found the odd ones defective (missed defects).
    ids = store.add(model, [inspection(i, 0, 0.0, "s1", i, image=data) for i, data in enumerate(images)],
                    keep_images="all")
    ids += store.add(model, [inspection(99, 1, 0.3, "s1", 40, image=b"not kept")], keep_images="none")
    [again] = store.add(model, [inspection(100, 1, 0.3, "s1", 41, image=images[3])], keep_images="none")
    for inspection_id, seed in zip(ids[:28], range(28)):
        store.review(inspection_id, "defective" if seed % 2 else "good", "", "qa")
    store.review(ids[0], "good", "checked again", "lead")
    store.review(ids[-1], "defective", "", "qa")  # its image was not kept
    store.review(again, "good", "the same image, scored again: not a defect after all", "lead")

    out = tmp_path / "line-dataset"
    result = runner.invoke(app, ["reviews", "export", "--db", url, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"exported 28 reviewed parts to {out} (1 reviewed parts left out: image not "
                                    "kept, or not PNG, JPEG, BMP or TIFF)")
    good = sorted(p.name for p in (out / "good").iterdir())
    defect = sorted(p.name for p in (out / "defect").iterdir())
    assert (len(good), len(defect)) == (15, 13)
    assert f"inspection-{ids[1]}.png" in defect and f"inspection-{ids[0]}.png" in good
    # An image's latest review wins, whichever record it was scored in (the image itself was kept once).
    assert f"inspection-{again}.png" in good and f"inspection-{ids[3]}.png" not in defect
    assert (out / "defect" / f"inspection-{ids[1]}.png").read_bytes() == images[1]
    with open(out / "split.csv", newline="") as fh:
        splits = {row["source"]: row["split"] for row in csv.DictReader(fh)}
    assert splits[f"defect/inspection-{ids[1]}.png"] == split_of(hashlib.sha256(images[1]).hexdigest(), 0.2, 0.2)
    assert len(splits) == 28 and sum(split == "val" for split in splits.values()) > 0
    with open(out / "records.csv", newline="") as fh:
        traced = {row["source"]: row for row in csv.DictReader(fh)}
    assert traced[f"defect/inspection-{ids[1]}.png"]["outcome"] == "missed defect"
    assert traced[f"defect/inspection-{ids[1]}.png"]["part_id"] == "P1"
    again = runner.invoke(app, ["reviews", "export", "--db", url, "--out", str(out)])
    assert isinstance(again.exception, QrsError)
    assert str(again.exception) == f"{out} already exists (use --overwrite to replace it)"

    prepared = tmp_path / "prepared"
    result = runner.invoke(app, ["prepare", "--format", "folder", "--src", str(out), "--split-file",
                                 str(out / "split.csv"), "--out", str(prepared), "--img-size", "32"])
    assert result.exit_code == 0, result.output
    index = pd.read_csv(prepared / "index.csv")
    assert len(index) == 28 and index["label"].sum() == 13
    assert dict(zip(index["source"], index["split"])) == splits
    result = runner.invoke(app, ["train", "--data_root", str(prepared), "--num_epochs", "1", "--batch_size", "8",
                                 "--arch", "resnet18", "--device", "cpu", "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    assert load_checkpoint(tmp_path / "run" / "best_loss.pt").qrs_meta["epoch"] == 1


def test_export_refuses_bad_fractions_and_nothing_to_export(tmp_path: Path) -> None:
    store = RecordStore(f"sqlite:///{tmp_path / 'r.sqlite'}").open()
    with pytest.raises(QrsError, match="must be >= 0 with a sum below 1, got 0.6 and 0.4"):
        export_reviews(store, tmp_path / "out", val_fraction=0.6, test_fraction=0.4)
    [passed] = store.add(store.model_id(FP), [inspection(0, 0, 0.0, "s1", 0)], keep_images="flagged")
    store.review(passed, "defective", "", "qa")
    with pytest.raises(QrsError, match=r"none of the 1 reviewed parts has its image kept, so there is nothing to "
                                       r"export \(qrs serve --keep-images flagged keeps"):
        export_reviews(store, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    [failed] = store.add(store.model_id(FP), [inspection(1, 1, 0.2, "s1", 1, image=png(part_image(1)))],
                         keep_images="flagged")
    store.review(failed, "defective", "", "qa")
    headline = export_reviews(store, tmp_path / "out").headline()
    assert headline.startswith(f"exported 1 reviewed parts to {tmp_path / 'out'} (1 reviewed parts left out")
    assert headline.splitlines()[-1].startswith("note: no good parts at all, and qrs prepare needs both classes")
