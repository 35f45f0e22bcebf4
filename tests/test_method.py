"""docs/method.md: its formulas are the ones the code computes (each quoted formula is looked up in the
page, then checked numerically on a tiny model or by hand), its links resolve, and no file of the
repository cites the method by any other document."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from qrs.cam import compute_cams, gap_linear
from qrs.data.dataset import PreparedDataset
from qrs.extract import calibrate
from qrs.guidance import default_dilation, energy_loss, mask_weight
from qrs.model import base_meta, build_model, normalize, read_checkpoint, save_checkpoint
from qrs.score import calibration_scale, quality_risk_score, risk_cuts
from qrs.train import class_weight_tensor

ROOT = Path(__file__).resolve().parents[1]
METHOD = (ROOT / "docs" / "method.md").read_text()
SKIPPED_DIRS = {".git", ".venv", "__pycache__", ".pytest_cache", "demo-out", "node_modules"}


def quoted(formula: str) -> str:
    """``formula`` as docs/method.md writes it (fails when the page no longer says so)."""
    assert formula in METHOD, f"docs/method.md no longer contains {formula!r}"
    return formula


def repository_files() -> list[Path]:
    """Every file of the working tree, without version control, virtual environments, caches and outputs."""
    return [p for p in ROOT.rglob("*") if p.is_file() and not SKIPPED_DIRS & set(p.relative_to(ROOT).parts)
            and not any(part.endswith(".egg-info") for part in p.relative_to(ROOT).parts)]


def test_no_file_names_the_unpublished_reference() -> None:
    name = ("qrs" + "_" + "spec").encode()  # built from pieces, so that this file does not name it either
    files = repository_files()
    assert ROOT / "README.md" in files and ROOT / "src" / "qrs" / "cam.py" in files
    naming = [str(p.relative_to(ROOT)) for p in files if name in p.read_bytes().lower()]
    assert naming == [], f"cite docs/method.md instead in {naming}"


def _slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^a-z0-9 _-]", "", heading.strip().lower()).replace(" ", "-")


def test_every_link_into_method_md_names_one_of_its_sections() -> None:
    anchors = {_slug(h) for h in re.findall(r"^#{2,4} (.+)$", METHOD, flags=re.M)}
    assert {"calibration", "quality-risk-score", "mask-guided-training", "without-a-backward-pass", "risk-levels",
            "statistics", "differences-from-the-paper"} <= anchors
    links = {(str(p.relative_to(ROOT)), a) for p in repository_files() if p.suffix in (".py", ".md", ".toml")
             for a in re.findall(r"method\.md#([\w-]+)", p.read_text())}
    links |= {("docs/method.md", a) for a in re.findall(r"\]\(#([\w-]+)\)", METHOD)}
    assert len(links) > 20
    assert [link for link in links if link[1] not in anchors] == []


@pytest.fixture(scope="module")
def tiny() -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model("resnet18").eval()
    model.qrs_meta = base_meta("resnet18", 64)
    return model


def test_the_closed_form_gradient_is_the_gradient(tiny: torch.nn.Module) -> None:
    quoted("g_k(i,j) = W[c,k] / (h w)")
    images = torch.randn(2, 3, 64, 64)
    captured = {}
    handle = tiny.layer4.register_forward_hook(lambda m, i, out: captured.setdefault("a", out))
    with torch.enable_grad():
        logits = tiny(images)
        grad = torch.autograd.grad(logits[:, 1].sum(), captured["a"])[0]
    handle.remove()
    h, w = grad.shape[-2:]
    expected = (tiny.fc.weight[1] / (h * w)).view(1, -1, 1, 1).expand_as(grad)
    torch.testing.assert_close(grad, expected, atol=1e-7, rtol=1e-5)
    split = gap_linear(tiny)
    torch.testing.assert_close(split.gradient(captured["a"].detach(), 1), expected)


def test_grad_cam_plus_plus_is_the_quoted_sum(tiny: torch.nn.Module) -> None:
    quoted("alpha_k(i,j) = g^2 / (2 g^2 + S_k g^3) = 1 / (2 + S_k g_k(i,j))     where g_k(i,j) > 0")
    quoted("w_k = sum_ij relu(g_k(i,j)) alpha_k(i,j)")
    quoted("C = relu(sum_k w_k A_k)")
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        a = gap_linear(tiny).features(images).double().numpy()
    g = np.broadcast_to((tiny.fc.weight[1].detach().double() / 4).numpy()[None, :, None, None], a.shape)  # 2 x 2 grid
    s = a.sum(axis=(2, 3), keepdims=True)
    alpha = np.where(g > 0, g**2 / np.where(g > 0, 2 * g**2 + s * g**3, 1), 0)
    weights = (np.maximum(g, 0) * alpha).sum(axis=(2, 3), keepdims=True)
    expected = np.maximum((weights * a).sum(axis=1), 0)
    np.testing.assert_allclose(compute_cams(tiny, images).raw.numpy(), expected, rtol=1e-4, atol=1e-6)


def test_the_calibration_scale_is_the_quoted_quantile_over_tau(tiny: torch.nn.Module, prepared_small: Path,
                                                                tmp_path: Path) -> None:
    quoted("s = P_q / tau")
    quoted("P_q = the q-quantile of the map peaks of the good validation parts (linear interpolation; q = 0.99)")
    quoted("With fewer than 20 good validation parts the good training parts are used instead")
    model = tmp_path / "m.pt"
    torch.manual_seed(0)
    save_checkpoint(model, build_model("resnet18"), base_meta("resnet18", 32))
    calibration = calibrate(model, prepared_small, device="cpu", progress=False)
    data = PreparedDataset(prepared_small)
    assert (data.rows("val")["label"] == 0).sum() < 20 and calibration["split"] == "train"  # the fallback
    train = data.split("train")
    good = [i for i in range(len(train)) if int(train.labels[i]) == 0]
    net = build_model("resnet18").eval()
    net.load_state_dict(read_checkpoint(model)["state_dict"])
    images = torch.stack([train[i]["image"] for i in good])
    peaks = compute_cams(net, normalize(images, base_meta("resnet18", 32))).maps.amax(dim=(1, 2)).numpy()
    expected = np.quantile(peaks.astype(np.float64), 0.99, method="linear") / 0.9
    assert calibration["scale"] == pytest.approx(expected, rel=1e-5)
    assert calibration_scale(peaks, anchor="good", threshold=0.9) == pytest.approx(expected, rel=1e-9)
    quoted("s = P_q of the map peaks of the defective training parts (q = 0.5, the median)")
    assert calibration_scale(peaks, anchor="defective") == pytest.approx(np.median(peaks.astype(np.float64)))


def test_qrs_is_the_quoted_mass_and_area() -> None:
    quoted("QRS = (1 / |R|) sum_{p in R, M(p) >= tau} M(p)           --aggregation mass (default)")
    quoted("QRS = |{p in R : M(p) >= tau}| / |R|                     --aggregation area")
    quoted("M = clip(C / s, 0, 1)")
    rng = np.random.default_rng(0)
    c = rng.uniform(0, 3, (3, 16, 16))
    roi = rng.uniform(size=(3, 16, 16)) > 0.3
    m = np.clip(c / 2.5, 0, 1)
    over = roi & (m >= 0.9)
    mass = (m * over).sum(axis=(1, 2)) / roi.sum(axis=(1, 2))
    area = over.sum(axis=(1, 2)) / roi.sum(axis=(1, 2))
    maps, region = torch.from_numpy(c), torch.from_numpy(roi)
    np.testing.assert_allclose(quality_risk_score(maps, region, scale=2.5).numpy(), mass, rtol=1e-12)
    np.testing.assert_allclose(quality_risk_score(maps, region, scale=2.5, aggregation="area").numpy(), area,
                               rtol=1e-12)


def test_the_mask_term_its_ramp_and_its_dilation_are_the_quoted_ones() -> None:
    quoted("L_mask = 1 - sum_ij inside(i,j) C(i,j) / (sum_ij C(i,j) + 1e-6)")
    quoted("lambda(t) = lambda * min(1, t / (r T))")
    quoted("d = round(15 sqrt(H W) / 224)")
    cam = torch.tensor([[[1.0, 3.0], [0.0, 4.0]]])
    inside = torch.tensor([[[True, False], [False, True]]])
    assert energy_loss(cam, inside).item() == pytest.approx(1 - 5 / (8 + 1e-6))
    steps = [mask_weight(t, 100, 2.0, 0.2) for t in (0, 10, 20, 50)]
    assert steps == pytest.approx([2 * min(1, t / (0.2 * 100)) for t in (0, 10, 20, 50)])
    assert [default_dilation(h) for h in (224, 64, 512)] == [round(15 * h / 224) for h in (224, 64, 512)]
    assert default_dilation((160, 640)) == round(15 * (160 * 640) ** 0.5 / 224) == 21


def test_class_weights_are_the_quoted_inverse_frequency() -> None:
    quoted("v_c = n / (2 n_c)")
    labels = torch.tensor([0] * 30 + [1] * 10)
    assert class_weight_tensor(labels, "auto").tolist() == pytest.approx([40 / 60, 40 / 20])


def test_risk_cuts_are_the_quoted_recall_and_precision_cuts() -> None:
    quoted("low  = min(R, P)")
    quoted("high = the lowest cut c >= R at or above which >= 95% of the validation parts are defective")
    quoted("`low = (b + high) / 2`")
    rng = np.random.default_rng(1)
    qrs = np.round(np.concatenate([rng.uniform(0.1, 0.9, 40), rng.uniform(0, 0.4, 60)]), 3)
    labels = np.array([1] * 40 + [0] * 60)
    cuts = np.unique(qrs)
    recall = max(c for c in cuts if (qrs[labels == 1] >= c).sum() >= 0.99 * 40)
    precise = [c for c in cuts if (labels[qrs >= c] == 1).mean() >= 0.95]
    expected = (min(recall, min(precise)), min(c for c in precise if c >= recall))
    assert expected[0] < expected[1]
    assert risk_cuts(qrs, labels)[0] == pytest.approx(expected)
