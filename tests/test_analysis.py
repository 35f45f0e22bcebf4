"""Statistics, localisation metrics, plots and the HTML report."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats
from sklearn.metrics import roc_auc_score

from qrs.analysis import localisation, qrs_statistics
from qrs.errors import QrsError
from qrs.extract import extract
from qrs.model import base_meta, build_model, read_checkpoint, save_checkpoint
from qrs.report import analyze, per_defect_type


def test_statistics_equal_scipy_computed_independently() -> None:
    rng = np.random.default_rng(0)
    qrs = np.concatenate([rng.uniform(0, 0.3, 40), np.zeros(20), rng.uniform(0.1, 0.9, 15)])
    labels = np.array([0] * 60 + [1] * 15)
    got = qrs_statistics(qrs, labels)
    bad, good = qrs[labels == 1], qrs[labels == 0]
    mw = stats.mannwhitneyu(bad, good, alternative="two-sided")
    welch = stats.ttest_ind(bad, good, equal_var=False)
    ks = stats.ks_2samp(bad, good)
    assert got["mann_whitney_p"] == pytest.approx(mw.pvalue) and got["mann_whitney_u"] == pytest.approx(mw.statistic)
    assert got["welch_p"] == pytest.approx(welch.pvalue) and got["ks_p"] == pytest.approx(ks.pvalue)
    assert got["auroc"] == pytest.approx(roc_auc_score(labels, qrs))
    assert got["zero_share_good"] == pytest.approx(20 / 60) and got["zero_share_defective"] == 0.0
    assert got["median_defective"] == pytest.approx(np.median(bad))
    one_class = qrs_statistics(np.zeros(3), np.zeros(3))
    assert one_class["mann_whitney_p"] is None and one_class["auroc"] is None


def test_localisation_by_hand() -> None:
    # 224 x 224 grid: the tolerance is exactly 15 px.
    maps = torch.zeros(3, 224, 224)
    maps[:, 100, 100] = 1.0
    defect = torch.zeros(3, 224, 224, dtype=torch.bool)
    defect[0, 100, 110:120] = True  # 10 px from the peak: a hit
    defect[1, 100, 116:120] = True  # 16 px away: a miss
    boxes = defect.clone()
    m = torch.zeros(3, 224, 224)
    m[:, 100, 100:120] = 1.0  # 20 pixels at 1: 10 inside image 0's box
    out = localisation(maps, m, defect, boxes, threshold=0.9)
    assert out["pointing_hit"][:2].tolist() == [1.0, 0.0] and math.isnan(out["pointing_hit"][2])
    assert out["energy_in_boxes"][0] == pytest.approx(10 / 20)
    assert out["iou"][0] == pytest.approx(10 / 20) and out["iou"][1] == pytest.approx(4 / 20)
    assert math.isnan(out["iou"][2]) and math.isnan(out["energy_in_boxes"][2])


def test_per_defect_type_splits_comma_lists() -> None:
    rows = pd.DataFrame({"label": [1, 1, 1, 0], "defect_type": ["1,2", "2", "", ""], "qrs": [0.2, 0.4, 0.9, 0.0]})
    assert per_defect_type(rows) == {"1": {"n": 1, "median_qrs": 0.2, "mean_qrs": 0.2},
                                     "2": {"n": 2, "median_qrs": pytest.approx(0.3), "mean_qrs": pytest.approx(0.3)}}


def test_analyze_writes_stats_plots_and_a_self_contained_report(prepared_small: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = tmp_path / "m.pt"
    save_checkpoint(model, build_model("resnet18"), base_meta("resnet18", 32))
    extract(prepared_small, model, modes=["train", "test"], out_dir=tmp_path / "x", device="cpu", progress=False)
    metrics = {"m.pt": {"f1": 0.5, "precision": 0.4, "recall": 0.6, "accuracy": 0.7, "ap": 0.5, "auroc": 0.6,
                        "confusion_matrix": [[1, 2], [3, 4]]}}
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    result = analyze(tmp_path / "x", metrics=tmp_path / "metrics.json")
    saved = json.loads((tmp_path / "x" / "analysis" / "stats.json").read_text())
    rows = pd.read_csv(tmp_path / "x" / "gradcam_weights_test.csv", dtype={"id": str})
    bad, good = rows[rows.label == 1]["qrs"], rows[rows.label == 0]["qrs"]
    expected_p = stats.mannwhitneyu(bad, good, alternative="two-sided").pvalue
    assert saved["modes"]["test"]["qrs"]["mann_whitney_p"] == pytest.approx(expected_p)
    hits = rows[rows.label == 1]["pointing_hit"].dropna()
    assert saved["modes"]["test"]["localisation"]["pointing_game"] == pytest.approx(hits.mean())
    for mode in ("train", "test"):
        for ext in ("png", "svg"):
            assert (tmp_path / "x" / "analysis" / f"qrs_distribution_{mode}.{ext}").stat().st_size > 1000
    html = result.report.read_text()
    for heading in ("Classification (test split)", "QRS: defective vs non-defective", "Localisation",
                    "Distributions", "Highest QRS (test)", "Missed defects", "False alarms"):
        assert heading in html
    assert "resnet18 &middot; Grad-CAM++" in html and "0.5000" in html
    cal = read_checkpoint(model)["meta"]["calibration"]
    assert saved["options"]["calibration"] == {k: cal[k] for k in ("anchor", "quantile", "split", "n_parts")}
    assert (f"(anchor good: 0.99 quantile of the map peaks of {cal['n_parts']} good {cal['split']} parts)") in html
    images = re.findall(r"src='data:image/png;base64,", html)
    n_top = min(8, len(rows)) + min(8, len(pd.read_csv(tmp_path / "x" / "gradcam_weights_train.csv")))
    assert len(images) >= 2 + 2 * n_top
    assert "http://" not in html and "https://" not in html
    svg = (tmp_path / "x" / "analysis" / "qrs_distribution_test.svg").read_text()
    for text in ("<!-- resnet18 &amp; Grad-CAM++ -->", "<!-- QRS (Quality Risk Score) -->", "<!-- Count -->",
                 "<!-- defective -->", "<!-- non-defective -->"):
        assert text in svg


def test_analyze_without_extract_outputs(tmp_path: Path) -> None:
    with pytest.raises(QrsError, match="no `qrs extract` outputs"):
        analyze(tmp_path)
