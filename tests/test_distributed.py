"""torchrun on CPU (gloo, 2 processes): sharded extraction equals one process, DDP training keeps the
ranks identical and resumes exactly, and a failing or stuck rank ends the job instead of hanging."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import read_events
from ddp_worker import state_digest
from qrs.distributed import DistContext, collective_timeout_s, init_distributed, shard_indices
from qrs.errors import QrsError
from qrs.data.preparation import prepare
from qrs.extract import calibrate, extract
from qrs.model import base_meta, build_model, load_checkpoint, read_checkpoint, save_checkpoint

TORCHRUN = Path(sys.executable).with_name("torchrun")
WORKER = Path(__file__).with_name("ddp_worker.py")
LIMIT_S = 300
"""No launch may take this long: a hung job fails the test instead of blocking the suite."""


def torchrun(*args: str | Path, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``torchrun --standalone --nproc_per_node 2 ARGS`` on CPU, one thread per process."""
    environ = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    environ.update(OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run([str(TORCHRUN), "--standalone", "--nproc_per_node", "2", *map(str, args)], cwd=cwd,
                          env=environ, capture_output=True, text=True, timeout=LIMIT_S)


def _checkpoint(path: Path, arch: str = "resnet18", side: int = 32) -> Path:
    torch.manual_seed(0)
    save_checkpoint(path, build_model(arch), base_meta(arch, side))
    return path


def test_without_torchrun_everything_is_one_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    ctx = init_distributed("cpu")
    assert not ctx.distributed and ctx.is_main
    shards = [shard_indices(7, DistContext(rank=r, world_size=3)) for r in range(3)]
    assert shards == [[0, 3, 6], [1, 4], [2, 5]]


def test_collective_timeout_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("QRS_DIST_TIMEOUT_S", raising=False)
    assert collective_timeout_s() == 600
    monkeypatch.setenv("QRS_DIST_TIMEOUT_S", "45")
    assert collective_timeout_s() == 45
    for bad in ("0", "-3", "soon", "inf"):
        monkeypatch.setenv("QRS_DIST_TIMEOUT_S", bad)
        with pytest.raises(QrsError, match="QRS_DIST_TIMEOUT_S"):
            collective_timeout_s()


@pytest.mark.parametrize("arch", ["resnet18", "efficientnet_lite0"])
def test_two_process_extraction_equals_one_process(ksdd2_raw: Path, prepared_small: Path, tmp_path: Path,
                                                   arch: str) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    side = 32 if arch == "resnet18" else 64  # Lite0's stride is 32: a 2 x 2 map, not a flat 1 x 1 one
    if side != 32:
        prepared_small = tmp_path / "p64"
        prepare("ksdd2", ksdd2_raw, prepared_small, img_size=side, progress=False)
    single_model = _checkpoint(tmp_path / "single.pt", arch, side)
    shutil.copy(single_model, tmp_path / "ddp.pt")
    single_cal = calibrate(single_model, prepared_small, device="cpu", progress=False)
    extract(prepared_small, single_model, modes=["train", "test"], out_dir=one, device="cpu", progress=False)

    run = torchrun("-m", "qrs", "extract", "--data_dir", prepared_small, "--model_path", tmp_path / "ddp.pt",
                   "--modes", "train", "test", "--batch_size", "4", "--out-dir", two, "--device", "cpu", cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("train: 32 images") == 1 and run.stdout.count("test: 20 images") == 1

    ddp_cal = read_checkpoint(tmp_path / "ddp.pt")["meta"]["calibration"]
    assert ddp_cal["scale"] == pytest.approx(single_cal["scale"], rel=1e-6)
    assert ddp_cal["p_defective_cut"] == pytest.approx(single_cal["p_defective_cut"], rel=1e-6)
    assert {k: ddp_cal[k] for k in ("anchor", "quantile", "split", "n_parts", "risk_cuts")} == \
        {k: single_cal[k] for k in ("anchor", "quantile", "split", "n_parts", "risk_cuts")}
    for mode in ("train", "test"):
        a, b = np.load(one / f"gradcam_weights_{mode}.npz"), np.load(two / f"gradcam_weights_{mode}.npz")
        assert list(a["ids"]) == list(b["ids"]) and list(a["labels"]) == list(b["labels"])
        np.testing.assert_allclose(b["qrs"], a["qrs"], atol=1e-6)
        np.testing.assert_allclose(b["p_defective"], a["p_defective"], atol=1e-6)
        np.testing.assert_allclose(b["raw_maps"], a["raw_maps"], atol=1e-5, rtol=1e-5)
        assert float(b["scale"]) == pytest.approx(float(a["scale"]), rel=1e-6)
        rows_a = pd.read_csv(one / f"gradcam_weights_{mode}.csv", dtype={"id": str})
        rows_b = pd.read_csv(two / f"gradcam_weights_{mode}.csv", dtype={"id": str})
        pd.testing.assert_frame_equal(rows_b, rows_a, atol=1e-5)
        assert (two / f"over_0.9_weights_{mode}.xlsx").is_file()
    assert not [p for p in two.iterdir() if p.name.startswith(".")]


def test_two_process_repeat_runs_a_seed_once_and_only_rank_0_writes(prepared_small: Path, tmp_path: Path) -> None:
    args = ["-m", "qrs", "repeat", "--seeds", "4", "--out", tmp_path / "rep", "--", "--data_root", prepared_small,
            "--arch", "resnet18", "--num_epochs", "1", "--batch_size", "8", "--device", "cpu"]
    run = torchrun(*args, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    for line in ("=== seed 4 (1/1)", "== train resnet18", "== calibrate", "== analyze", "F1 (best_loss.pt)"):
        assert run.stdout.count(line) == 1, line
    table = pd.read_csv(tmp_path / "rep" / "repeat.csv", index_col="seed")
    assert list(table.index) == ["4", "mean", "std"]
    seed_dir = tmp_path / "rep" / "seed-4"
    assert json.loads((seed_dir / "summary.json").read_text())["seed"] == 4
    assert read_checkpoint(seed_dir / "run" / "best_loss.pt")["meta"]["seed"] == 4
    with np.load(seed_dir / "extract" / "gradcam_weights_train.npz") as npz:
        assert len(npz["ids"]) == 32  # both ranks' shards, gathered
    assert not [p for p in seed_dir.rglob(".*")]
    again = torchrun(*args, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("(already done, skipped)") == 1 and "== train" not in again.stdout


@pytest.mark.parametrize("extra", [["--mask-loss", "none"], ["--mask-loss", "energy", "--arch", "efficientnet_lite0"]],
                         ids=["plain", "mask-guided-lite0"])
def test_two_process_training_keeps_ranks_identical_and_resumes_exactly(prepared_small: Path, tmp_path: Path,
                                                                       extra: list[str]) -> None:
    run = torchrun(WORKER, prepared_small, tmp_path, "train", *extra, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    summaries = [line.split(";")[0] for line in run.stdout.splitlines() if line.startswith("trained")]
    assert summaries == ["trained 2 epochs", "trained 1 epochs", "trained 2 epochs"]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1]
    assert ranks[0]["resumed"] == ranks[0]["full"]
    for run_dir in ("full", "resumed"):
        out = tmp_path / run_dir
        assert sorted(p.name for p in out.iterdir()) == ["best_acc.pt", "best_loss.pt", "curves.png", "curves.svg",
                                                        "last.pt", "log.csv", "log.jsonl"]
        for name in ("best_acc.pt", "best_loss.pt", "last.pt"):
            meta = load_checkpoint(out / name).qrs_meta
            assert meta["arch"] == ("efficientnet_lite0" if "energy" in extra else "resnet18")
            assert ("mask_guidance" in meta) == ("energy" in extra)
        assert state_digest(read_checkpoint(out / "last.pt")["state_dict"]) == ranks[0][run_dir]
        assert list(pd.read_csv(out / "log.csv")["epoch"]) == [1, 2]
        assert len((out / "log.jsonl").read_text().splitlines()) == 2
        # TensorBoard: one event file per launch, from rank 0 alone; every epoch and step logged once.
        board = tmp_path / f"tb-{run_dir}"
        assert len(list(board.glob("events.out.tfevents.*"))) == (1 if run_dir == "full" else 2)
        events = read_events(board)
        assert [e.step for e in events.Scalars("epoch/val_loss")] == [2, 4]  # 2 steps per epoch (batch 8 x 2)
        assert [e.step for e in events.Scalars("step/train_loss")] == [1, 2, 3, 4]
        assert all(len(events.Images(tag)) == 2 for tag in events.Tags()["images"]) and events.Tags()["images"]


def test_a_corrupt_image_stops_the_job_with_its_message(prepared_small: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(prepared_small, data, ignore=shutil.ignore_patterns("cache"))
    index = pd.read_csv(data / "index.csv", dtype=str)
    broken = index.loc[index["split"] == "train", "image"].iloc[3]
    (data / broken).write_bytes(b"not a png")
    run = torchrun("-m", "qrs", "train", "--data_root", data, "--arch", "resnet18", "--num_epochs", "1",
                   "--batch_size", "8", "--device", "cpu", "--out", tmp_path / "run", cwd=tmp_path)
    assert run.returncode != 0
    assert f"error: cannot read prepared image {data / broken}" in run.stderr
    assert "exitcode  : 2" in run.stderr
    assert not (tmp_path / "run").exists()


def test_a_failing_non_main_rank_stops_the_job(prepared_small: Path, tmp_path: Path) -> None:
    run = torchrun(WORKER, prepared_small, tmp_path, "fail", cwd=tmp_path)
    assert run.returncode != 0
    assert "QrsError: rank 1 failed on purpose" in run.stderr
    assert not (tmp_path / "fail" / "last.pt").exists()


def test_an_unexpected_error_is_reported_as_the_failing_ranks_own(prepared_small: Path, tmp_path: Path) -> None:
    run = torchrun(WORKER, prepared_small, tmp_path, "crash", cwd=tmp_path)
    assert run.returncode != 0
    assert "RuntimeError: rank 0 crashed on purpose" in run.stderr
    root_cause = run.stderr.split("Root Cause (first observed failure):")[1]
    assert re.search(r"rank\s+: 0 \(local_rank: 0\)\s+exitcode\s+: 1 ", root_cause), root_cause
    assert not (tmp_path / "crash" / "last.pt").exists()


def test_a_rank_stuck_outside_collectives_times_out_the_others(prepared_small: Path, tmp_path: Path) -> None:
    run = torchrun(WORKER, prepared_small, tmp_path, "hang", cwd=tmp_path, env={"QRS_DIST_TIMEOUT_S": "10"})
    assert run.returncode != 0
    assert "Timed out waiting 10000ms" in run.stderr
