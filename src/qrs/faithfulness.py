"""Is the explanation faithful? A ROAD-style deletion test of the maps an extraction stored.

For each part, the pixels are ranked by its map (the raw map C upsampled to the input size: the
order of M, with M's ties at 1 broken by C and the remaining ties in a seeded random order). The top
fraction f (most relevant first, MoRF) or the bottom fraction f (least relevant first, LeRF) is
removed and filled by noisy linear imputation (ROAD, Rong et al. 2022: each removed pixel is the
weighted mean of its 8 neighbours, solved jointly as one sparse linear system, plus a little
Gaussian noise, so the removal leaves no sharp out-of-distribution holes), and the model is run
again. The drop of p_defective per fraction, MoRF against LeRF, says whether the model uses what the
map shows: a faithful map's MoRF curve drops faster. The cost is 2 x (number of fractions) forward
passes per part; the imputation runs in the DataLoader's workers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from scipy import sparse, stats
from scipy.sparse.linalg import spsolve
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from qrs.cam import upsample
from qrs.model import normalize

DELETION_FRACTIONS = (0.05, 0.1, 0.2, 0.5)
"""Shares of the image removed, most or least relevant pixels first."""
ROAD_NOISE = 0.01
"""Standard deviation of the imputation noise in the model's normalised input units (ROAD's value)."""
SIGNIFICANCE = 0.05
"""One-sided Wilcoxon p below which the map counts as better than its reverse."""
_NEIGHBOURS = ((-1, -1, 1 / 12), (-1, 0, 1 / 6), (-1, 1, 1 / 12), (0, -1, 1 / 6), (0, 1, 1 / 6),
               (1, -1, 1 / 12), (1, 0, 1 / 6), (1, 1, 1 / 12))
"""(dy, dx, weight) of the 8 neighbours in ROAD's linear imputation."""


def noisy_linear_impute(image: Tensor, remove: Tensor, *, noise: float = ROAD_NOISE,
                        generator: torch.Generator | None = None) -> Tensor:
    """``image`` (C x H x W float) with the pixels of ``remove`` (H x W bool) imputed.

    Each removed pixel x_i solves sum_j w_ij (x_i - x_j) = 0 over its in-image neighbours j (weights
    1/6 side, 1/12 diagonal): a removed region becomes the smooth interpolation of its border, then
    gets N(0, noise^2) noise. At least one pixel must remain.
    """
    h, w = remove.shape
    removed = remove.cpu().numpy().reshape(-1)
    unknown = np.flatnonzero(removed)
    if unknown.size == removed.size:
        raise ValueError("noisy linear imputation needs at least one pixel that is not removed")
    out = image.detach().cpu().clone().reshape(image.shape[0], -1)
    if unknown.size == 0:
        return out.reshape(image.shape)
    variable = np.full(removed.size, -1)
    variable[unknown] = np.arange(unknown.size)
    y, x = np.divmod(unknown, w)
    known_values = out.numpy().astype(np.float64)
    diagonal = np.zeros(unknown.size)
    rhs = np.zeros((unknown.size, image.shape[0]))
    rows, cols, vals = [], [], []
    for dy, dx, weight in _NEIGHBOURS:
        ny, nx = y + dy, x + dx
        inside = (ny >= 0) & (ny < h) & (nx >= 0) & (nx < w)
        eq = np.flatnonzero(inside)
        neighbour = ny[inside] * w + nx[inside]
        diagonal[eq] += weight
        is_var = removed[neighbour]
        rows.append(eq[is_var])
        cols.append(variable[neighbour[is_var]])
        vals.append(np.full(int(is_var.sum()), -weight))
        rhs[eq[~is_var]] += weight * known_values[:, neighbour[~is_var]].T
    rows.append(np.arange(unknown.size))
    cols.append(np.arange(unknown.size))
    vals.append(diagonal)
    system = sparse.csc_array((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
                              shape=(unknown.size, unknown.size))
    solution = np.asarray(spsolve(system, rhs)).reshape(unknown.size, -1)
    filled = torch.from_numpy(solution.T).to(out.dtype)
    if noise:
        filled = filled + noise * torch.randn(filled.shape, generator=generator, dtype=out.dtype)
    out[:, torch.from_numpy(unknown)] = filled
    return out.reshape(image.shape)


def relevance_order(saliency: Tensor, generator: torch.Generator) -> Tensor:
    """Flat pixel indices of an H x W map, most relevant first; equal values in a random order."""
    flat = saliency.reshape(-1)
    shuffle = torch.randperm(flat.numel(), generator=generator)
    return shuffle[torch.argsort(flat[shuffle], descending=True, stable=True)]


def removal_masks(order: Tensor, shape: tuple[int, int], fractions: Sequence[float]) -> Tensor:
    """2F x H x W bool masks: the top round(f H W) pixels of ``order`` for each fraction f (MoRF), then
    the bottom as many (LeRF)."""
    n = shape[0] * shape[1]
    masks = torch.zeros(2, len(fractions), n, dtype=torch.bool)
    for k, f in enumerate(fractions):
        count = round(f * n)
        masks[0, k, order[:count]] = True
        masks[1, k, order[n - count:]] = True
    return masks.reshape(2 * len(fractions), *shape)


def check_fractions(fractions: Sequence[float]) -> tuple[float, ...]:
    """The fractions, sorted; each in (0, 1) so that something is removed and something remains."""
    if not fractions or not all(0 < f < 1 for f in fractions):
        raise ValueError(f"deletion fractions must be in (0, 1), got {list(fractions)}")
    return tuple(sorted(set(float(f) for f in fractions)))


class DeletionImages(Dataset):
    """Item i: the 2F perturbed inputs of image i (MoRF per fraction, then LeRF), normalised for the
    model, imputed here so that DataLoader workers share the work. Seeded per image, so the result
    does not depend on the number of workers."""

    def __init__(self, images: Dataset, raw_maps: Tensor, meta: dict[str, Any], fractions: Sequence[float],
                 *, noise: float = ROAD_NOISE, seed: int = 0) -> None:
        self.images, self.raw_maps, self.meta = images, raw_maps, meta
        self.fractions, self.noise, self.seed = check_fractions(fractions), noise, seed

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, Any]:
        image = normalize(self.images[i]["image"][None], self.meta)[0]
        size = (image.shape[-2], image.shape[-1])
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        order = relevance_order(upsample(self.raw_maps[i][None].float(), size)[0], generator)
        masks = removal_masks(order, size, self.fractions)
        perturbed = [noisy_linear_impute(image, m, noise=self.noise, generator=generator) for m in masks]
        return {"index": i, "inputs": torch.stack(perturbed)}


@torch.inference_mode()
def deletion_drops(model: nn.Module, images: Dataset, raw_maps: Tensor, p_defective: np.ndarray, *,
                   fractions: Sequence[float] = DELETION_FRACTIONS, noise: float = ROAD_NOISE, seed: int = 0,
                   batch_size: int = 32, num_workers: int = 0, progress: bool = True,
                   desc: str = "deletion test") -> tuple[np.ndarray, np.ndarray]:
    """(MoRF, LeRF) drops of p_defective, each N x F: ``p_defective`` (the unperturbed parts' values)
    minus p_defective after removing each fraction, for every image of ``images`` (items with an
    ``image``, uint8 3 x H x W, in the order of ``raw_maps``)."""
    fractions = check_fractions(fractions)
    n_f = len(fractions)
    device = next(model.parameters()).device
    dataset = DeletionImages(images, raw_maps, model.qrs_meta, fractions, noise=noise, seed=seed)
    per_batch = max(1, batch_size // (2 * n_f))
    loader = DataLoader(dataset, batch_size=per_batch, num_workers=num_workers)
    after = np.zeros((len(dataset), 2, n_f))
    bar = tqdm(total=len(dataset), unit="image", disable=not progress,
               desc=f"{desc}: {2 * n_f} forward passes per image ({n_f} fractions x 2 orders)")
    for batch in loader:
        inputs = batch["inputs"].reshape(-1, *batch["inputs"].shape[2:]).to(device)
        logits = torch.cat([model(chunk) for chunk in inputs.split(batch_size)])
        p = torch.softmax(logits.float(), dim=1)[:, 1].cpu().numpy()
        after[batch["index"].numpy()] = p.reshape(-1, 2, n_f)
        bar.update(len(batch["index"]))
    bar.close()
    drops = np.asarray(p_defective, dtype=np.float64)[:, None, None] - after
    return drops[:, 0], drops[:, 1]


def _area(curves: np.ndarray, fractions: Sequence[float]) -> np.ndarray:
    """Trapezoid area under curves (... x F) over f from 0 (where every drop is 0) to the last fraction."""
    xs = np.concatenate([[0.0], fractions])
    ys = np.concatenate([np.zeros((*curves.shape[:-1], 1)), curves], axis=-1)
    return np.trapezoid(ys, xs, axis=-1)


def deletion_summary(morf: np.ndarray, lerf: np.ndarray, labels: np.ndarray,
                     fractions: Sequence[float] = DELETION_FRACTIONS) -> dict[str, Any]:
    """Per class (defective, good): mean drops per fraction, the area between the MoRF and LeRF
    curves (trapezoid from f = 0), a one-sided Wilcoxon signed-rank test of the per-image areas > 0,
    and a verdict in words."""
    fractions = check_fractions(fractions)
    labels = np.asarray(labels).astype(int)
    out: dict[str, Any] = {"fractions": list(fractions), "noise": ROAD_NOISE}
    for name, label in (("defective", 1), ("good", 0)):
        keep = labels == label
        m, le = morf[keep], lerf[keep]
        areas = _area(m - le, fractions)
        p_value = None
        if np.any(areas != 0):
            p_value = float(stats.wilcoxon(areas, alternative="greater").pvalue)
        area = float(areas.mean()) if areas.size else None
        out[name] = {"n": int(keep.sum()), "morf_mean_drop": m.mean(axis=0).tolist() if m.size else None,
                     "lerf_mean_drop": le.mean(axis=0).tolist() if le.size else None, "area_between": area,
                     "wilcoxon_p": p_value, "faithful": bool(area is not None and area > 0 and p_value is not None
                                                             and p_value < SIGNIFICANCE)}
        out[name]["verdict"] = _verdict(name, out[name])
    return out


def _verdict(name: str, summary: dict[str, Any]) -> str:
    if not summary["n"]:
        return f"no {name} parts: no deletion test"
    p = "-" if summary["wilcoxon_p"] is None else f"{summary['wilcoxon_p']:.3g}"
    numbers = f"(area between the curves {summary['area_between']:+.4f}, one-sided Wilcoxon p = {p}, n = {summary['n']})"
    if summary["faithful"]:
        return (f"{name} parts: removing the pixels the map ranks highest lowers p_defective more than removing "
                f"those it ranks lowest {numbers}: the model uses what the map shows.")
    return (f"{name} parts: the map is no better than its reverse: removing the pixels it ranks highest lowers "
            f"p_defective no more than removing those it ranks lowest {numbers}.")
