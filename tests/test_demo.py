"""The demo pipeline end to end on tiny settings, and its resumption."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from qrs.demo import DemoConfig, run_demo
from qrs.model import read_checkpoint

TINY = DemoConfig(n_train=40, n_test=20, defect_rate=0.25, raw_size=(64, 160), img_size=32, epochs=1, batch_size=8)


def test_demo_runs_every_step_and_continues_where_it_stopped(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    result = run_demo(tmp_path / "demo", config=TINY, progress=False)
    out = tmp_path / "demo"
    assert result.report == out / "report" / "report.html" and result.report.is_file()
    metrics = json.loads((out / "run" / "metrics.json").read_text())
    assert set(metrics) == {"best_loss.pt", "best_acc.pt"}
    assert "calibration" in read_checkpoint(out / "run" / "best_loss.pt")["meta"]
    for mode in ("train", "test"):
        assert (out / "extract" / f"gradcam_weights_{mode}.csv").is_file()
    first = capsys.readouterr().out
    assert "(already done, skipped)" not in first and f"open {result.report}" in first
    run_demo(out, config=TINY, progress=False)
    again = capsys.readouterr().out
    for step in ("== synth", "== prepare", "== train", "== calibrate"):
        line = next(line for line in again.splitlines() if line.startswith(step))
        assert line.endswith("(already done, skipped)"), line


def test_the_pipeline_runs_with_efficientnet_lite0(tmp_path: Path) -> None:
    result = run_demo(tmp_path / "lite", config=replace(TINY, arch="efficientnet_lite0"), progress=False)
    assert read_checkpoint(tmp_path / "lite" / "run" / "best_loss.pt")["meta"]["arch"] == "efficientnet_lite0"
    assert result.stats["options"]["arch"] == "efficientnet_lite0"
    assert set(result.stats["modes"]) == {"train", "test"} and result.stats["modes"]["test"]["n_images"] == 20
    assert "efficientnet_lite0 &middot; Grad-CAM++" in result.report.read_text()
