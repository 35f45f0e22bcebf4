"""Statistics, localisation metrics, plots and the HTML report."""

from __future__ import annotations

import base64
import json
import math
import pickle
import re
from html import escape as html_escape
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats
from sklearn.metrics import roc_auc_score

from qrs.analysis import (agreement, best_epochs, distribution_plot, localisation, qrs_statistics, threshold_sweep,
                          training_curves_plot, zero_shares)
from qrs.data.preparation import prepare
from qrs.bootstrap import BootstrapOptions, qrs_intervals, with_interval
from qrs.errors import QrsError
from qrs.extract import ScoreOptions, calibrate, extract
from qrs.model import base_meta, build_model, read_checkpoint, save_checkpoint, update_checkpoint_meta
from qrs.report import analyze, load_mode, per_defect_type, sweep_qrs


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
    caught = rows[(rows.label == 1) & (rows.prediction == 1)]
    table = saved["modes"]["test"]["agreement"]["table"]
    assert table["caught"] == {"qrs_0": int((caught["qrs"] == 0).sum()), "qrs_above_0": int((caught["qrs"] > 0).sum())}
    assert sum(v for row in table.values() for v in row.values()) == len(rows)
    for mode in ("train", "test"):
        for ext in ("png", "svg"):
            assert (tmp_path / "x" / "analysis" / f"qrs_distribution_{mode}.{ext}").stat().st_size > 1000
        assert (tmp_path / "x" / "analysis" / f"agreement_{mode}.png").stat().st_size > 1000
    html = result.report.read_text()
    for heading in ("Classification (test split)", "QRS: defective vs non-defective", "Localisation",
                    "Agreement of QRS with the classifier", "Distributions", "Highest QRS (test)", "Missed defects",
                    "False alarms"):
        assert heading in html
    assert "resnet18 &middot; Grad-CAM++" in html and "0.5000" in html
    cal = read_checkpoint(model)["meta"]["calibration"]
    assert saved["options"]["calibration"] == {k: cal[k] for k in ("anchor", "quantile", "split", "n_parts",
                                                                    "p_defective_cut")}
    ceiling = saved["modes"]["test"]["agreement"]["ceiling"]
    assert ceiling["p_cut"] == cal["p_defective_cut"]
    assert ceiling["passed_at_0"] == pytest.approx(
        (rows[(rows.label == 0) & (rows.prediction == 0)]["p_defective"] < cal["p_defective_cut"]).mean())
    assert (f"here p_defective &ge; {cal['p_defective_cut']:.3f}) would give QRS AUROC" in html
            and f"(ceiling {ceiling['auroc_qrs']:.4f})" in result.headline())
    assert (f"(anchor good: 0.99 quantile of the map peaks of {cal['n_parts']} good {cal['split']} parts)") in html
    images = re.findall(r"src='data:image/png;base64,", html)
    n_top = min(8, len(rows)) + min(8, len(pd.read_csv(tmp_path / "x" / "gradcam_weights_train.csv")))
    assert len(images) >= 4 + 2 * n_top
    assert "http://" not in html and "https://" not in html
    svg = (tmp_path / "x" / "analysis" / "qrs_distribution_test.svg").read_text()
    for text in ("<!-- resnet18 &amp; Grad-CAM++ -->", "<!-- QRS (Quality Risk Score) -->", "<!-- Count -->",
                 "<!-- defective -->", "<!-- non-defective -->"):
        assert text in svg


def test_analyze_without_extract_outputs(tmp_path: Path) -> None:
    with pytest.raises(QrsError, match="no `qrs extract` outputs"):
        analyze(tmp_path)


@pytest.fixture(scope="module")
def prepared_64(ksdd2_raw: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``ksdd2_raw`` at 64 px: resnet18's maps are 2 x 2 there, so they vary over the image (1 x 1 at 32 px)."""
    out = tmp_path_factory.mktemp("prepared") / "p64"
    prepare("ksdd2", ksdd2_raw, out, img_size=64, progress=False)
    return out


@pytest.fixture()
def left_half(prepared_64: Path, tmp_path: Path) -> Path:
    """A random resnet18 for 64 px (returned), calibrated on the median good peak so that about half
    the parts score above 0, and tmp_path/left.pkl setting the ROI to the left half."""
    torch.manual_seed(0)
    model = tmp_path / "m.pt"
    save_checkpoint(model, build_model("resnet18"), base_meta("resnet18", 64))
    calibrate(model, prepared_64, quantile=0.5, device="cpu", progress=False)
    coords = pickle.loads((prepared_64 / "coords.pkl").read_bytes())
    left = {k: {"roi": [[0.0, 0.0, 0.5, 1.0]], "defects": v["defects"]} for k, v in coords.items()}
    (tmp_path / "left.pkl").write_bytes(pickle.dumps(left))
    return model


@pytest.mark.parametrize("options", [ScoreOptions(), ScoreOptions(norm="image", aggregation="area", threshold=0.7),
                                     ScoreOptions(compat=True, threshold=0.6)], ids=["dataset", "image-area", "compat"])
def test_sweep_from_the_npz_gives_back_the_extract_qrs(prepared_64: Path, tmp_path: Path,
                                                       left_half: Path,
                                                       options: ScoreOptions) -> None:
    model = left_half
    extract(prepared_64, model, modes=["test"], coords_path=tmp_path / "left.pkl", out_dir=tmp_path / "x",
            options=options, device="cpu", progress=False)
    mo = load_mode(tmp_path / "x", "gradcam_weights", "test")
    got = sweep_qrs(mo, [0.5, options.threshold, 0.95])
    assert np.abs(got[:, 1] - mo.rows["qrs"].to_numpy()).max() < 1e-6
    assert (mo.rows["qrs"] > 0).any()


def test_sweep_equals_a_numpy_computation_at_every_threshold(prepared_64: Path, tmp_path: Path,
                                                             left_half: Path) -> None:
    model = left_half
    extract(prepared_64, model, modes=["test"], coords_path=tmp_path / "left.pkl", out_dir=tmp_path / "x",
            device="cpu", progress=False)
    mo = load_mode(tmp_path / "x", "gradcam_weights", "test")
    scale = mo.options["scale"]
    maps = torch.nn.functional.interpolate(torch.from_numpy(mo.raw_maps)[:, None], size=(64, 64), mode="bilinear",
                                           align_corners=False)[:, 0].numpy()
    m = np.clip(maps / scale, 0, 1)
    taus = [0.8, 0.9, 1.0]
    pruned = mo.raw_maps.max(axis=(1, 2)) / scale < 0.8
    assert pruned.any() and (~pruned).any()  # both paths of sweep_qrs are taken
    expected = np.stack([np.where((m >= t) & (np.arange(64) < 32), m, 0).sum(axis=(1, 2)) / (32 * 64) for t in taus],
                        axis=1)
    got = sweep_qrs(mo, taus)
    np.testing.assert_allclose(got, expected, atol=1e-6)
    assert (got[~pruned] > 0).any()
    rows = threshold_sweep(got, mo.rows["label"].to_numpy(), taus)
    labels = mo.rows["label"].to_numpy()
    assert [r["threshold"] for r in rows] == taus
    assert rows[0]["auroc"] == pytest.approx(roc_auc_score(labels, got[:, 0]))
    assert rows[2]["mann_whitney_p"] == pytest.approx(
        stats.mannwhitneyu(got[labels == 1, 2], got[labels == 0, 2], alternative="two-sided").pvalue)
    assert rows[1]["zero_share_good"] == pytest.approx(np.mean(got[labels == 0, 1] == 0))


def test_report_says_how_sure_the_numbers_are(prepared_64: Path, tmp_path: Path,
                                             left_half: Path) -> None:
    model = left_half
    extract(prepared_64, model, modes=["train", "test"], coords_path=tmp_path / "left.pkl", out_dir=tmp_path / "x",
            device="cpu", progress=False)
    metrics = {"m.pt": {"f1": 0.5, "precision": 0.4, "recall": 0.6, "accuracy": 0.7, "ap": 0.5, "auroc": 0.6,
                        "confusion_matrix": [[1, 2], [3, 4]], "ci": {"f1": [0.41, 0.62], "precision": [0.3, 0.5],
                                                                     "recall": [0.5, 0.7], "ap": [0.4, 0.6],
                                                                     "auroc": [0.5, 0.7]}}}
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    result = analyze(tmp_path / "x", metrics=tmp_path / "metrics.json", n_resamples=200)
    saved = json.loads((tmp_path / "x" / "analysis" / "stats.json").read_text())
    assert saved["ci_options"] == {"n_resamples": 200, "confidence": 0.95, "seed": 0, "method": "percentile",
                                   "stratified": True}
    html = result.report.read_text()
    assert "<h2>How sure are these numbers</h2>" in html and "0.500 [0.410, 0.620]" in html
    for mode in ("train", "test"):
        st = saved["modes"][mode]
        rows = pd.read_csv(tmp_path / "x" / f"gradcam_weights_{mode}.csv", dtype={"id": str})
        expected = qrs_intervals(rows["label"].to_numpy(), rows["qrs"].to_numpy(), BootstrapOptions(n_resamples=200))
        assert st["qrs_ci"] == expected
        assert with_interval(st["qrs"]["auroc"], st["qrs_ci"]["auroc"]) in html
        sweep = st["threshold_sweep"]
        assert [r["threshold"] for r in sweep["rows"]] == [0.5, 0.6, 0.7, 0.8, 0.9, 0.95] and sweep["chosen"] == 0.9
        at_tau = next(r for r in sweep["rows"] if r["threshold"] == 0.9)
        assert at_tau["auroc"] == pytest.approx(st["qrs"]["auroc"])
        assert at_tau["mann_whitney_p"] == pytest.approx(st["qrs"]["mann_whitney_p"])
        assert sweep["note"].startswith("QRS recomputed at each tau from the stored raw maps and ROI with the "
                                        f"calibration scale held fixed (s = {sweep['scale']:.6g})")
        assert f"<h3>Threshold sweep ({mode})</h3>" in html
        assert (tmp_path / "x" / "analysis" / f"threshold_sweep_{mode}.png").stat().st_size > 1000
    assert html.count("<b>0.9 (chosen)</b>") == 2
    assert f"QRS AUROC = {with_interval(saved['modes']['test']['qrs']['auroc'], saved['modes']['test']['qrs_ci']['auroc'])}" \
        in result.headline()


def test_without_resamples_sweep_or_stored_roi(prepared_64: Path, tmp_path: Path,
                                               left_half: Path) -> None:
    model = left_half
    extract(prepared_64, model, modes=["test"], out_dir=tmp_path / "x", device="cpu", progress=False)
    plain = analyze(tmp_path / "x", n_resamples=0, sweep=False)
    assert plain.stats["modes"]["test"]["qrs_ci"] == {"auroc": None, "zero_share_good": None}
    assert "threshold_sweep" not in plain.stats["modes"]["test"]
    assert "No confidence intervals (<code>--n-resamples 0</code>)" in plain.report.read_text()
    npz_path = tmp_path / "x" / "gradcam_weights_test.npz"
    with np.load(npz_path) as npz:
        old = {k: npz[k] for k in npz.files if k != "roi_bits"}
    np.savez_compressed(npz_path, **old)
    sweep = analyze(tmp_path / "x", n_resamples=0).stats["modes"]["test"]["threshold_sweep"]
    assert sweep == {"rows": [], "note": "gradcam_weights_test.npz has no ROI masks (written before `qrs extract` "
                                         "stored them): re-run `qrs extract` for the threshold sweep"}
    with pytest.raises(QrsError, match="--n-resamples must be >= 0, got -5"):
        analyze(tmp_path / "x", n_resamples=-5)


def test_distribution_plot_states_the_zero_shares_and_shows_the_parts_above_0_alone(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    qrs = np.concatenate([np.zeros(115), rng.uniform(1e-4, 3e-3, 5), rng.lognormal(np.log(0.01), 1.0, 30)])
    labels = np.array([0] * 120 + [1] * 30)
    assert zero_shares(qrs, labels) == {"non-defective": (115, 120), "defective": (0, 30)}
    paths = distribution_plot(qrs, labels, "resnet18", tmp_path / "d", subtitle="test split, n = 150")
    assert [p.name for p in paths] == ["d.png", "d.svg"]
    svg = paths[1].read_text()
    for text in ("resnet18 &amp; Grad-CAM++", "test split, n = 150", "QRS (Quality Risk Score)", "Count",
                 "at QRS = 0", "non-defective: 95.8% (115 of 120)", "defective: 0.0% (0 of 30)",
                 "parts with QRS &gt; 0 only (n = 35)", "QRS (Quality Risk Score), log scale"):
        assert f"<!-- {text} -->" in svg, text
    flat = distribution_plot(np.zeros(4), np.array([0, 0, 1, 1]), "resnet18", tmp_path / "z")[1].read_text()
    assert "<!-- parts with QRS &gt; 0 only (n = 0) -->" in flat and "<!-- no part has QRS &gt; 0 -->" in flat


def _log_rows(val_losses: list[float], val_accs: list[float], guided: bool) -> list[dict]:
    rows = []
    for epoch, (loss, acc) in enumerate(zip(val_losses, val_accs), 1):
        row = {"epoch": epoch, "mask_loss": "energy" if guided else "none", "train_loss": 1 / epoch}
        if guided:
            row.update(train_mask_loss=0.9 / epoch, mask_weight=min(1.0, epoch / 2))
        rows.append({**row, "val_loss": loss, "val_acc": acc, "val_f1": acc / 2, "time_s": 1.0, "lr": 1e-3})
    return rows


def test_training_curves_mark_the_epochs_of_both_checkpoints(tmp_path: Path) -> None:
    rows = _log_rows([0.9, 0.4, 0.5, 0.4], [0.6, 0.8, 0.9, 0.9], guided=True)
    assert best_epochs(rows) == (2, 3)  # the first lowest loss and the first highest accuracy, as train keeps them
    svg = training_curves_plot({"": rows}, tmp_path / "one", title="run: resnet18")[1].read_text()
    for text in ("run: resnet18", "training loss", "validation loss", "accuracy", "F1", "mask term", "weight lambda",
                 "learning rate", "best loss (epoch 2)", "best accuracy (epoch 3)", "epoch"):
        assert f"<!-- {text} -->" in svg, text
    plain = _log_rows([0.7, 0.6], [0.5, 0.5], guided=False)
    svg = training_curves_plot({"seed 0": rows, "seed 1": plain}, tmp_path / "seeds")[1].read_text()
    for text in ("seed 0: best loss (epoch 2)", "seed 1: best loss (epoch 2)", "seed 1: best accuracy (epoch 1)",
                 "seed 0: mask term", "seed 1: validation loss"):
        assert f"<!-- {text} -->" in svg, text
    assert "<!-- seed 1: mask term -->" not in svg
    unguided = training_curves_plot({"": plain}, tmp_path / "plain")[1].read_text()
    assert "mask term" not in unguided and "<!-- loss (cross-entropy) -->" in unguided


def test_report_shows_the_training_curves_of_the_checkpoints_run_or_says_why_not(prepared_small: Path,
                                                                               tmp_path: Path) -> None:
    run = tmp_path / "run"
    curves = training_curves_plot({"": _log_rows([0.9, 0.4], [0.6, 0.8], guided=False)}, run / "curves")[0]
    torch.manual_seed(0)
    model = tmp_path / "m.pt"
    save_checkpoint(model, build_model("resnet18"), {**base_meta("resnet18", 32), "run_dir": str(run)})
    extract(prepared_small, model, modes=["test"], out_dir=tmp_path / "x", device="cpu", progress=False)
    result = analyze(tmp_path / "x", n_resamples=0, sweep=False)
    assert result.stats["training_curves"] == {"run_dir": str(run), "png": str(curves), "note": ""}
    html = result.report.read_text()
    assert "<h2>Training curves</h2>" in html
    assert f"src='data:image/png;base64,{base64.b64encode(curves.read_bytes()).decode()}'" in html
    curves.unlink()
    gone = analyze(tmp_path / "x", n_resamples=0, sweep=False)
    note = (f"{curves} does not exist (the run directory was moved or removed, or the run was trained before qrs "
            "drew its curves): no training curves")
    assert gone.stats["training_curves"]["note"] == note and note in gone.report.read_text()
    save_checkpoint(model, build_model("resnet18"), base_meta("resnet18", 32))
    extract(prepared_small, model, modes=["test"], out_dir=tmp_path / "x", device="cpu", progress=False)
    older = analyze(tmp_path / "x", n_resamples=0, sweep=False)
    note = (f"the checkpoint {model} records no run directory (it was trained before qrs recorded one, or extracted "
            "before the extract kept it): no training curves")
    assert older.stats["training_curves"] == {"run_dir": None, "png": None, "note": note}
    assert "<h2>Training curves</h2>" in older.report.read_text() and note in older.report.read_text()


def test_report_counts_the_parts_per_risk_level(prepared_64: Path, tmp_path: Path, left_half: Path) -> None:
    model = left_half
    extract(prepared_64, model, modes=["test"], out_dir=tmp_path / "x", device="cpu", progress=False)
    none = analyze(tmp_path / "x", n_resamples=0, sweep=False)
    assert none.stats["modes"]["test"]["risk_levels"] is None
    note = read_checkpoint(model)["meta"]["calibration"]["risk_note"]
    assert note.startswith("too few defective validation parts")
    assert f"No risk levels: {html_escape(note)}." in none.report.read_text()
    rows = pd.read_csv(tmp_path / "x" / "gradcam_weights_test.csv", dtype={"id": str})
    positive = np.sort(rows["qrs"][rows["qrs"] > 0].to_numpy())
    low, high = float(positive[0]), float(positive[len(positive) // 2])
    cal = read_checkpoint(model)["meta"]["calibration"]
    update_checkpoint_meta(model, calibration={**cal, "risk_cuts": {"low": low, "high": high},
                                               "risk_note": "set by hand"})
    extract(prepared_64, model, modes=["test"], out_dir=tmp_path / "x", device="cpu", progress=False)
    result = analyze(tmp_path / "x", n_resamples=0, sweep=False)
    q, lab = rows["qrs"].to_numpy(), rows["label"].to_numpy()
    bands = {"low": q < low, "medium": (q >= low) & (q < high), "high": q >= high}
    expected = {k: {"good": int((b & (lab == 0)).sum()), "defective": int((b & (lab == 1)).sum())}
                for k, b in bands.items()}
    assert result.stats["modes"]["test"]["risk_levels"] == expected
    page = result.report.read_text()
    assert "<h2>Risk levels</h2>" in page and "set by hand" in page
    cells = "".join(f"<td>{e['good']} / {e['defective']}</td>" for e in expected.values())
    assert f"<tr><td>test</td>{cells}</tr>" in page


def test_agreement_counts_each_verdict_by_qrs_and_compares_aurocs() -> None:
    labels = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0])
    prediction = np.array([1, 1, 1, 0, 0, 0, 0, 1, 1])
    qrs = np.array([0.2, 0.0, 0.1, 0.05, 0.0, 0.0, 0.3, 0.0, 0.4])
    p = np.array([0.9, 0.8, 0.95, 0.4, 0.1, 0.2, 0.3, 0.6, 0.7])
    peak = np.array([5.0, 1.0, 4.0, 3.0, 0.5, 0.4, 6.0, 0.2, 2.0])
    out = agreement(labels, prediction, p, qrs, peak)
    assert out["table"] == {"caught": {"qrs_0": 1, "qrs_above_0": 2}, "missed": {"qrs_0": 0, "qrs_above_0": 1},
                            "passed": {"qrs_0": 2, "qrs_above_0": 1}, "flagged": {"qrs_0": 1, "qrs_above_0": 1}}
    assert out["caught_with_qrs"] == pytest.approx(2 / 3) and out["passed_at_0"] == pytest.approx(2 / 3)
    # AUROC by counting pairs (defective above good, ties half) instead of scikit-learn
    def pairs(scores: np.ndarray) -> float:
        bad, good = scores[labels == 1], scores[labels == 0]
        return float(np.mean([(b > g) + 0.5 * (b == g) for b in bad for g in good]))
    assert out["auroc_p_defective"] == pytest.approx(pairs(p)) and out["auroc_peak"] == pytest.approx(pairs(peak))
    assert out["auroc_qrs"] == pytest.approx(pairs(qrs))
    one_class = agreement(np.ones(3), np.ones(3), np.ones(3), np.ones(3), np.ones(3))
    assert one_class["auroc_qrs"] is None and one_class["passed_at_0"] is None and one_class["caught_with_qrs"] == 1.0
    assert out["ceiling"] is None


def test_the_ceiling_scores_parts_as_the_classifier_ranks_them_from_the_cut_on() -> None:
    labels = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0])
    prediction = np.array([1, 1, 1, 0, 0, 0, 0, 1, 1])
    p = np.array([0.9, 0.6, 0.95, 0.4, 0.1, 0.2, 0.3, 0.6, 0.7])
    out = agreement(labels, prediction, p, np.zeros(9), np.ones(9), p_cut=0.65)
    ceiling = out["ceiling"]
    # caught parts at p 0.9, 0.6, 0.95: two reach the cut; passed goods at 0.1, 0.2, 0.3: all under it
    assert ceiling["p_cut"] == 0.65
    assert ceiling["caught_with_qrs"] == pytest.approx(2 / 3) and ceiling["passed_at_0"] == 1.0
    # pairs by hand: the ceiling scores are 0.9, 0, 0.95, 0 against 0, 0, 0, 0, 0.7; ties count half
    bad, good = [0.9, 0.0, 0.95, 0.0], [0.0, 0.0, 0.0, 0.0, 0.7]
    by_hand = np.mean([(b > g) + 0.5 * (b == g) for b in bad for g in good])
    assert ceiling["auroc_qrs"] == pytest.approx(by_hand)
    # a cut at or below every score leaves the classifier's own AUROC
    assert agreement(labels, prediction, p, np.zeros(9), np.ones(9), p_cut=0.0)["ceiling"]["auroc_qrs"] == \
        pytest.approx(out["auroc_p_defective"])
