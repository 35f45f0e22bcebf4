"""``qrs repeat`` (and the run_pipeline it shares with the demo): one run per seed, the table of
mean and std checked against the seeds' own files, resumption per seed, and its command line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score
from typer.testing import CliRunner

from qrs import pipeline
from qrs.cli import _expand_multi_value_options, app
from qrs.errors import QrsError
from qrs.model import read_checkpoint
from qrs.pipeline import REPEAT_COLUMNS, repeat
from qrs.train import TrainConfig

runner = CliRunner()
TRAIN_ARGS = ["--arch", "resnet18", "--num_epochs", "1", "--batch_size", "8", "--learning_rate", "1e-3",
              "--device", "cpu"]


def test_repeat_runs_every_seed_tabulates_them_and_skips_finished_seeds(prepared_small: Path, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "rep"
    result = runner.invoke(app, ["repeat", "--seeds", "3", "--seeds", "5", "--out", str(out), "--",
                                 "--data_root", str(prepared_small), *TRAIN_ARGS])
    assert result.exit_code == 0, result.output
    per_seed = {}
    for seed in (3, 5):
        run = out / f"seed-{seed}"
        assert read_checkpoint(run / "run" / "best_loss.pt")["meta"]["seed"] == seed
        assert (run / "report" / "report.html").is_file() and (run / "extract" / "gradcam_weights_test.npz").is_file()
        metrics = json.loads((run / "run" / "metrics.json").read_text())
        test = json.loads((run / "report" / "stats.json").read_text())["modes"]["test"]
        extract = pd.read_csv(run / "extract" / "gradcam_weights_test.csv")
        good = extract.loc[extract["label"] == 0, "qrs"]
        defective = extract[extract["label"] == 1]
        caught = defective[defective["prediction"] == 1]
        cut = read_checkpoint(run / "run" / "best_loss.pt")["meta"]["calibration"]["p_defective_cut"]
        p = extract["p_defective"]
        per_seed[seed] = [metrics["best_loss.pt"]["f1"], metrics["best_acc.pt"]["f1"], metrics["best_loss.pt"]["ap"],
                          metrics["best_loss.pt"]["auroc"], roc_auc_score(extract["label"], extract["peak"]),
                          test["qrs"]["auroc"], (caught["qrs"] > 0).mean() if len(caught) else np.nan,
                          roc_auc_score(extract["label"], p.where(p >= cut, 0.0)),
                          (caught["p_defective"] >= cut).mean() if len(caught) else np.nan,
                          test["qrs"]["mann_whitney_p"],
                          (good == 0).mean(), defective["pointing_hit"].mean(), defective["energy_in_boxes"].mean(),
                          defective["iou"].mean(), np.nan, pd.read_csv(run / "run" / "log.csv")["time_s"].mean()]
    table = pd.read_csv(out / "repeat.csv", index_col="seed")
    assert list(table.index) == ["3", "5", "mean", "std"] and list(table.columns) == list(REPEAT_COLUMNS)
    values = np.array([per_seed[3], per_seed[5]], dtype=float)
    np.testing.assert_allclose(table.loc[["3", "5"]].to_numpy(dtype=float), values)
    np.testing.assert_allclose(table.loc["mean"].to_numpy(dtype=float), values.mean(axis=0))
    np.testing.assert_allclose(table.loc["std"].to_numpy(dtype=float), values.std(axis=0, ddof=1))
    assert table["deletion_area"].isna().all()  # no --faithfulness
    saved = json.loads((out / "repeat.json").read_text())
    assert saved["seeds"] == [3, 5] and saved["mean"]["f1_best_loss"] == pytest.approx(values[:, 0].mean())
    assert "=== seed 3 (1/2) ->" in result.output and "=== seed 5 (2/2) ->" in result.output
    assert "F1 (best_loss.pt)" in result.output and "std: sample standard deviation over 2 seeds (ddof 1)" in result.output
    svg = (out / "curves.svg").read_text()  # every seed's training curves in one figure
    assert (out / "curves.png").read_bytes().startswith(b"\x89PNG")
    for seed in (3, 5):
        assert (out / f"seed-{seed}" / "run" / "curves.png").is_file()
        for text in (f"seed {seed}: validation loss", f"seed {seed}: best loss (epoch 1)", f"seed {seed}: mask term"):
            assert f"<!-- {text} -->" in svg, text

    def no_run(*args: object, **kwargs: object) -> None:
        raise AssertionError("a finished seed was run again")

    monkeypatch.setattr(pipeline, "run_pipeline", no_run)
    config = TrainConfig(data_root=prepared_small, arch="resnet18", num_epochs=1, batch_size=8, learning_rate=1e-3,
                         device="cpu")
    again = repeat(config, [5, 3], out, progress=False)
    np.testing.assert_allclose(again.rows.loc[[3, 5]].to_numpy(), values)
    with pytest.raises(QrsError, match=f"^{out / 'seed-5'} was trained with other options than these: use another "
                                       "--out, or remove .* to run it again$"):
        repeat(TrainConfig(**{**config.__dict__, "num_epochs": 2}), [5], out, progress=False)


def test_repeat_command_line_errors(prepared_small: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["repeat", "--out", str(tmp_path), "--", "--data_root", str(prepared_small),
                                 "--seed", "4", "--out", str(tmp_path / "x")])
    assert isinstance(result.exception, QrsError)
    assert str(result.exception) == ("qrs repeat sets --seed, --out itself (per seed, under --out): leave them out "
                                     "of the train options")
    result = runner.invoke(app, ["repeat", "--out", str(tmp_path), "--", "--data_root", str(prepared_small),
                                 "--epochs", "3"])
    assert isinstance(result.exception, QrsError)
    assert str(result.exception).startswith("after --, the `qrs train` options: No such option: --epochs")
    with pytest.raises(QrsError, match=r"--seeds repeats a seed: \[1, 1\]"):
        repeat(TrainConfig(data_root=prepared_small), [1, 1], tmp_path)
    with pytest.raises(QrsError, match="give at least one seed"):
        repeat(TrainConfig(data_root=prepared_small), [], tmp_path)


def test_seeds_are_multi_value_but_nothing_after_the_double_dash_changes() -> None:
    argv = ["repeat", "--seeds", "0", "1", "2", "--out", "r", "--", "--data_root", "d", "--modes", "a", "b"]
    assert _expand_multi_value_options(argv) == ["repeat", "--seeds", "0", "--seeds", "1", "--seeds", "2", "--out",
                                                 "r", "--", "--data_root", "d", "--modes", "a", "b"]


def test_the_pipeline_needs_the_test_split_among_its_modes(prepared_small: Path, tmp_path: Path) -> None:
    with pytest.raises(QrsError, match="^the pipeline's modes must include test, got train$"):
        pipeline.run_pipeline(prepared_small, tmp_path, TrainConfig(data_root=prepared_small), modes=("train",))
    assert list(tmp_path.iterdir()) == []


def test_a_seed_finished_before_an_option_existed_counts_as_the_same_at_its_default(tmp_path: Path) -> None:
    options = pipeline._train_options(TrainConfig(data_root=tmp_path, arch="resnet18", output_stride=16))
    older = {k: v for k, v in options.items() if k != "mask_map"}  # a qrs without --mask-map
    assert pipeline.same_options(older, options)
    assert not pipeline.same_options({**older, "arch": "resnet50"}, options)
    assert not pipeline.same_options({k: v for k, v in options.items() if k != "output_stride"}, options)
    assert not pipeline.same_options({**options, "retired_option": 1}, options)
