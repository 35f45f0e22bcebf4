"""The deletion test: the imputation and the metric against pytorch-grad-cam's ROAD, a model whose
answer is known (the defect alone decides), the summary by hand, and ``qrs analyze --faithfulness``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from pytorch_grad_cam.metrics.perturbation_confidence import (PerturbationConfidenceMetric,
                                                              RemoveLeastRelevantFirst, RemoveMostRelevantFirst)
from pytorch_grad_cam.metrics.road import NoisyLinearImputer
from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget
from scipy import stats
from torch import Tensor, nn

from qrs.errors import QrsError
from qrs.extract import extract
from qrs.faithfulness import (deletion_drops, deletion_summary, noisy_linear_impute, relevance_order,
                              removal_masks)
from qrs.model import base_meta, build_model, normalize, save_checkpoint
from qrs.report import analyze

SIDE = 32


ROAD_REFERENCE_WARNING = "ignore:__array_wrap__ must accept context:DeprecationWarning"
"""pytorch-grad-cam's imputer hands torch tensors to numpy (its warning, not ours)."""


@pytest.mark.filterwarnings(ROAD_REFERENCE_WARNING)
def test_imputation_equals_road_without_noise() -> None:
    g = torch.Generator().manual_seed(0)
    image = torch.randn(3, 24, 20, generator=g)
    remove = torch.rand(24, 20, generator=g) < 0.4
    reference = NoisyLinearImputer(noise=0)(image, (~remove).float())
    mine = noisy_linear_impute(image, remove, noise=0)
    torch.testing.assert_close(mine, reference, atol=1e-5, rtol=0)
    assert torch.equal(mine[:, ~remove], image[:, ~remove])


def test_a_lone_removed_pixel_is_the_weighted_mean_of_its_neighbours() -> None:
    image = torch.arange(25, dtype=torch.float32).reshape(1, 5, 5) ** 2
    remove = torch.zeros(5, 5, dtype=torch.bool)
    remove[2, 2] = remove[0, 0] = True
    out = noisy_linear_impute(image, remove, noise=0)[0]
    sides = image[0, 1, 2] + image[0, 3, 2] + image[0, 2, 1] + image[0, 2, 3]
    corners = image[0, 1, 1] + image[0, 1, 3] + image[0, 3, 1] + image[0, 3, 3]
    assert out[2, 2].item() == pytest.approx(float(sides / 6 + corners / 12))
    # A corner pixel has 3 neighbours in the image: weights 1/6, 1/6, 1/12 normalised by their sum 5/12.
    assert out[0, 0].item() == pytest.approx(float((image[0, 0, 1] / 6 + image[0, 1, 0] / 6 + image[0, 1, 1] / 12)
                                                   / (5 / 12)))


def test_imputation_noise_and_bad_masks() -> None:
    image = torch.zeros(3, 40, 40)
    remove = torch.zeros(40, 40, dtype=torch.bool)
    remove[5:35, 5:35] = True
    noisy = noisy_linear_impute(image, remove, noise=0.05, generator=torch.Generator().manual_seed(1))
    assert noisy[:, remove].std().item() == pytest.approx(0.05, rel=0.05)
    assert noisy[:, ~remove].abs().max() == 0
    again = noisy_linear_impute(image, remove, noise=0.05, generator=torch.Generator().manual_seed(1))
    assert torch.equal(noisy, again)
    with pytest.raises(ValueError, match="at least one pixel that is not removed"):
        noisy_linear_impute(image, torch.ones(40, 40, dtype=torch.bool))


def test_removal_masks_take_the_top_and_the_bottom_of_the_order() -> None:
    saliency = torch.tensor([[0.0, 5.0, 1.0], [3.0, 3.0, 9.0], [0.0, 2.0, 7.0]])
    order = relevance_order(saliency, torch.Generator().manual_seed(0))
    assert order[:3].tolist() == [5, 8, 1]  # 9, 7, 5
    assert sorted(order[3:5].tolist()) == [3, 4] and sorted(order[-2:].tolist()) == [0, 6]  # ties: 3, 3 and 0, 0
    masks = removal_masks(order, (3, 3), [0.2, 0.5])
    assert masks.shape == (4, 3, 3) and masks.sum(dim=(1, 2)).tolist() == [2, 4, 2, 4]  # round(1.8), round(4.5)
    assert masks[0].flatten().nonzero().flatten().tolist() == [5, 8]
    assert not (masks[1] & masks[3]).any()


class DefectDecides(nn.Module):
    """p_defective from the bright pixels alone: logit_1 = 2000 * mean(relu(grey - t)) - 5, logit_0 = 0,
    where t is the normalised grey level 200 (the background stays below 130, the defect is 250)."""

    def __init__(self) -> None:
        super().__init__()
        self.qrs_meta = base_meta("resnet18", SIDE)
        self.gain = nn.Parameter(torch.tensor(2000.0))
        self.threshold = float(normalize(torch.full((1, 3, 1, 1), 200.0), self.qrs_meta).mean())

    def forward(self, x: Tensor) -> Tensor:
        evidence = torch.relu(x.mean(dim=1) - self.threshold).mean(dim=(1, 2))
        logit = self.gain * evidence - 5.0
        return torch.stack([torch.zeros_like(logit), logit], dim=1)


def _parts(n: int, defective: bool) -> tuple[list[dict[str, Tensor]], Tensor]:
    """Parts with a smooth textured background and, if defective, a 4x4 defect at 250; their maps
    rank the pixels by closeness to the defect's place (a faithful map)."""
    g = torch.Generator().manual_seed(int(defective))
    yy, xx = torch.meshgrid(torch.arange(SIDE), torch.arange(SIDE), indexing="ij")
    items, maps = [], []
    for k in range(n):
        cy, cx = 8 + 4 * k % 16, 20 - 3 * k % 12
        image = (90 + 20 * torch.sin(xx / 5.0 + k) * torch.cos(yy / 7.0) + 5 * torch.rand(SIDE, SIDE, generator=g))
        if defective:
            image[cy - 2:cy + 2, cx - 2:cx + 2] = 250
        items.append({"image": image.round().to(torch.uint8).expand(3, SIDE, SIDE).clone()})
        maps.append(1.0 / (1.0 + (yy - cy + 0.5) ** 2 + (xx - cx + 0.5) ** 2))
    return items, torch.stack(maps)


def _p(model: nn.Module, items: list[dict[str, Tensor]]) -> np.ndarray:
    with torch.no_grad():
        x = normalize(torch.stack([i["image"] for i in items]), model.qrs_meta)
        return torch.softmax(model(x), dim=1)[:, 1].numpy()


def test_removing_the_defect_drops_p_and_removing_the_same_area_elsewhere_does_not() -> None:
    model = DefectDecides().eval()
    bad, bad_maps = _parts(6, True)
    good, good_maps = _parts(6, False)
    p_bad, p_good = _p(model, bad), _p(model, good)
    assert (p_bad > 0.99).all() and (p_good < 0.01).all()
    morf, lerf = deletion_drops(model, bad, bad_maps, p_bad, batch_size=16, progress=False)
    assert morf.shape == lerf.shape == (6, 4)
    assert (morf > 0.98).all()  # 5% of 1024 pixels = 51 >= the 16 defect pixels: gone at every fraction
    assert np.abs(lerf).max() < 1e-3  # the least relevant half never touches the defect
    # The reverse map ranks the defect last: its "most relevant" pixels are the background.
    rev_morf, rev_lerf = deletion_drops(model, bad, -bad_maps, p_bad, batch_size=16, progress=False)
    assert np.abs(rev_morf).max() < 1e-3 and np.allclose(rev_lerf[:, -1], p_bad - _p(model, good)[0], atol=0.02)
    g_morf, g_lerf = deletion_drops(model, good, good_maps, p_good, batch_size=16, progress=False)
    labels = np.array([1] * 6 + [0] * 6)
    summary = deletion_summary(np.concatenate([morf, g_morf]), np.concatenate([lerf, g_lerf]), labels)
    assert summary["defective"]["faithful"] and summary["defective"]["verdict"].endswith(
        "the model uses what the map shows.")
    assert summary["defective"]["verdict"].startswith("defective parts: removing the pixels the map ranks highest "
                                                      "lowers p_defective more than removing those it ranks lowest")
    reverse = deletion_summary(rev_morf, rev_lerf, np.ones(6))
    assert not reverse["defective"]["faithful"] and reverse["defective"]["area_between"] < -0.3
    assert reverse["defective"]["verdict"].startswith("defective parts: the map is no better than its reverse")
    assert reverse["good"] == {"n": 0, "morf_mean_drop": None, "lerf_mean_drop": None, "area_between": None,
                               "wilcoxon_p": None, "faithful": False, "verdict": "no good parts: no deletion test"}


@pytest.mark.filterwarnings(ROAD_REFERENCE_WARNING)
def test_drops_equal_pytorch_grad_cam_road_metric() -> None:
    torch.manual_seed(0)
    model = build_model("resnet18").eval()
    model.qrs_meta = base_meta("resnet18", SIDE)
    g = torch.Generator().manual_seed(3)
    images = torch.randint(0, 256, (3, 3, SIDE, SIDE), generator=g, dtype=torch.uint8)
    maps = torch.rand(3, SIDE, SIDE, generator=g)  # full-size raw maps (upsampling them is the identity), no ties
    x = normalize(images, model.qrs_meta)
    with torch.no_grad():
        p = torch.softmax(model(x), dim=1)[:, 1].numpy()
    morf, lerf = deletion_drops(model, [{"image": im} for im in images], maps, p, fractions=[0.25], noise=0,
                                progress=False)
    targets = [ClassifierOutputSoftmaxTarget(1)] * 3
    # percentile 75 of 1024 distinct values keeps 768 pixels: the top (or bottom) 256 = 25% are removed.
    for removal, drops in ((RemoveMostRelevantFirst, morf), (RemoveLeastRelevantFirst, lerf)):
        road = PerturbationConfidenceMetric(removal(75, NoisyLinearImputer(noise=0)))
        np.testing.assert_allclose(drops[:, 0], -road(x, maps.numpy(), targets, model), atol=1e-5)


def test_summary_areas_and_test_by_hand() -> None:
    morf = np.array([[0.2, 0.4, 0.6, 0.8], [0.1, 0.1, 0.3, 0.5], [0.0, 0.2, 0.2, 0.2]])
    lerf = np.array([[0.0, 0.0, 0.1, 0.1], [0.1, 0.0, 0.0, 0.1], [0.1, 0.0, 0.0, 0.0]])
    d = morf - lerf
    # Trapezoids from (0, 0) over 0.05, 0.1, 0.2, 0.5.
    areas = (0.05 * d[:, 0] / 2 + 0.05 * (d[:, 0] + d[:, 1]) / 2 + 0.1 * (d[:, 1] + d[:, 2]) / 2
             + 0.3 * (d[:, 2] + d[:, 3]) / 2)
    s = deletion_summary(morf, lerf, np.ones(3))
    assert s["defective"]["area_between"] == pytest.approx(areas.mean())
    assert s["defective"]["morf_mean_drop"] == pytest.approx(morf.mean(axis=0).tolist())
    assert s["defective"]["wilcoxon_p"] == pytest.approx(stats.wilcoxon(areas, alternative="greater").pvalue)
    assert s["fractions"] == [0.05, 0.1, 0.2, 0.5] and s["defective"]["n"] == 3
    with pytest.raises(ValueError, match=r"deletion fractions must be in \(0, 1\), got \[0.5, 1.0\]"):
        deletion_summary(morf, lerf, np.ones(3), fractions=[0.5, 1.0])


def test_analyze_faithfulness_writes_curves_plot_and_verdicts(prepared_small: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = tmp_path / "m.pt"
    save_checkpoint(model, build_model("resnet18"), base_meta("resnet18", SIDE))
    extract(prepared_small, model, modes=["test"], out_dir=tmp_path / "x", device="cpu", progress=False)
    result = analyze(tmp_path / "x", faithfulness=True, fractions=(0.1, 0.5), device="cpu", progress=False,
                     n_resamples=50)
    faith = json.loads((tmp_path / "x" / "analysis" / "stats.json").read_text())["modes"]["test"]["faithfulness"]
    rows = result.stats["modes"]["test"]
    assert faith["fractions"] == [0.1, 0.5]
    assert faith["defective"]["n"] == rows["qrs"]["n_defective"] and faith["good"]["n"] == rows["qrs"]["n_good"]
    assert len(faith["defective"]["morf_mean_drop"]) == 2
    assert (tmp_path / "x" / "analysis" / "deletion_test.png").stat().st_size > 1000
    html = result.report.read_text()
    assert "Does the model use what the map shows? Deletion test (test)" in html
    assert faith["defective"]["verdict"] in html and faith["good"]["verdict"] in html
    assert "deletion test: " + faith["defective"]["verdict"] in result.headline()
    with pytest.raises(QrsError, match=r"--faithfulness-split train: .* has no extract of that split \(it has test\)"):
        analyze(tmp_path / "x", faithfulness=True, faithfulness_split="train")
    model.unlink()
    with pytest.raises(QrsError, match=f"the deletion test runs the model of the extract, {model}, which does not "
                                       "exist"):
        analyze(tmp_path / "x", faithfulness=True, device="cpu")
