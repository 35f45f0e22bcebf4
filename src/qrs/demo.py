"""``qrs demo``: the whole pipeline on built-in synthetic data, end to end, in a few minutes on a CPU.

synth (KSDD2 layout) -> prepare -> train (resnet18 from scratch) -> evaluate both checkpoints ->
calibrate -> extract train and test -> analyze (stats, plots, report.html). Each step is skipped
when its output already exists, so an interrupted demo continues where it stopped.

The sizes below were chosen by measurement on 2 CPU cores (see docs/architecture.md, "Demo").
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from qrs.data.dataset import PreparedDataset
from qrs.data.preparation import prepare
from qrs.data.synth import synthesize
from qrs.evaluate import evaluate, format_table
from qrs.extract import ScoreOptions, calibrate, describe_calibration, extract
from qrs.model import read_checkpoint
from qrs.report import AnalyzeResult, analyze
from qrs.train import TrainConfig, train


@dataclass(frozen=True)
class DemoConfig:
    """Data size, image size and schedule of the demo."""

    n_train: int = 500
    n_test: int = 150
    defect_rate: float = 0.2
    raw_size: tuple[int, int] = (230, 630)
    img_size: int = 224
    arch: str = "resnet18"
    epochs: int = 10
    batch_size: int = 32
    learning_rate: float = 1e-3
    augment: str = "flip"
    seed: int = 0


def _step(name: str, done: bool = False) -> None:
    print(f"== {name}" + (" (already done, skipped)" if done else ""), flush=True)


def run_demo(out: str | os.PathLike[str] = "demo-out", *, overwrite: bool = False,
             config: DemoConfig = DemoConfig(), progress: bool = True) -> AnalyzeResult:
    """Run (or continue) the demo in ``out`` and print where the report is and the headline numbers."""
    out = Path(out)
    if overwrite and out.exists():
        shutil.rmtree(out)
    raw, data, run, ext = out / "raw", out / "data", out / "run", out / "extract"
    t0 = time.perf_counter()

    prepared = (data / "meta.json").is_file()
    _step(f"synth: {config.n_train} + {config.n_test} synthetic parts in the KSDD2 layout -> {raw}",
          prepared or raw.is_dir())
    if not (prepared or raw.is_dir()):
        synthesize(raw, "ksdd2", n_train=config.n_train, n_test=config.n_test, defect_rate=config.defect_rate,
                   size=config.raw_size, seed=config.seed)
    _step(f"prepare -> {data}", prepared)
    if not prepared:
        prepare("ksdd2", raw, data, img_size=config.img_size, seed=config.seed, overwrite=True, progress=progress)
    print(PreparedDataset(data).summary())

    last = run / "last.pt"
    trained = last.is_file() and read_checkpoint(last)["meta"]["epoch"] >= config.epochs
    _step(f"train {config.arch} from scratch, {config.epochs} epochs at {config.img_size} px -> {run}", trained)
    if not trained:
        train(TrainConfig(data_root=data, out=run, arch=config.arch, num_epochs=config.epochs,
                          batch_size=config.batch_size, learning_rate=config.learning_rate, patience=config.epochs,
                          augment=config.augment, seed=config.seed, resume=last.is_file(), progress=progress))

    _step("evaluate best_loss.pt and best_acc.pt on the test split")
    metrics_path = run / "metrics.json"
    results = evaluate(data, [run / "best_loss.pt", run / "best_acc.pt"], out=metrics_path, progress=progress)
    print(format_table(results))

    model = run / "best_loss.pt"
    calibrated = "anchor" in (read_checkpoint(model)["meta"].get("calibration") or {})
    _step("calibrate the QRS scale (anchor: good validation parts) and risk cut points", calibrated)
    if not calibrated:
        cal = calibrate(model, data, progress=progress)
        print(f"{describe_calibration(cal)}; risk cuts {cal['risk_cuts'] or cal['risk_note']}")

    _step(f"extract Grad-CAM++ and QRS for train and test -> {ext}")
    extract(data, model, modes=["train", "test"], out_dir=ext, options=ScoreOptions(), progress=progress)

    _step("analyze: statistics, plots, report")
    result = analyze(ext, metrics=metrics_path, out=out / "report")
    print(result.headline())
    print(f"demo finished in {time.perf_counter() - t0:.0f} s; open {result.report}")
    return result
