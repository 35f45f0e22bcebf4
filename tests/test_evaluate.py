"""``qrs evaluate``: the metrics against scikit-learn on the written predictions, their bootstrap
intervals in metrics.json and in the table, and bad options."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from sklearn.metrics import f1_score, roc_auc_score
from typer.testing import CliRunner

from qrs.bootstrap import BootstrapOptions, classification_intervals
from qrs.cli import app
from qrs.errors import QrsError
from qrs.evaluate import evaluate, format_table
from qrs.model import base_meta, build_model, save_checkpoint

runner = CliRunner()


@pytest.fixture()
def checkpoints(tmp_path: Path) -> list[Path]:
    """Two random resnet18 checkpoints for 32 px data."""
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        paths.append(tmp_path / f"m{seed}.pt")
        save_checkpoint(paths[-1], build_model("resnet18"), base_meta("resnet18", 32))
    return paths


def test_metrics_and_intervals_follow_the_written_predictions(prepared_small: Path, checkpoints: list[Path],
                                                             tmp_path: Path) -> None:
    results = evaluate(prepared_small, checkpoints, out=tmp_path / "metrics.json", device="cpu", progress=False,
                       n_resamples=300)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    predictions = pd.read_csv(tmp_path / "predictions.csv", dtype={"id": str})
    for path in checkpoints:
        rows = predictions[predictions["checkpoint"] == path.name]
        labels, p = rows["label"].to_numpy(), rows["p_defective"].to_numpy()
        m = saved[path.name]
        assert m["f1"] == pytest.approx(f1_score(labels, p > 0.5, zero_division=0))
        assert m["auroc"] == pytest.approx(roc_auc_score(labels, p))
        expected = classification_intervals(labels, p, BootstrapOptions(n_resamples=300))
        for name in ("f1", "precision", "recall", "auroc", "ap"):
            assert m["ci"][name] == pytest.approx(expected[name], abs=1e-6), name
            assert m["ci"][name][0] <= m["ci"][name][1]
        assert m["ci_options"] == {"n_resamples": 300, "confidence": 0.95, "seed": 0, "method": "percentile",
                                   "stratified": True}
    table = format_table(results)
    m = results[checkpoints[0].name]
    assert f"{m['f1']:.3f} [{m['ci']['f1'][0]:.3f}, {m['ci']['f1'][1]:.3f}]" in table.splitlines()[1]
    assert table.splitlines()[-1] == "[low, high]: 95% stratified bootstrap interval (300 resamples, seed 0)"


def test_no_intervals_with_zero_resamples(prepared_small: Path, checkpoints: list[Path]) -> None:
    results = evaluate(prepared_small, checkpoints[:1], device="cpu", progress=False, n_resamples=0)
    m = results[checkpoints[0].name]
    assert set(m["ci"].values()) == {None}
    table = format_table(results)
    assert "[" not in table.splitlines()[1].split("  [[")[0] and len(table.splitlines()) == 2
    assert f" {m['f1']:.3f} " in table


def test_bad_resample_count(prepared_small: Path, checkpoints: list[Path]) -> None:
    with pytest.raises(QrsError, match="--n-resamples must be >= 0, got -1"):
        evaluate(prepared_small, checkpoints, n_resamples=-1)
    result = runner.invoke(app, ["evaluate", "--data_root", str(prepared_small), "--model", str(checkpoints[0]),
                                 "--n-resamples", "-2", "--device", "cpu"])
    assert result.exit_code == 1 and isinstance(result.exception, QrsError)
    assert str(result.exception) == "--n-resamples must be >= 0, got -2"
