"""Launched by tests/test_distributed.py under torchrun: trains and records what each rank ends
with, which the checkpoints (written by rank 0 only) cannot show.

``python ddp_worker.py DATA OUT train [ARGS...]``: ``qrs train ARGS`` for 2 epochs into OUT/full, and
for 1 epoch into OUT/resumed then ``--resume`` to 2 epochs, with TensorBoard into OUT/tb-full and
OUT/tb-resumed; writes OUT/rank<R>.json with each final model's state digest. ``fail``: rank 1 raises
a QrsError at its second training step; ``hang``: rank 1 sleeps there instead, outside every collective;
``crash``: ``qrs train`` through the console entry point, where rank 0 fails with an unexpected error
while it builds the image cache that rank 1 waits for at a barrier, and rank 0's exit is slow after
its process group's teardown (an exit handler that sleeps 5 s runs after it).
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import torch
from torch import nn

from qrs import train as train_module
from qrs.cli import app, main
from qrs.data.dataset import PreparedDataset
from qrs.errors import QrsError
from qrs.train import TrainConfig, train


def state_digest(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 of a state dict's names and exact tensor bytes, in key order."""
    h = hashlib.sha256()
    for name, tensor in state.items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _capture_models() -> list[nn.Module]:
    """Record every model ``train`` builds: this rank's live model, not rank 0's checkpoint."""
    built: list[nn.Module] = []
    build = train_module.build_model

    def capture(*args: object, **kwargs: object) -> nn.Module:
        built.append(build(*args, **kwargs))
        return built[-1]

    train_module.build_model = capture
    return built


def train_and_resume(data: Path, out: Path, rank: int, extra_args: list[str]) -> None:
    built = _capture_models()
    common = ["train", "--data_root", str(data), "--arch", "resnet18", "--batch_size", "8", "--lr", "1e-3",
              "--device", "cpu", *extra_args]
    for extra in (["--out", out / "full", "--num_epochs", "2", "--tensorboard", out / "tb-full"],
                  ["--out", out / "resumed", "--num_epochs", "1", "--tensorboard", out / "tb-resumed"],
                  ["--out", out / "resumed", "--num_epochs", "2", "--resume", "--tensorboard", out / "tb-resumed"]):
        app(args=common + [str(a) for a in extra], standalone_mode=False)
    digests = {"full": state_digest(built[0].state_dict()), "resumed": state_digest(built[2].state_dict())}
    (out / f"rank{rank}.json").write_text(json.dumps(digests))


def stop_rank_1(data: Path, out: Path, rank: int, mode: str) -> None:
    def on_batch(epoch: int, step: int) -> None:
        if rank == 1 and step == 1:
            if mode == "hang":
                time.sleep(3600)
            raise QrsError("rank 1 failed on purpose")

    train(TrainConfig(data_root=data, out=out / mode, arch="resnet18", num_epochs=1, batch_size=8, device="cpu",
                      progress=False), on_batch=on_batch)


def crash_rank_0(data: Path, out: Path, rank: int) -> None:
    if rank == 0:
        def crash(*args: object, **kwargs: object) -> None:
            raise RuntimeError("rank 0 crashed on purpose")

        PreparedDataset.image_cache = crash
        atexit.register(time.sleep, 5)  # exit handlers run last-in first-out: after the group's teardown
    sys.argv = ["qrs", "train", "--data_root", str(data), "--out", str(out / "crash"), "--arch", "resnet18",
                "--num_epochs", "1", "--batch_size", "8", "--device", "cpu"]
    main()


if __name__ == "__main__":
    torch.set_num_threads(1)
    data_arg, out_arg, mode_arg = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    if mode_arg == "train":
        train_and_resume(data_arg, out_arg, int(os.environ["RANK"]), sys.argv[4:])
    elif mode_arg == "crash":
        crash_rank_0(data_arg, out_arg, int(os.environ["RANK"]))
    else:
        stop_rank_1(data_arg, out_arg, int(os.environ["RANK"]), mode_arg)
