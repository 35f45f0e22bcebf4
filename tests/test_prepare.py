"""``qrs prepare``: every layout, the real DeepPCB sample, resize modes and every bad input."""

from __future__ import annotations

import csv
import json
import pickle
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image
from skimage.measure import label, regionprops
from typer.testing import CliRunner

from qrs.cli import app, main
from qrs.data import preparation as prepare_module
from qrs.data.dataset import PreparedDataset
from qrs.data.preparation import INDEX_COLUMNS, PrepareError, prepare, spans
from qrs.data.regions import rasterize, to_prepared
from qrs.data.synth import synthesize
from qrs.errors import QrsError

from conftest import DEEPPCB, SMALL_SIZE

runner = CliRunner()


def _components(mask: np.ndarray) -> list[tuple[int, int, int, int]]:
    """Pixel boxes (x0, y0, x1, y1), exclusive ends, of the 8-connected components, via skimage."""
    return sorted((r.bbox[1], r.bbox[0], r.bbox[3], r.bbox[2]) for r in regionprops(label(mask, connectivity=2)))


def _read_index(root: Path) -> pd.DataFrame:
    return pd.read_csv(root / "index.csv", dtype={"id": str}, keep_default_na=False)


def test_ksdd2_counts_labels_boxes_and_splits(ksdd2_raw: Path, tmp_path: Path) -> None:
    ds = prepare("ksdd2", ksdd2_raw, tmp_path / "p", img_size=48, progress=False)
    index = _read_index(tmp_path / "p")
    assert tuple(index.columns) == INDEX_COLUMNS
    assert len(index) == 60 and index["id"].is_unique
    # synthesize wrote round(0.25 * n) defective images per split: 10 of 40 train, 5 of 20 test.
    counts = {(s, lab): n for (s, lab), n in index.groupby(["split", "label"]).size().items()}
    assert counts[("test", 0)] == 15 and counts[("test", 1)] == 5
    assert counts[("train", 1)] + counts[("val", 1)] == 10
    n_val = counts[("val", 0)] + counts[("val", 1)]
    assert abs(n_val - 0.2 * 40) <= 1
    assert abs(counts[("val", 1)] - 0.2 * 10) <= 1
    for row in index.itertuples():
        raw_mask = np.asarray(Image.open(ksdd2_raw / Path(row.source).with_name(f"{row.id}_GT.png"))) > 0
        assert row.label == int(raw_mask.any())
        boxes = json.loads(row.defects)
        expected = _components(raw_mask)
        assert len(boxes) == len(expected)
        w, h = row.orig_width, row.orig_height
        assert (w, h) == SMALL_SIZE
        for got, want in zip(sorted(boxes), expected):
            assert np.allclose(np.array(got) * [w, h, w, h], want, atol=1.0)
        roi = json.loads(row.roi)
        assert roi == [[0.0, 0.0, 1.0, 1.0]]
        image = np.asarray(Image.open(tmp_path / "p" / row.image))
        assert image.shape == (48, 48, 3) and image.dtype == np.uint8
        if row.label:
            mask = np.asarray(Image.open(tmp_path / "p" / row.mask))
            assert set(np.unique(mask)) == {0, 255}
        else:
            assert row.mask == ""  # an all-zero mask is not written
    assert ds.meta["counts"]["test"] == {"good": 15, "defective": 5}
    coords = pickle.loads((tmp_path / "p" / "coords.pkl").read_bytes())
    assert coords == json.loads((tmp_path / "p" / "coords.json").read_text())
    assert set(coords) == set(index["id"])
    assert not (tmp_path / "p" / "skipped.csv").exists()
    # Exactly the files the index names, and nothing else (no leftovers of the build).
    files = {f.relative_to(tmp_path / "p").as_posix() for f in (tmp_path / "p").rglob("*") if f.is_file()}
    listed = set(index["image"]) | set(index["mask"][index["mask"] != ""])
    assert files == listed | {"index.csv", "meta.json", "coords.json", "coords.pkl"}
    assert {d.name for d in (tmp_path / "p").iterdir() if d.is_dir()} == {"images", "masks"}


def test_same_seed_same_index_other_seed_other_split(ksdd2_raw: Path, tmp_path: Path) -> None:
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        prepare("ksdd2", ksdd2_raw, tmp_path / name, img_size=24, seed=seed, progress=False)
    a, b, c = ((tmp_path / n / "index.csv").read_bytes() for n in "abc")
    assert a == b and a != c


def test_sodf_layout_splits_three_ways(tmp_path: Path) -> None:
    synthesize(tmp_path / "raw", "sodf", n_train=40, n_test=20, defect_rate=0.3, size=(96, 96), seed=0)
    ds = prepare("sodf", tmp_path / "raw", tmp_path / "p", img_size=32, roi="auto", progress=False)
    index = ds.index
    assert len(index) == 60 and set(index["split"]) == {"train", "val", "test"}
    n_test = (index["split"] == "test").sum()
    assert abs(n_test - 0.15 * 60) <= 1
    positives = index[index["label"] == 1]
    assert positives["id"].str.contains("_positive_").all()
    assert (positives["mask"] != "").all() and (index[index["label"] == 0]["mask"] == "").all()
    for roi in index["roi"]:
        pts = np.array(roi[0]).reshape(-1, 2)
        assert ((pts >= 0) & (pts <= 1)).all()
    # the generator draws defects inside the pill: the automatic ROI (Otsu) must cover nearly all
    # of them (dark cracks across a pill's edge can cut a little off it)
    inside = []
    for row in positives.itertuples():
        roi_mask = rasterize(row.roi, row.orig_height, row.orig_width)
        defect_mask = np.asarray(Image.open(tmp_path / "raw" / Path(row.source).parent.parent / "annotation"
                                            / Path(row.source).name)) > 0
        inside.append((defect_mask & roi_mask).sum() / defect_mask.sum())
        assert 0.05 < roi_mask.mean() < 0.8
    assert np.median(inside) >= 0.98 and np.mean(inside) >= 0.9


def test_folder_layout_defect_types_and_masks(tmp_path: Path) -> None:
    synthesize(tmp_path / "raw", "folder", n_train=30, n_test=10, defect_rate=0.3, size=(64, 128), seed=0)
    ds = prepare("folder", tmp_path / "raw", tmp_path / "p", img_size=32, mask_suffix="_mask", progress=False)
    index = ds.index
    assert len(index) == 40 and (index["label"] == 1).sum() == 12
    defective = index[index["label"] == 1]
    assert set(defective["defect_type"]) <= {"scratch", "spot", "crack", "dent"}
    assert (defective["mask"] != "").all()
    assert not index["source"].str.startswith("masks/").any()
    with pytest.raises(PrepareError, match="none of the 12 masks .* give it with --mask-suffix"):
        prepare("folder", tmp_path / "raw", tmp_path / "q", img_size=32, progress=False)


def test_deeppcb_real_sample_with_boxes_and_official_split(tmp_path: Path) -> None:
    boxes = pd.read_csv(DEEPPCB / "boxes.csv")
    split_csv = pd.read_csv(DEEPPCB / "split.csv")
    ds = prepare("folder", DEEPPCB, tmp_path / "pcb", img_size=64, boxes=DEEPPCB / "boxes.csv",
                 split_file=DEEPPCB / "split.csv", progress=False)
    index = ds.index
    assert len(index) == len(split_csv) == 40 and (index["label"] == 1).sum() == 20
    assert sum(len(d) for d in index["defects"]) == len(boxes) == 144
    coords = np.array([v for d in index["defects"] for v in d])
    assert coords.min() >= 0 and coords.max() <= 1
    assert (index["split"] == "test").sum() == (split_csv["split"] == "test").sum() == 20
    official = dict(zip(split_csv["source"], split_csv["split"]))
    assert all((split == "test") == (official[src] == "test") for src, split in zip(index["source"], index["split"]))
    first = boxes.iloc[0]
    row = index[index["source"] == first["image"]].iloc[0]
    assert [first.x0 / 640, first.y0 / 640, first.x1 / 640, first.y1 / 640] in row["defects"]


def _write_box_image(root: Path) -> None:
    (root / "good").mkdir(parents=True)
    (root / "defect").mkdir()
    (root / "masks").mkdir()
    img = np.full((100, 200, 3), 40, np.uint8)
    mask = np.zeros((100, 200), np.uint8)
    img[20:80, 50:150] = 220
    mask[20:80, 50:150] = 255
    Image.fromarray(img).save(root / "defect" / "a.png")
    Image.fromarray(mask).save(root / "masks" / "a.png")
    for i in range(3):
        Image.fromarray(np.full((100, 200, 3), 40 + i, np.uint8)).save(root / "good" / f"g{i}.png")
    Image.fromarray(img).save(root / "defect" / "b.png")


@pytest.mark.parametrize("mode", ["stretch", "pad"])
def test_box_lands_where_the_transform_says(tmp_path: Path, mode: str) -> None:
    _write_box_image(tmp_path / "raw")
    ds = prepare("folder", tmp_path / "raw", tmp_path / mode, img_size=64, resize=mode, val_fraction=0.0,
                 test_fraction=0.0, progress=False)
    row = ds.index[ds.index["id"] == "defect_a"].iloc[0]
    assert row["defects"] == [[0.25, 0.2, 0.75, 0.8]]
    expected = rasterize([to_prepared(row["defects"][0], (200, 100), mode, 64)], 64, 64)
    mask = np.asarray(Image.open(ds.root / row["mask"])) > 0
    image = np.asarray(Image.open(ds.root / row["image"]))[:, :, 0] > 130
    ys, xs = np.nonzero(expected)
    if mode == "pad":
        assert (ys.min(), ys.max() + 1) == (round(16 + 20 * 0.32), round(16 + 80 * 0.32))
    for got in (mask, image):
        gy, gx = np.nonzero(got)
        assert abs(gy.min() - ys.min()) <= 1 and abs(gy.max() - ys.max()) <= 1
        assert abs(gx.min() - xs.min()) <= 1 and abs(gx.max() - xs.max()) <= 1
    assert json.loads((ds.root / "meta.json").read_text())["resize"] == mode


def _formats_dataset(root: Path) -> None:
    """One image per accepted encoding, all in good/, and one defective RGB image."""
    (root / "good").mkdir(parents=True)
    (root / "defect").mkdir()
    rgb = (np.arange(40 * 30 * 3).reshape(40, 30, 3) % 251).astype(np.uint8)
    Image.fromarray(rgb).save(root / "good" / "rgb.png")
    Image.fromarray(rgb[:, :, 0]).save(root / "good" / "gray.png")
    Image.fromarray((rgb[:, :, 0].astype(np.uint16) * 257)).save(root / "good" / "gray16.png")
    Image.fromarray(np.dstack([rgb, np.full((40, 30), 255, np.uint8)])).save(root / "good" / "rgba.png")
    Image.fromarray(rgb).convert("P").save(root / "good" / "palette.png")
    Image.fromarray(rgb).save(root / "good" / "photo.jpg", quality=95)
    Image.fromarray(rgb).save(root / "good" / "bitmap.bmp")
    Image.fromarray(rgb).save(root / "good" / "scan.tif")
    Image.fromarray(rgb[:, :, 0].astype(np.uint16) * 257).save(root / "good" / "scan16.tif")
    Image.fromarray(255 - rgb).save(root / "defect" / "d.png")


def test_every_accepted_encoding_becomes_8bit_rgb(tmp_path: Path) -> None:
    _formats_dataset(tmp_path / "raw")
    ds = prepare("folder", tmp_path / "raw", tmp_path / "p", img_size=30, resize="stretch", val_fraction=0,
                 test_fraction=0, progress=False)
    assert ds.meta["n_skipped"] == 0 and len(ds.index) == 10
    reference = np.asarray(Image.open(ds.root / ds.index.set_index("id").loc["good_rgb", "image"])).astype(int)
    for row in ds.index.itertuples():
        arr = np.asarray(Image.open(ds.root / row.image))
        assert arr.shape == (30, 30, 3) and arr.dtype == np.uint8
        if row.id in ("good_gray", "good_gray16", "good_scan16"):
            assert np.abs(arr[:, :, 0].astype(int) - reference[:, :, 0]).max() <= 1
        if row.id in ("good_rgba", "good_bitmap", "good_scan"):
            assert np.array_equal(arr.astype(int), reference)


def _ksdd2_with_bad_files(root: Path) -> None:
    synthesize(root, "ksdd2", n_train=12, n_test=6, defect_rate=0.34, size=(64, 128), seed=1)
    train = root / "train"
    (train / "10000.png").write_bytes((train / "10000.png").read_bytes()[:200])  # truncated
    (train / "10001.png").write_text("this is not a png")  # non-image with an image extension
    (train / "10002_GT.png").unlink()  # missing mask
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(train / "10003_GT.png")  # wrongly sized mask


def test_bad_files_are_skipped_with_reasons(tmp_path: Path) -> None:
    _ksdd2_with_bad_files(tmp_path / "raw")
    result = runner.invoke(app, ["prepare", "--src", str(tmp_path / "raw"), "--out", str(tmp_path / "p"),
                                 "--img-size", "32"])
    assert result.exit_code == 0, result.output
    assert "skipped 4" in result.output
    with open(tmp_path / "p" / "skipped.csv") as fh:
        reasons = {row["file"]: row["reason"] for row in csv.DictReader(fh)}
    assert reasons["train/10000.png"].startswith("unreadable or truncated image")
    assert reasons["train/10001.png"].startswith("not an image file")
    assert reasons["train/10002.png"] == "missing mask 10002_GT.png"
    assert reasons["train/10003.png"] == "mask 10003_GT.png is 10x10, image is 64x128"
    assert json.loads((tmp_path / "p" / "meta.json").read_text())["n_skipped"] == 4
    assert len(_read_index(tmp_path / "p")) == 14


def _run_cli(args: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    monkeypatch.setattr("sys.argv", ["qrs", *args])
    with pytest.raises(SystemExit) as exc:
        main()
    return exc.value.code, capsys.readouterr().err


def test_strict_stops_at_first_bad_file_with_exit_2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    _ksdd2_with_bad_files(tmp_path / "raw")
    code, err = _run_cli(["prepare", "--src", str(tmp_path / "raw"), "--out", str(tmp_path / "p"), "--strict"],
                         monkeypatch, capsys)
    assert code == 2
    assert "error: train/10000.png: unreadable or truncated image" in err
    assert not (tmp_path / "p").exists()


@pytest.mark.parametrize(
    ("setup", "fmt", "message"),
    [
        ("empty", "folder", "no images found"),
        ("one_class", "folder", "only one class found (3 good, 0 defective"),
        ("sodf", "ksdd2", "is not a KSDD2 dataset: expected ROOT/train/<id>.png"),
        ("ksdd2", "sodf", "is not a Sensum SODF dataset"),
        ("ksdd2", "folder", "is not a folder dataset: missing good, defect"),
        ("missing", "ksdd2", "does not exist"),
        ("ksdd2_repeated_id", "ksdd2", "KSDD2 ids must be unique across train and test; repeated: ['10000']"),
    ],
)
def test_bad_sources_stop_with_a_message(tmp_path: Path, setup: str, fmt: str, message: str,
                                         monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "src"
    if setup == "empty":
        (src / "good").mkdir(parents=True)
        (src / "defect").mkdir()
    elif setup == "one_class":
        (src / "good").mkdir(parents=True)
        (src / "defect").mkdir()
        for i in range(3):
            Image.fromarray(np.zeros((8, 8), np.uint8)).save(src / "good" / f"{i}.png")
    elif setup in ("sodf", "ksdd2", "ksdd2_repeated_id"):
        synthesize(src, setup.removesuffix("_repeated_id"), n_train=4, n_test=2, size=(32, 32), seed=0)
        if setup == "ksdd2_repeated_id":
            for name in ("10000.png", "10000_GT.png"):
                (src / "test" / name).write_bytes((src / "train" / name).read_bytes())
    code, err = _run_cli(["prepare", "--format", fmt, "--src", str(src), "--out", str(tmp_path / "p")],
                         monkeypatch, capsys)
    assert code == 2 and message in err
    assert not (tmp_path / "p").exists()


def test_existing_output_refused_without_overwrite(prepared_small: Path, ksdd2_raw: Path) -> None:
    with pytest.raises(PrepareError, match="already exists; use --overwrite"):
        prepare("ksdd2", ksdd2_raw, prepared_small, img_size=32, progress=False)


def test_overwrite_replaces_and_interrupted_run_leaves_nothing(ksdd2_raw: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "p"
    prepare("ksdd2", ksdd2_raw, out, img_size=24, progress=False)
    before = (out / "index.csv").read_bytes()
    calls = {"n": 0}
    real = prepare_module.process_record

    def crash_midway(rec, opts):  # noqa: ANN001, ANN202
        calls["n"] += 1
        if calls["n"] == 30:
            raise KeyboardInterrupt
        return real(rec, opts)

    monkeypatch.setattr(prepare_module, "process_record", crash_midway)
    with pytest.raises(KeyboardInterrupt):
        prepare("ksdd2", ksdd2_raw, out, img_size=32, overwrite=True, progress=False)
    assert (out / "index.csv").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p"]
    monkeypatch.setattr(prepare_module, "process_record", real)
    prepare("ksdd2", ksdd2_raw, out, img_size=32, overwrite=True, progress=False)
    assert PreparedDataset(out).img_size == (32, 32)


def test_two_workers_give_the_same_dataset(ksdd2_raw: Path, tmp_path: Path) -> None:
    prepare("ksdd2", ksdd2_raw, tmp_path / "one", img_size=24, num_workers=1, progress=False)
    prepare("ksdd2", ksdd2_raw, tmp_path / "two", img_size=24, num_workers=2, progress=False)
    assert (tmp_path / "one" / "index.csv").read_bytes() == (tmp_path / "two" / "index.csv").read_bytes()
    one = PreparedDataset(tmp_path / "one")
    for rel in one.index["image"][:5]:
        assert (tmp_path / "one" / rel).read_bytes() == (tmp_path / "two" / rel).read_bytes()


def test_roi_file_regions_are_used_and_validated(ksdd2_raw: Path, tmp_path: Path) -> None:
    roi_file = tmp_path / "roi.json"
    roi_file.write_text(json.dumps({"10000": [[0.1, 0.0, 0.9, 1.0]], "10001": [[[0, 0], [1, 0], [1, 1]]]}))
    ds = prepare("ksdd2", ksdd2_raw, tmp_path / "p", img_size=24, roi=str(roi_file), progress=False)
    rois = ds.index.set_index("id")["roi"]
    assert rois["10000"] == [[0.1, 0.0, 0.9, 1.0]] and rois["10001"] == [[[0.0, 0.0], [1.0, 0.0], [1.0, 1.0]]]
    assert rois["10005"] == [[0.0, 0.0, 1.0, 1.0]]
    roi_file.write_text(json.dumps({"10000": [[0.5, 0.0, 0.1, 1.0]]}))
    with pytest.raises(QrsError, match=r"ROI file .*\['10000'\]: box .* has x0 >= x1"):
        prepare("ksdd2", ksdd2_raw, tmp_path / "q", img_size=24, roi=str(roi_file), progress=False)


def test_help_shows_every_option_with_its_default() -> None:
    result = runner.invoke(app, ["prepare", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    blocks: dict[str, str] = {}
    name = None
    for line in result.output.splitlines():
        match = re.match(r"[│|]\s+(?:\*\s+)?(--[\w-]+)", line)
        name = match.group(1) if match else name
        if name:
            blocks[name] = blocks.get(name, "") + " " + " ".join(line.strip("│| ").split())
    for option, default in (("--img-size", "224"), ("--resize", "stretch"), ("--roi", "full"),
                            ("--val-fraction", "0.2"), ("--test-fraction", "0.15"), ("--seed", "0"),
                            ("--good", "good"), ("--defect", "defect"), ("--masks", "masks, when it exists"),
                            ("--num-workers", "1"), ("--format", "ksdd2")):
        assert f"default: {default}" in blocks[option], blocks[option]


def test_package_api_names_resolve_in_a_fresh_interpreter() -> None:
    """``qrs.data.prepare`` is the function (not a module of that name) however it is first reached."""
    code = (
        "import qrs.data, inspect\n"
        "from qrs.data import PrepareError, PreparedDataset, prepare\n"
        "import qrs.data.preparation\n"
        "assert qrs.data.prepare is prepare and inspect.isfunction(prepare), qrs.data.prepare\n"
        "print(prepare.__module__, PreparedDataset.__module__, PrepareError.__mro__[1].__name__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["qrs.data.preparation", "qrs.data.dataset", "QrsError"]


def test_cli_prepare_does_not_import_torch(ksdd2_raw: Path, tmp_path: Path) -> None:
    """Preparing and reading back a dataset needs no torch (seconds of start-up, and a heavier fork per worker)."""
    code = (
        "import sys\n"
        "from qrs.cli import main\n"
        f"sys.argv = ['qrs', 'prepare', '--src', {str(ksdd2_raw)!r}, '--out', {str(tmp_path / 'p')!r}, '--img-size', '32',"
        " '--num-workers', '2']\n"
        "try:\n    main()\nexcept SystemExit as exc:\n    assert exc.code in (0, None), exc.code\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.splitlines()[-1] == "False"
    assert (tmp_path / "p" / "index.csv").is_file()


@given(st.integers(0, 5000), st.integers(2, 16))
def test_spans_cover_every_index_once_and_shrink_at_the_end(n: int, workers: int) -> None:
    parts = spans(n, workers)
    assert [i for part in parts for i in part] == list(range(n))
    sizes = [len(part) for part in parts]
    assert all(1 <= size <= 32 for size in sizes)
    # Tasks only shrink once they start shrinking, down to single images: nobody waits long at the end.
    assert sizes == sorted(sizes, reverse=True)
    assert n == 0 or sizes[-1] == 1
    if n >= 64 * 2 * workers:
        assert sizes[0] == 32


def test_readme_python_example_runs_as_written(tmp_path: Path) -> None:
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme.split("## Python API", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True).stdout
    summary, last = out.strip().splitlines()
    assert summary.startswith("prepared dataset prepared: 60 images (train: ")
    assert last == "32 torch.Size([3, 64, 64]) 0 torch.Size([64, 64])"
    assert (tmp_path / "prepared" / "index.csv").is_file()
