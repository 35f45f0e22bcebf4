"""File names and entries as an archive from another system brings them (issue 15): names that are
not UTF-8, FIFOs, devices, sockets, symlinks that point at them or at nothing, and directories named
like images, through ``qrs prepare`` (every layout), ``qrs score`` and the CLI, with their exact
reasons; then a hypothesis test over arbitrary byte names."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from typer.testing import CliRunner

from qrs.cli import app, main
from qrs.data.preparation import prepare
from qrs.data.synth import synthesize
from qrs.files import (
    DANGLING_SYMLINK, MAX_NAME_BYTES, NOT_UTF8, file_problem, is_image_file, list_entries, name_problem, printable,
)
from qrs.images import ImageError, open_mask, open_rgb
from qrs.predict import score_files
from scoring_setup import make_checkpoint

FIFO = "a FIFO (named pipe), not a regular file"
TO_FIFO = "a symlink to a FIFO (named pipe), not a regular file"
TO_DEVICE = "a symlink to a character device, not a regular file"
SOCKET = "a socket, not a regular file"
NOT_IMAGE = "not an image file (Pillow cannot identify it)"
NO_EXTENSION = "not an image file extension"
LATIN1 = b"bad\xffname.png"

runner = CliRunner()


def tiny_png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def at(directory: Path, name: bytes) -> bytes:
    """The path of ``name`` (any bytes) in ``directory``, as bytes."""
    return os.path.join(os.fsencode(directory), name)


def make_entry(directory: Path, name: bytes, kind: str, seed: int = 0) -> None:
    """Create one entry of ``kind``: png, junk, empty, fifo, devnull (symlink), tofifo, dangling or dir."""
    path = at(directory, name)
    if kind in ("png", "junk", "empty"):
        with open(path, "wb") as fh:
            fh.write({"png": tiny_png(seed), "junk": b"this is text, not an image", "empty": b""}[kind])
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "devnull":
        os.symlink(b"/dev/null", path)
    elif kind == "tofifo":
        os.mkfifo(path + b".fifo")
        os.symlink(path + b".fifo", path)
    elif kind == "dangling":
        os.symlink(b"/nonexistent/target.png", path)
    else:
        os.mkdir(path)


def make_socket(directory: Path, name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(directory)  # a relative address: socket paths are limited to about 100 bytes
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(name)


def issue_folder(root: Path, monkeypatch: pytest.MonkeyPatch) -> set[str]:
    """The issue's folder dataset; returns the sources of the readable images that must all be prepared."""
    good, defect = root / "good", root / "defect"
    good.mkdir(parents=True)
    defect.mkdir()
    readable = ["g0.png", "part one.png", "pièce é.png", "ü.png", "ö.png", "x.png", "x.jpg", "-lead.png"]
    for seed, name in enumerate(readable):
        make_entry(good, name.encode(), "png", seed)
    for seed in range(3):
        make_entry(defect, f"d{seed}.png".encode(), "png", 10 + seed)
    make_entry(good, LATIN1, "png")
    make_entry(good, b"empty.png", "empty")
    make_entry(good, b"notes.txt", "junk")
    make_entry(good, b"pipe.png", "fifo")
    make_entry(good, b"null.png", "devnull")
    make_entry(good, b"topipe.jpg", "tofifo")
    make_entry(good, b"dangling.png", "dangling")
    make_entry(good, b"dir.png", "dir")
    make_socket(good, "sock.png", monkeypatch)
    return {f"good/{n}" for n in readable} | {f"defect/d{i}.png" for i in range(3)}


ISSUE_SKIPPED = {
    "good/bad\\xffname.png": NOT_UTF8,
    "good/empty.png": NOT_IMAGE,
    "good/notes.txt": NO_EXTENSION,
    "good/pipe.png": FIFO,
    "good/null.png": TO_DEVICE,
    "good/topipe.jpg": TO_FIFO,
    "good/topipe.jpg.fifo": FIFO,
    "good/dangling.png": DANGLING_SYMLINK,
    "good/sock.png": SOCKET,
}


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def test_names_and_file_kinds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, kind in ((LATIN1, "png"), (b"pipe", "fifo"), (b"null", "devnull"), (b"to", "tofifo"),
                       (b"gone", "dangling"), (b"dir.png", "dir")):
        make_entry(tmp_path, name, kind)
    make_socket(tmp_path, "sock", monkeypatch)
    latin1 = Path(os.fsdecode(at(tmp_path, LATIN1)))
    assert printable(latin1) == f"{tmp_path}/bad\\xffname.png" and printable("pièce é.png") == "pièce é.png"
    assert name_problem(latin1) == NOT_UTF8 and name_problem("pièce é.png") is None
    assert file_problem(latin1) is None
    assert file_problem(tmp_path / "pipe") == FIFO and file_problem(tmp_path / "null") == TO_DEVICE
    assert file_problem(tmp_path / "to") == TO_FIFO and file_problem(tmp_path / "gone") == DANGLING_SYMLINK
    assert file_problem(tmp_path / "sock") == SOCKET and file_problem(tmp_path / "missing") == "no such file"
    assert file_problem(tmp_path / "dir.png") == "a directory, not a regular file"
    entries = list_entries(tmp_path)
    assert entries.image_dirs == 1 and tmp_path / "dir.png" not in entries.files
    assert entries.files == sorted([latin1, *(tmp_path / n for n in ("gone", "null", "pipe", "sock", "to", "to.fifo"))])
    # The image readers check too: a FIFO is refused, never opened (opening one would block).
    with pytest.raises(ImageError, match=re.escape(f"{FIFO}: {tmp_path}/pipe")):
        open_rgb(tmp_path / "pipe")
    with pytest.raises(ImageError, match=re.escape(f"{TO_DEVICE}: ")):
        open_mask(tmp_path / "null")


def test_prepare_folder_skips_each_bad_entry_with_its_reason_and_keeps_every_readable_image(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    readable = issue_folder(tmp_path / "raw", monkeypatch)
    ds = prepare("folder", tmp_path / "raw", tmp_path / "p", img_size=16, val_fraction=0, test_fraction=0,
                 progress=False)
    assert {r["file"]: r["reason"] for r in read_csv(ds.root / "skipped.csv")} == ISSUE_SKIPPED
    index = read_csv(ds.root / "index.csv")
    assert {r["source"] for r in index} == readable
    ids = [r["id"] for r in index]
    # ü/ö slug to the same id, as do x.png/x.jpg: each gets a suffix from its source's hash.
    assert len(set(ids)) == len(index) == 11 and "good_g0" in ids and "good_part_one" in ids
    assert sum(i.startswith("good_x_") for i in ids) == 2 and "good_x" not in ids
    assert sorted(p.name for p in (ds.root / "images" / "train").iterdir()) == sorted(f"{i}.png" for i in ids)
    assert set(json.loads((ds.root / "coords.json").read_text())) == set(ids)
    assert ds.meta["n_skipped"] == len(ISSUE_SKIPPED) and ds.meta["n_ignored_dirs"] == 1
    assert ds.summary().endswith(f"skipped 9 (see {ds.root / 'skipped.csv'}); ignored 1 directory with an image suffix")


def test_very_long_names_get_ids_that_fit_a_file_name(tmp_path: Path) -> None:
    for d, seed in (("good", 0), ("defect", 1)):
        (tmp_path / "raw" / d).mkdir(parents=True)
        make_entry(tmp_path / "raw" / d, b"\xc3\xa9" * 100 + b"x" * 50 + b".png", "png", seed)  # 254 bytes
        make_entry(tmp_path / "raw" / d, b"short.png", "png", seed + 2)
    ds = prepare("folder", tmp_path / "raw", tmp_path / "p", img_size=16, val_fraction=0, test_fraction=0,
                 progress=False)
    long_ids = [i for i in ds.index["id"] if "short" not in i]
    assert len(ds.index) == 4 and len(long_ids) == 2
    assert all(len(i.encode()) <= MAX_NAME_BYTES and (ds.root / "images" / "train" / f"{i}.png").is_file()
               for i in long_ids)


def test_ksdd2_non_utf8_name_fifo_image_and_fifo_mask(tmp_path: Path) -> None:
    root = tmp_path / "raw"
    synthesize(root, "ksdd2", n_train=6, n_test=2, defect_rate=0.34, size=(32, 64), seed=1)
    train = root / "train"
    make_entry(train, b"caf\xe9.png", "png")
    make_entry(train, b"caf\xe9_GT.png", "png")
    make_entry(train, b"20000.png", "fifo")
    (train / "10001_GT.png").unlink()
    make_entry(train, b"10001_GT.png", "fifo")
    make_entry(root / "test", b"old.png", "dir")
    ds = prepare("ksdd2", root, tmp_path / "p", img_size=16, progress=False)
    assert {r["file"]: r["reason"] for r in read_csv(ds.root / "skipped.csv")} == {
        "train/caf\\xe9.png": NOT_UTF8,
        "train/20000.png": FIFO,
        "train/10001.png": f"mask 10001_GT.png: {FIFO}",
    }
    assert sorted(ds.index["id"]) == ["10000", "10002", "10003", "10004", "10005", "10006", "10007"]
    assert ds.meta["n_ignored_dirs"] == 1


def test_sodf_non_utf8_name_and_symlink_to_a_device(tmp_path: Path) -> None:
    root = tmp_path / "raw"
    synthesize(root, "sodf", n_train=6, n_test=2, defect_rate=0.34, size=(32, 64), seed=1)
    data = root / "capsule" / "negative" / "data"
    make_entry(data, b"\xff\xfe.png", "png")
    make_entry(data, b"009.png", "devnull")
    make_entry(data, b"dangling.png", "dangling")
    ds = prepare("sodf", root, tmp_path / "p", img_size=16, progress=False)
    assert {r["file"]: r["reason"] for r in read_csv(ds.root / "skipped.csv")} == {
        "capsule/negative/data/\\xff\\xfe.png": NOT_UTF8,
        "capsule/negative/data/009.png": TO_DEVICE,
        "capsule/negative/data/dangling.png": DANGLING_SYMLINK,
    }
    assert len(ds.index) == 8 and ds.meta["n_ignored_dirs"] == 0


def test_prepare_cli_exit_codes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                capsys: pytest.CaptureFixture[str]) -> None:
    issue_folder(tmp_path / "raw", monkeypatch)
    args = ["prepare", "--format", "folder", "--src", str(tmp_path / "raw"), "--img-size", "16"]
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "p")])
    assert result.exit_code == 0, result.output
    assert result.output.strip().endswith("skipped 9 (see "
                                          f"{tmp_path / 'p' / 'skipped.csv'}); ignored 1 directory with an image suffix")
    monkeypatch.setattr(sys, "argv", ["qrs", *args, "--out", str(tmp_path / "strict"), "--strict"])
    with pytest.raises(SystemExit) as exc:
        main()
    assert exc.value.code == 2
    assert capsys.readouterr().err.strip() == f"error: good/bad\\xffname.png: {NOT_UTF8}"
    assert not (tmp_path / "strict").exists()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("model") / "calibrated.pt")


def test_score_gives_error_rows_and_scores_the_rest(checkpoint: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    readable = issue_folder(tmp_path / "raw", monkeypatch)
    for fmt in ("jsonl", "csv"):
        result = score_files([tmp_path / "raw"], checkpoint, out=tmp_path / fmt, fmt=fmt, overlay=True,
                             progress=False)
        written = (read_csv(result.output) if fmt == "csv"
                   else [json.loads(line) for line in result.output.read_text(encoding="utf-8").splitlines()])
        assert [r["file"] for r in written] == [r["file"] for r in result.rows]
        errors = {r["file"]: r["error"] for r in result.rows if "error" in r}
        want = {f"{tmp_path}/raw/{k}": v for k, v in ISSUE_SKIPPED.items() if is_image_file(k)}
        assert errors == want
        scored = {r["file"] for r in result.rows if "verdict" in r}
        assert scored == {f"{tmp_path}/raw/{s}" for s in readable}
        assert len(list((tmp_path / fmt / "overlays").iterdir())) == len(readable)
        assert result.n_errors == 7 and result.image_dirs == 1
        lines = result.headline().splitlines()
        assert lines[0].endswith("; ignored 1 directory with an image suffix")
        assert f"unreadable {tmp_path}/raw/good/bad\\xffname.png: {NOT_UTF8}" in lines


def test_score_cli_prints_the_escaped_name_and_exits_1(checkpoint: Path, tmp_path: Path) -> None:
    (tmp_path / "parts").mkdir()
    make_entry(tmp_path / "parts", b"ok.png", "png")
    make_entry(tmp_path / "parts", LATIN1, "png")
    make_entry(tmp_path / "parts", b"pipe.png", "fifo")
    done = subprocess.run([sys.executable, "-m", "qrs", "score", "--model", str(checkpoint), str(tmp_path / "parts"),
                           "--out", str(tmp_path / "out"), "--format", "csv"],
                          capture_output=True, timeout=300)  # stdout is a pipe, as in scripts
    assert done.returncode == 1, done.stderr
    assert done.stdout.decode().splitlines()[1:] == [
        f"unreadable {tmp_path}/parts/bad\\xffname.png: {NOT_UTF8}",
        f"unreadable {tmp_path}/parts/pipe.png: {FIFO}",
    ]
    rows = read_csv(tmp_path / "out" / "scores.csv")
    assert [(Path(r["file"]).name, r["verdict"], r["error"]) for r in rows] == [
        ("bad\\xffname.png", "", NOT_UTF8), ("ok.png", rows[1]["verdict"], ""), ("pipe.png", "", FIFO)]
    assert rows[1]["verdict"] in ("pass", "fail")


# Hypothesis: folder datasets with arbitrary byte names.

KINDS = ("png", "png", "png", "junk", "empty", "fifo", "devnull", "dangling", "dir")
ANCHORS = {b"anchor-good.png": "good", b"anchor-defect.png": "defect"}
"""One readable image per class, so that every example can be prepared."""


def _plain(stem: bytes) -> bytes:
    return stem.replace(b"/", b"_").replace(b"\0", b"_")


names = st.builds(
    lambda stem, suffix: stem + suffix,
    st.one_of(
        st.binary(min_size=1, max_size=40).map(_plain),
        st.text(st.characters(exclude_characters="/\0", exclude_categories=("Cs",)), min_size=1,
                max_size=40).map(str.encode),
        st.sampled_from([b"-x", b"--help", b"a b", b"line\nbreak", b"tab\there", b"\xff", b"caf\xe9", b"\r",
                         b'"quoted", comma', b"\xc3\xa9" * 100 + b"x" * 40, b"L" * 248]),
    ),
    st.sampled_from([b".png", b".PNG", b".jpg", b".txt", b""]),
).filter(lambda n: n not in (b".", b"..") and len(n) <= 255 and n not in ANCHORS)

entries = st.lists(st.tuples(st.sampled_from(["good", "defect"]), names, st.sampled_from(KINDS)), max_size=8,
                   unique_by=lambda e: (e[0], e[1]))


def _expected(listed: list[tuple[str, bytes, str]]) -> tuple[set[str], dict[str, str], dict[str, str], int]:
    """What must come out: the sources of the readable images, the skipped sources of ``qrs prepare``
    and the error rows of ``qrs score`` (both source -> reason: score looks only at names with an image
    suffix), and the number of directories with an image suffix."""
    readable = {f"{d}/{n.decode()}" for n, d in ANCHORS.items()}
    skipped: dict[str, str] = {}
    errors: dict[str, str] = {}
    image_dirs = 0
    for d, name, kind in listed:
        source = f"{d}/{os.fsdecode(name)}"
        if kind == "dir":
            image_dirs += is_image_file(source)
            continue
        reason = {"fifo": FIFO, "devnull": TO_DEVICE, "dangling": DANGLING_SYMLINK}.get(kind)
        if reason is None and not is_image_file(source):
            reason = NO_EXTENSION
        reason = reason or name_problem(source) or (NOT_IMAGE if kind in ("junk", "empty") else None)
        if reason:
            skipped[printable(source)] = reason
            if is_image_file(source):
                errors[printable(source)] = reason
        else:
            readable.add(source)
    return readable, skipped, errors, image_dirs


def _build(root: Path, listed: list[tuple[str, bytes, str]]) -> None:
    for d in ("good", "defect"):
        (root / d).mkdir(parents=True)
    for name, d in ANCHORS.items():
        make_entry(root / d, name, "png", 99)
    for seed, (d, name, kind) in enumerate(listed):
        make_entry(root / d, name, kind, seed)


def _with_dataset(listed: list[tuple[str, bytes, str]], check: Callable[[Path, Path], None]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        _build(Path(tmp) / "raw", listed)
        check(Path(tmp) / "raw", Path(tmp))


@settings(max_examples=20, deadline=None)
@given(entries)
def test_prepare_never_raises_keeps_every_readable_image_and_lists_the_rest(
        listed: list[tuple[str, bytes, str]]) -> None:
    def check(raw: Path, tmp: Path) -> None:
        readable, skipped, _, image_dirs = _expected(listed)
        ds = prepare("folder", raw, tmp / "p", img_size=16, val_fraction=0, test_fraction=0, progress=False)
        index = read_csv(ds.root / "index.csv")
        assert {r["source"] for r in index} == readable
        assert len({r["id"] for r in index}) == len(index)
        assert sum(1 for _ in (ds.root / "images").rglob("*.png")) == len(index)
        if skipped:
            assert {r["file"]: r["reason"] for r in read_csv(ds.root / "skipped.csv")} == skipped
        else:
            assert not (ds.root / "skipped.csv").exists()
        assert ds.meta["n_skipped"] == len(skipped) and ds.meta["n_ignored_dirs"] == image_dirs

    _with_dataset(listed, check)


@settings(max_examples=15, deadline=None)
@given(entries, st.sampled_from(["jsonl", "csv"]))
def test_score_never_raises_scores_every_readable_image_and_gives_the_rest_error_rows(
        checkpoint: Path, listed: list[tuple[str, bytes, str]], fmt: str) -> None:
    def check(raw: Path, tmp: Path) -> None:
        readable, _, errors, image_dirs = _expected(listed)
        result = score_files([raw], checkpoint, out=tmp / "out", fmt=fmt, overlay=True, progress=False)
        prefix = f"{raw}/"
        assert {r["file"].removeprefix(prefix) for r in result.rows if "verdict" in r} == readable
        assert {r["file"].removeprefix(prefix): r["error"] for r in result.rows if "error" in r} == errors
        written = (read_csv(result.output) if fmt == "csv"
                   else [json.loads(line) for line in result.output.read_text(encoding="utf-8").splitlines()])
        assert [r["file"] for r in written] == [r["file"] for r in result.rows]
        assert len(list((tmp / "out" / "overlays").iterdir())) == len(readable)
        assert result.image_dirs == image_dirs

    _with_dataset(listed, check)
