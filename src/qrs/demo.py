"""``qrs demo``: the whole pipeline on built-in synthetic data, end to end, in a few minutes on a CPU.

synth (KSDD2 layout) -> prepare, then :func:`qrs.pipeline.run_pipeline`: train (resnet18 from
scratch) -> evaluate both checkpoints -> calibrate -> extract train and test -> analyze (stats,
plots, report.html). Synth, prepare, train and calibrate are skipped when their output already
exists, so an interrupted demo continues where it stopped.

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
from qrs.distributed import DistContext
from qrs.pipeline import run_pipeline, step
from qrs.report import AnalyzeResult
from qrs.train import TrainConfig


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


def run_demo(out: str | os.PathLike[str] = "demo-out", *, overwrite: bool = False,
             config: DemoConfig = DemoConfig(), progress: bool = True) -> AnalyzeResult:
    """Run (or continue) the demo in ``out`` and print where the report is and the headline numbers."""
    out = Path(out)
    if overwrite and out.exists():
        shutil.rmtree(out)
    raw, data = out / "raw", out / "data"
    ctx = DistContext()
    t0 = time.perf_counter()

    prepared = (data / "meta.json").is_file()
    step(ctx, f"synth: {config.n_train} + {config.n_test} synthetic parts in the KSDD2 layout -> {raw}",
         prepared or raw.is_dir())
    if not (prepared or raw.is_dir()):
        synthesize(raw, "ksdd2", n_train=config.n_train, n_test=config.n_test, defect_rate=config.defect_rate,
                   size=config.raw_size, seed=config.seed)
    step(ctx, f"prepare -> {data}", prepared)
    if not prepared:
        prepare("ksdd2", raw, data, img_size=config.img_size, seed=config.seed, overwrite=True, progress=progress)
    print(PreparedDataset(data).summary())

    training = TrainConfig(data_root=data, arch=config.arch, num_epochs=config.epochs, batch_size=config.batch_size,
                           learning_rate=config.learning_rate, patience=config.epochs, augment=config.augment,
                           seed=config.seed)
    result = run_pipeline(data, out, training, progress=progress)
    print(f"demo finished in {time.perf_counter() - t0:.0f} s; open {result.report}")
    return result
