"""Training: checkpoints, early stopping, exact resume, the paper's command line."""

from __future__ import annotations

import json
import math
from functools import partial
from pathlib import Path

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from qrs import train as train_module
from conftest import straight_and_resumed
from qrs.cli import app
from qrs.errors import QrsError
from qrs.data.dataset import PreparedDataset
from qrs.model import load_checkpoint, normalize, read_checkpoint
from qrs.train import (EarlyStopping, TrainConfig, augment_batch, class_weight_tensor, make_scheduler, train,
                       training_finished)

runner = CliRunner()


def _config(data: Path, out: Path, **kw: object) -> TrainConfig:
    base = dict(data_root=data, out=out, arch="resnet18", num_epochs=2, batch_size=8, learning_rate=1e-3,
                device="cpu", progress=False)
    base.update(kw)
    return TrainConfig(**base)


def test_tiny_run_writes_three_loadable_checkpoints_and_a_log(prepared_small: Path, tmp_path: Path) -> None:
    result = train(_config(prepared_small, tmp_path / "run"))
    for path in (result.best_loss_path, result.best_acc_path, result.last_path):
        model = load_checkpoint(path)
        meta = model.qrs_meta
        assert meta["img_size"] == [32, 32] and meta["output_stride"] == 32 and meta["arch"] == "resnet18"
    log = pd.read_csv(tmp_path / "run" / "log.csv")
    assert list(log["epoch"]) == [1, 2]
    assert set(log.columns) >= {"train_loss", "val_loss", "val_acc", "val_f1", "time_s"}
    jsonl = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["val_loss"] for r in jsonl] == pytest.approx(list(log["val_loss"]))
    best = read_checkpoint(result.best_loss_path)["meta"]
    assert best["val_metrics"]["val_loss"] == pytest.approx(log["val_loss"].min())
    assert best["epoch"] == int(log["epoch"][log["val_loss"].idxmin()])
    best_acc = read_checkpoint(result.best_acc_path)["meta"]
    assert best_acc["val_metrics"]["val_acc"] == pytest.approx(log["val_acc"].max())


def test_early_stopping_counts_epochs_without_improvement() -> None:
    stopper = EarlyStopping(patience=2)
    decisions = [stopper.step(v) for v in [1.0, 0.8, 0.9, 0.85, 0.7]]
    assert decisions == [False, False, False, True, False]
    assert stopper.best == 0.7 and stopper.bad_epochs == 0


def test_training_stops_at_the_right_epoch_on_a_scripted_validation_loss(
        prepared_small: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    losses = iter([0.9, 0.7, 0.75, 0.72, 0.71, 0.5])
    accs = iter([0.5, 0.6, 0.9, 0.6, 0.6, 0.9])
    monkeypatch.setattr(train_module, "validate",
                        lambda *a, **k: {"val_loss": next(losses), "val_acc": next(accs), "val_f1": 0.0})
    assert not training_finished(_config(prepared_small, tmp_path / "run", num_epochs=6, patience=3))
    result = train(_config(prepared_small, tmp_path / "run", num_epochs=6, patience=3))
    assert result.stopped_early and [h["epoch"] for h in result.history] == [1, 2, 3, 4, 5]
    # Stopped early at epoch 5 of 6: finished, nothing to resume; with a patience of 4 it would go on.
    assert training_finished(_config(prepared_small, tmp_path / "run", num_epochs=6, patience=3))
    assert not training_finished(_config(prepared_small, tmp_path / "run", num_epochs=6, patience=4))
    assert training_finished(_config(prepared_small, tmp_path / "run", num_epochs=5, patience=4))
    assert read_checkpoint(result.best_loss_path)["meta"]["epoch"] == 2
    assert read_checkpoint(result.best_acc_path)["meta"]["epoch"] == 3


def test_resume_after_a_crash_in_epoch_3_gives_the_same_weights(prepared_small: Path, tmp_path: Path) -> None:
    a, b = straight_and_resumed(partial(_config, prepared_small), tmp_path, (3, 2), num_epochs=4, augment="standard")
    assert a["meta"]["epoch"] == b["meta"]["epoch"] == 4
    assert [h["val_loss"] for h in a["history"]] == [h["val_loss"] for h in b["history"]]


def test_resume_refuses_another_arch_or_output_stride(prepared_small: Path, tmp_path: Path) -> None:
    train(_config(prepared_small, tmp_path / "run", num_epochs=1))
    refusal = (f"{tmp_path / 'run' / 'last.pt'} was trained with another arch, dataset, image size or output stride "
               "(resnet18, 32x32 px, stride 32); cannot resume from it")
    for change in ({"arch": "resnet34"}, {"output_stride": 16}):
        with pytest.raises(QrsError) as exc:
            train(_config(prepared_small, tmp_path / "run", num_epochs=2, resume=True, **change))
        assert str(exc.value) == refusal


def test_same_seed_same_checkpoint(prepared_small: Path, tmp_path: Path) -> None:
    a = train(_config(prepared_small, tmp_path / "a", num_epochs=1))
    b = train(_config(prepared_small, tmp_path / "b", num_epochs=1))
    sa, sb = read_checkpoint(a.last_path)["state_dict"], read_checkpoint(b.last_path)["state_dict"]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_paper_command_line_with_underscored_flags(prepared_small: Path, tmp_path: Path) -> None:
    args = ["train", "--data_root", str(prepared_small), "--num_epochs", "1", "--batch_size", "16",
            "--learning_rate", "0.0001", "--patience", "10", "--best_loss_path", str(tmp_path / "bl.pt"),
            "--best_acc_path", str(tmp_path / "ba.pt"), "--arch", "resnet18", "--out", str(tmp_path / "run"),
            "--device", "cpu"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert load_checkpoint(tmp_path / "bl.pt").qrs_meta["train_config"]["batch_size"] == 16
    assert (tmp_path / "ba.pt").is_file() and (tmp_path / "run" / "last.pt").is_file()
    dashed = runner.invoke(app, ["train", "--data-root", str(prepared_small), "--num-epochs", "1", "--batch-size", "16",
                                 "--arch", "resnet18", "--out", str(tmp_path / "run2"), "--device", "cpu"])
    assert dashed.exit_code == 0, dashed.output


def test_augment_and_class_weights() -> None:
    images = torch.arange(2 * 3 * 4 * 4, dtype=torch.uint8).view(2, 3, 4, 4)
    flipped, _ = augment_batch(images, "flip", torch.Generator().manual_seed(0))
    draws = torch.rand(2, 5, generator=torch.Generator().manual_seed(0))
    for i in range(2):
        expected = images[i]
        if draws[i, 0] < 0.5:
            expected = expected.flip(-1)
        if draws[i, 1] < 0.5:
            expected = expected.flip(-2)
        assert torch.equal(flipped[i], expected)
    assert torch.equal(augment_batch(images, "none", torch.Generator())[0], images)
    weights = class_weight_tensor(torch.tensor([0, 0, 0, 1]), "auto")
    assert torch.allclose(weights, torch.tensor([4 / 6, 4 / 2]))
    assert class_weight_tensor(torch.tensor([0, 1]), "none") is None


def _lrs(schedule: str, total: int, warmup: int, lr: float = 0.1) -> list[float]:
    """The learning rate used at each of ``total`` steps."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr, momentum=0.9)
    scheduler = make_scheduler(optimizer, schedule, total, warmup)
    out = []
    for _ in range(total):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return out


def test_schedules_follow_their_formulas() -> None:
    assert _lrs("constant", 10, 0) == [0.1] * 10
    warm = _lrs("constant", 10, 4)
    assert warm[:5] == pytest.approx([0.1 * (0.01 + 0.99 * t / 4) for t in range(5)]) and warm[4:] == [0.1] * 6
    cosine = _lrs("cosine", 12, 2)
    assert cosine[:2] == pytest.approx([0.001, 0.1 * (0.01 + 0.99 / 2)])
    assert cosine[2:] == pytest.approx([0.05 * (1 + math.cos(math.pi * t / 10)) for t in range(10)])
    cycle = _lrs("onecycle", 100, 20)
    assert cycle[0] == pytest.approx(0.1 / 25) and max(cycle) == pytest.approx(0.1)
    assert cycle.index(max(cycle)) == 19 and cycle[-1] == pytest.approx(0.1 / 25 / 1e4, rel=0.2)
    assert _lrs("onecycle", 100, 0).index(max(_lrs("onecycle", 100, 0))) == 29  # 30% rising phase by default
    with pytest.raises(QrsError, match="unknown --schedule 'step'"):
        _lrs("step", 10, 0)


def test_warmup_must_fit_in_the_run(prepared_small: Path, tmp_path: Path) -> None:
    with pytest.raises(QrsError, match=r"--warmup-epochs must be in \[0, --num_epochs\), got 2"):
        train(_config(prepared_small, tmp_path / "run", num_epochs=2, warmup_epochs=2))


@pytest.mark.parametrize(("arch", "schedule", "optimizer"), [("resnet18", "onecycle", "adamw"),
                                                            ("efficientnet_lite0", "cosine", "adam")])
def test_resume_is_exact_with_a_schedule(prepared_small: Path, tmp_path: Path, arch: str, schedule: str,
                                         optimizer: str) -> None:
    a, b = straight_and_resumed(partial(_config, prepared_small), tmp_path, (2, 1), arch=arch, num_epochs=3,
                                schedule=schedule, optimizer=optimizer, warmup_epochs=0.5, weight_decay=0.01)
    assert [h["lr"] for h in a["history"]] == [h["lr"] for h in b["history"]]
    assert a["meta"]["arch"] == arch and a["meta"]["train_config"]["schedule"] == schedule


def test_curves_are_rewritten_after_every_epoch_also_on_resume(prepared_small: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    import qrs.monitor

    drawn: list[list[int]] = []
    draw = qrs.monitor.training_curves_plot

    def spy(runs: dict, out_base: Path, **kw: object) -> list[Path]:
        drawn.append([int(r["epoch"]) for r in runs[""]])
        paths = draw(runs, out_base, **kw)
        assert [p.name for p in paths] == ["curves.png", "curves.svg"] and Path(out_base).parent == run
        return paths

    seen: dict[int, bytes] = {}

    def before_step(epoch: int, batch: int) -> None:
        if batch == 0 and epoch > 1:
            seen[epoch] = (run / "curves.png").read_bytes()

    monkeypatch.setattr(qrs.monitor, "training_curves_plot", spy)
    run = tmp_path / "run"
    train(_config(prepared_small, run, num_epochs=2, mask_loss="energy"), on_batch=before_step)
    assert drawn == [[1], [1, 2]] and seen[2].startswith(b"\x89PNG")
    assert (run / "curves.png").read_bytes() != seen[2] and (run / "curves.svg").read_text().startswith("<?xml")
    train(_config(prepared_small, run, num_epochs=3, mask_loss="energy", resume=True), on_batch=before_step)
    assert drawn == [[1], [1, 2], [1, 2, 3]]  # the resumed run draws its whole history
    assert seen[3] != (run / "curves.png").read_bytes()
    assert read_checkpoint(run / "best_loss.pt")["meta"]["run_dir"] == str(run.resolve())
    assert not [p for p in run.iterdir() if p.name.startswith(".")]  # atomic writes leave no temporary file


def test_precise_bn_leaves_the_training_images_statistics_in_the_checkpoint(prepared_small: Path,
                                                                           tmp_path: Path) -> None:
    data = PreparedDataset(prepared_small)
    images = data.split("train", with_masks=False)
    n = len(images)
    # One batch holds the whole split, so the recomputed statistics are those of all its images.
    result = train(_config(prepared_small, tmp_path / "run", num_epochs=1, batch_size=64, precise_bn=True))
    model = load_checkpoint(result.last_path)
    x = normalize(torch.stack([images[i]["image"] for i in range(n)]), model.qrs_meta)
    with torch.no_grad():
        first = model.conv1(x)
    torch.testing.assert_close(model.bn1.running_mean, first.mean(dim=(0, 2, 3)), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(model.bn1.running_var, first.var(dim=(0, 2, 3), unbiased=True), atol=1e-5, rtol=1e-4)
    plain = load_checkpoint(train(_config(prepared_small, tmp_path / "plain", num_epochs=1, batch_size=64)).last_path)
    assert not torch.allclose(plain.bn1.running_mean, first.mean(dim=(0, 2, 3)), atol=1e-3)


def test_resume_is_exact_with_precise_bn(prepared_small: Path, tmp_path: Path) -> None:
    a, b = straight_and_resumed(partial(_config, prepared_small, num_epochs=3, precise_bn=True), tmp_path, (2, 1))
    assert a["meta"]["epoch"] == b["meta"]["epoch"] == 3
