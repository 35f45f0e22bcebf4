"""The whole method into one run directory, and ``qrs repeat``: the same run once per training seed.

``run_pipeline``: train -> evaluate both checkpoints -> calibrate best_loss.pt -> extract train and
test -> analyze, into ``OUT/run``, ``OUT/extract`` and ``OUT/report``. Training is skipped when
``last.pt`` is finished and calibration when the checkpoint holds one, so an interrupted run
continues; evaluate, extract and analyze run again (they are quick and follow their inputs). The
demo runs it once, ``repeat`` once per seed into ``OUT/seed-<k>``, skipping a seed whose summary is
written, then tabulates mean +- std over the seeds.

Under torchrun every process takes part in train, calibrate and extract of each seed; rank 0 alone
runs evaluate and analyze (single-process commands) while the others wait, and only rank 0 writes
or prints.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from qrs.analysis import training_curves_plot
from qrs.atomic import write_json, write_text
from qrs.data.dataset import PreparedDataset
from qrs.distributed import DistContext, barrier, init_distributed
from qrs.errors import QrsError
from qrs.evaluate import evaluate, format_table
from qrs.extract import ScoreOptions, calibrate, describe_calibration, extract
from qrs.images import size_text
from qrs.model import read_checkpoint
from qrs.report import AnalyzeResult, analyze
from qrs.train import TrainConfig, train, training_finished

CHECKPOINTS = ("best_loss.pt", "best_acc.pt")


def _say(ctx: DistContext, text: str) -> None:
    if ctx.is_main:
        print(text, flush=True)


def step(ctx: DistContext, name: str, done: bool = False) -> None:
    """Print a step's ``== name`` line (rank 0), marked when its output was already there."""
    _say(ctx, f"== {name}" + (" (already done, skipped)" if done else ""))


def run_pipeline(data: str | os.PathLike[str], out: str | os.PathLike[str], config: TrainConfig, *,
                 faithfulness: bool = False, modes: tuple[str, ...] = ("train", "test"),
                 progress: bool = True) -> AnalyzeResult | None:
    """Train, evaluate, calibrate, extract and analyze ``data`` into ``out`` (see the module doc).

    ``config``'s data_root, out and resume are set here; ``faithfulness`` adds the deletion test of
    the test split to the analysis; ``modes``: the splits extracted and analysed (test among them).
    Returns the analysis on rank 0, None on the other ranks.
    """
    if "test" not in modes:
        raise QrsError(f"the pipeline's modes must include test, got {', '.join(modes)}")
    data, out = Path(data), Path(out)
    ctx = init_distributed(config.device)
    run, ext = out / "run", out / "extract"
    cfg = replace(config, data_root=data, out=run, best_loss_path=None, best_acc_path=None,
                  resume=(run / "last.pt").is_file(), progress=progress)
    trained = training_finished(cfg)
    start = "from scratch" if cfg.pretrained == "none" and cfg.weights is None else "from pretrained weights"
    stride = "" if cfg.output_stride == 32 else f", output stride {cfg.output_stride}"
    step(ctx, f"train {cfg.arch} {start}, {cfg.num_epochs} epochs at {size_text(PreparedDataset(data).img_size)} px"
              f"{stride} -> {run}",
         trained)
    if not trained:
        train(cfg)

    step(ctx, "evaluate best_loss.pt and best_acc.pt on the test split")
    metrics_path = run / "metrics.json"
    if ctx.is_main:
        results = evaluate(data, [run / name for name in CHECKPOINTS], out=metrics_path, device=cfg.device,
                           progress=progress)
        print(format_table(results))
    barrier(ctx)

    model = run / "best_loss.pt"
    calibrated = "anchor" in (read_checkpoint(model)["meta"].get("calibration") or {})
    step(ctx, "calibrate the QRS scale (anchor: good validation parts) and risk cut points", calibrated)
    if not calibrated:
        cal = calibrate(model, data, device=cfg.device, progress=progress)
        _say(ctx, f"{describe_calibration(cal)}\nrisk levels: {cal['risk_note']}")
    barrier(ctx)

    step(ctx, f"extract the maps and QRS for {' and '.join(modes)} -> {ext}")
    extract(data, model, modes=list(modes), out_dir=ext, options=ScoreOptions(), device=cfg.device,
            progress=progress)

    step(ctx, "analyze: statistics, plots, report" + (", deletion test" if faithfulness else ""))
    result = None
    if ctx.is_main:
        result = analyze(ext, metrics=metrics_path, out=out / "report", faithfulness=faithfulness,
                         device=cfg.device, progress=progress)
        print(result.headline())
    barrier(ctx)
    return result


REPEAT_COLUMNS = {
    "f1_best_loss": "F1 (best_loss.pt)",
    "f1_best_acc": "F1 (best_acc.pt)",
    "ap_best_loss": "AP of p_defective (best_loss.pt)",
    "auroc_best_loss": "AUROC of p_defective (best_loss.pt)",
    "peak_auroc": "AUROC of the map peak (test)",
    "qrs_auroc": "QRS AUROC (test)",
    "caught_with_qrs": "caught defective parts with QRS > 0 (test)",
    "ceiling_qrs_auroc": "QRS AUROC at the ceiling: a map ranking parts as the classifier does (test)",
    "ceiling_caught_with_qrs": "caught defective parts with QRS > 0 at the ceiling (test)",
    "mann_whitney_p": "Mann-Whitney p (test)",
    "good_at_0": "good parts at QRS 0 (test)",
    "pointing_game": "pointing game (test)",
    "energy_in_boxes": "energy in the defect boxes (test)",
    "iou": "IoU of the region over tau with the mask (test)",
    "deletion_area": "deletion test area (test, defective)",
    "s_per_epoch": "seconds per epoch",
}
"""The per-seed numbers of ``qrs repeat`` and their labels (the deletion test's with --faithfulness)."""


def seed_row(out: str | os.PathLike[str]) -> dict[str, float | None]:
    """A finished run directory's numbers for the repeat table (from metrics.json, stats.json and the
    training log)."""
    out = Path(out)
    metrics = json.loads((out / "run" / "metrics.json").read_text())
    test = json.loads((out / "report" / "stats.json").read_text())["modes"]["test"]
    deletion = (test.get("faithfulness") or {}).get("defective") or {}
    ceiling = test["agreement"].get("ceiling") or {}
    return {"f1_best_loss": metrics["best_loss.pt"]["f1"], "f1_best_acc": metrics["best_acc.pt"]["f1"],
            "ap_best_loss": metrics["best_loss.pt"]["ap"], "auroc_best_loss": metrics["best_loss.pt"]["auroc"],
            "peak_auroc": test["agreement"]["auroc_peak"], "qrs_auroc": test["qrs"]["auroc"],
            "caught_with_qrs": test["agreement"]["caught_with_qrs"],
            "ceiling_qrs_auroc": ceiling.get("auroc_qrs"), "ceiling_caught_with_qrs": ceiling.get("caught_with_qrs"),
            "mann_whitney_p": test["qrs"]["mann_whitney_p"], "good_at_0": test["qrs"]["zero_share_good"],
            "pointing_game": test["localisation"]["pointing_game"],
            "energy_in_boxes": test["localisation"]["energy_in_boxes"], "iou": test["localisation"]["iou"],
            "deletion_area": deletion.get("area_between"),
            "s_per_epoch": float(pd.read_csv(out / "run" / "log.csv")["time_s"].mean())}


def read_log(run_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """A training run's log rows (``log.jsonl``), one per epoch."""
    return [json.loads(line) for line in (Path(run_dir) / "log.jsonl").read_text().splitlines() if line]


def same_options(saved: dict[str, Any], options: dict[str, Any]) -> bool:
    """True when a finished seed's training options are these; an option that the seed's qrs did not have
    yet counts as equal at its default value."""
    defaults = _train_options(TrainConfig(data_root=Path(options["data_root"])))
    return all(saved.get(k, defaults[k]) == v for k, v in options.items()) and set(saved) <= set(options)


def _train_options(config: TrainConfig) -> dict[str, Any]:
    """What must match for a finished seed to count: the training options other than the seed and paths."""
    skip = {"seed", "out", "resume", "progress", "best_loss_path", "best_acc_path", "tensorboard"}
    return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items() if k not in skip}


@dataclass
class RepeatResult:
    """Per-seed rows (index: seed) and the mean/std table, with the files written."""

    rows: pd.DataFrame
    summary: pd.DataFrame
    files: list[Path]

    def table(self) -> str:
        """``metric  mean +- std  per-seed values`` as text."""
        seeds = ", ".join(str(s) for s in self.rows.index)
        width = max(map(len, REPEAT_COLUMNS.values()))
        lines = [f"{'metric':<{width}} {'mean ± std':>22}   seeds {seeds}"]
        for key, label in REPEAT_COLUMNS.items():
            fmt = _fmt_p if key == "mann_whitney_p" else _fmt
            mean, std = self.summary.loc["mean", key], self.summary.loc["std", key]
            spread = f"{fmt(mean)} ± {fmt(std)}"
            lines.append(f"{label:<{width}} {spread:>22}   " + " ".join(fmt(v) for v in self.rows[key]))
        lines.append(f"std: sample standard deviation over {len(self.rows)} seeds (ddof 1)")
        return "\n".join(lines)


def _fmt(v: float) -> str:
    return "-" if v is None or not np.isfinite(v) else f"{v:.3f}"


def _fmt_p(v: float) -> str:
    return "-" if v is None or not np.isfinite(v) else f"{v:.2g}"


def repeat(config: TrainConfig, seeds: list[int], out: str | os.PathLike[str], *, faithfulness: bool = False,
           modes: tuple[str, ...] = ("train", "test"), progress: bool = True) -> RepeatResult | None:
    """``run_pipeline`` per training seed into ``out/seed-<k>`` on ``config.data_root`` (the split is
    that of ``qrs prepare``), then ``repeat.csv`` / ``repeat.json`` with mean +- std over the seeds.
    A seed whose ``summary.json`` exists is skipped (it must have the same training options).
    ``faithfulness``: every seed's analysis runs the deletion test; ``modes``: the splits each seed
    extracts. Returns the table on rank 0, None on the other ranks."""
    if not seeds:
        raise QrsError("give at least one seed: --seeds 0 1 2 3 4")
    if len(set(seeds)) != len(seeds):
        raise QrsError(f"--seeds repeats a seed: {seeds}")
    out = Path(out)
    data = Path(config.data_root)
    PreparedDataset(data)
    ctx = init_distributed(config.device)
    options = _train_options(config)
    rows: dict[int, dict[str, float | None]] = {}
    for k, seed in enumerate(seeds, 1):
        seed_dir = out / f"seed-{seed}"
        summary_path = seed_dir / "summary.json"
        if summary_path.is_file():
            saved = json.loads(summary_path.read_text())
            if not same_options(saved["train_options"], options):
                raise QrsError(f"{seed_dir} was trained with other options than these: use another --out, or "
                               f"remove {seed_dir} to run it again")
            _say(ctx, f"=== seed {seed} ({k}/{len(seeds)}): complete in {seed_dir} (already done, skipped)")
            rows[seed] = saved["row"]
            continue
        _say(ctx, f"=== seed {seed} ({k}/{len(seeds)}) -> {seed_dir}")
        board = Path(config.tensorboard) / f"seed-{seed}" if config.tensorboard else None
        run_pipeline(data, seed_dir, replace(config, seed=seed, tensorboard=board), faithfulness=faithfulness,
                     modes=modes, progress=progress)
        if ctx.is_main:
            rows[seed] = seed_row(seed_dir)
            write_json(summary_path, {"seed": seed, "train_options": options, "row": rows[seed]})
        barrier(ctx)
    if not ctx.is_main:
        return None
    frame = pd.DataFrame.from_dict(rows, orient="index", columns=list(REPEAT_COLUMNS)).astype(float)
    frame.index.name = "seed"
    summary = frame.agg(["mean", "std"])
    buf = io.StringIO()
    pd.concat([frame, summary]).to_csv(buf, index_label="seed")
    files = [out / "repeat.csv", out / "repeat.json"]
    write_text(files[0], buf.getvalue())
    logs = {f"seed {seed}": read_log(out / f"seed-{seed}" / "run") for seed in seeds}
    files += training_curves_plot(logs, out / "curves", title=f"{config.arch}: training curves of {len(seeds)} seeds")
    write_json(files[1], {"seeds": list(seeds), "train_options": options, "labels": REPEAT_COLUMNS,
                          "per_seed": {str(s): r for s, r in rows.items()},
                          "mean": {k: _finite(v) for k, v in summary.loc["mean"].items()},
                          "std": {k: _finite(v) for k, v in summary.loc["std"].items()}})
    result = RepeatResult(frame, summary, files)
    print(result.table())
    return result


def _finite(v: float) -> float | None:
    return float(v) if np.isfinite(v) else None
