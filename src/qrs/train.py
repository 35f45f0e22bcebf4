"""``qrs train``: the ResNet pass/fail classifier, read top to bottom like torchvision's reference.

Keeps the checkpoint of lowest validation loss and the one of highest validation accuracy, stops
early on validation loss, logs every epoch, and resumes from ``last.pt`` exactly (same weights as
an uninterrupted run with the same seed, on CPU). Under torchrun it trains with
DistributedDataParallel: ``batch_size`` is per process, so the effective batch is
``batch_size * world_size`` and the learning rate is used as given.
"""

from __future__ import annotations

import csv
import io
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Subset
from torch.utils.data.distributed import DistributedSampler
from tqdm.auto import tqdm

from qrs.atomic import write_text
from qrs.cam import GapLinear, closed_form_cam, gap_linear
from qrs.choices import METHODS, Augment, ClassWeights, MaskLoss, Optimizer, Schedule
from qrs.data.dataset import PreparedDataset
from qrs.distributed import (DistContext, all_gather_objects, all_reduce_sum, barrier, broadcast_buffers,
                             init_distributed, main_first, shard_indices)
from qrs.errors import QrsError
from qrs.guidance import default_dilation, energy_loss, grid_mask, mask_weight, select_masked
from qrs.images import size_text
from qrs.memory import check_fits, training_need
from qrs.model import (base_meta, build_model, model_output_stride, model_size, normalize, read_checkpoint,
                       save_checkpoint)
from qrs.monitor import TrainMonitor, summary_writer_class



@dataclass
class TrainConfig:
    """Everything a training run depends on (all of it is recorded in ``last.pt``)."""

    data_root: Path
    out: Path | None = None
    arch: str = "resnet50"
    output_stride: int = 32
    pretrained: str = "none"
    weights: Path | None = None
    num_epochs: int = 100
    batch_size: int = 64
    learning_rate: float = 1e-3
    optimizer: Optimizer = "adam"
    schedule: Schedule = "constant"
    warmup_epochs: float = 0.0
    weight_decay: float = 0.0
    label_smoothing: float = 0.0
    mask_loss: MaskLoss = "auto"
    mask_weight: float = 3.0
    mask_warmup: float = 0.2
    mask_dilate: int | None = None
    mask_fraction: float = 1.0
    mask_map: str = "gradcam++"
    patience: int = 10
    seed: int = 0
    device: str = "auto"
    num_workers: int = 0
    amp: bool = False
    class_weights: ClassWeights = "auto"
    augment: Augment = "flip"
    precise_bn: bool = False
    best_loss_path: Path | None = None
    best_acc_path: Path | None = None
    resume: bool = False
    progress: bool = True
    tensorboard: Path | None = None

    def paths(self) -> tuple[Path, Path, Path]:
        """(best_loss, best_acc, last) checkpoint paths, defaulting into ``out``."""
        out = self.out_dir()
        return (Path(self.best_loss_path or out / "best_loss.pt"), Path(self.best_acc_path or out / "best_acc.pt"),
                out / "last.pt")

    def out_dir(self) -> Path:
        """Run directory: ``--out``, else ``runs/`` beside the prepared dataset."""
        return Path(self.out) if self.out else Path(self.data_root).resolve().parent / "runs"


@dataclass
class EarlyStopping:
    """Stop when the validation loss has not improved for ``patience`` epochs."""

    patience: int
    best: float = math.inf
    bad_epochs: int = 0

    def step(self, val_loss: float) -> bool:
        """Record one epoch's validation loss; True when training should stop."""
        if val_loss < self.best:
            self.best, self.bad_epochs = val_loss, 0
        else:
            self.bad_epochs += 1
        return self.bad_epochs >= self.patience


@dataclass
class TrainResult:
    """Where the checkpoints are and what each epoch measured."""

    best_loss_path: Path
    best_acc_path: Path
    last_path: Path
    history: list[dict[str, Any]] = field(default_factory=list)
    stopped_early: bool = False


def augment_batch(images: torch.Tensor, mode: str, generator: torch.Generator,
                  masks: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Random per-sample augmentation of a uint8 B x 3 x H x W batch (flips; ``standard`` adds
    90-degree turns of square images and +-15% brightness/contrast), drawn from ``generator`` for
    reproducibility. A turn of a non-square image would change its shape, and its 180-degree turn is
    the two flips, so non-square images are flipped only.

    ``masks`` (B x H x W, optional) get the same flips and turns, so a defect mask stays on its defect.
    """
    if mode == "none":
        return images, masks
    b = images.shape[0]
    draws = torch.rand(b, 5, generator=generator)

    def where(choose: torch.Tensor, moved: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
        return torch.where(choose.view(b, *([1] * (kept.dim() - 1))), moved, kept)

    moves = [(draws[:, 0] < 0.5, lambda x: x.flip(-1)), (draws[:, 1] < 0.5, lambda x: x.flip(-2))]
    if mode == "standard" and images.shape[-1] == images.shape[-2]:
        moves.append((draws[:, 2] < 0.5, lambda x: x.transpose(-1, -2)))
    out = images
    for choose, move in moves:
        out = where(choose, move(out), out)
        masks = None if masks is None else where(choose, move(masks), masks)
    if mode == "standard":
        x = out.float()
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        contrast = (0.85 + 0.3 * draws[:, 3]).view(b, 1, 1, 1)
        brightness = (0.85 + 0.3 * draws[:, 4]).view(b, 1, 1, 1)
        out = ((x - mean) * contrast + mean * brightness).clamp(0, 255).round().to(torch.uint8)
    return out, masks


@dataclass(frozen=True)
class MaskGuidance:
    """The mask term of one run (docs/method.md#mask-guided-training): which training images use their
    mask, and how."""

    split: GapLinear
    use: torch.Tensor
    """(N,) bool over the training split: defective images with a mask (or boxes) chosen for supervision."""
    method: str
    """The map the term shapes (a CAM method, :data:`qrs.choices.METHODS`)."""
    dilate: int
    weight: float
    warmup: float
    total_steps: int

    def summary(self, n_defective: int) -> dict[str, Any]:
        """What goes into the log and the checkpoint metadata."""
        return {"loss": "energy", "map": self.method, "weight": self.weight, "warmup": self.warmup,
                "dilate": self.dilate, "n_masked": int(self.use.sum()), "n_defective": n_defective}


class WithFeatures(nn.Module):
    """``model`` returning (logits, target feature map A) from one forward pass, so that DDP sees the
    pass that the mask term differentiates."""

    def __init__(self, model: nn.Module, split: GapLinear) -> None:
        super().__init__()
        self.model = model
        self.split = split

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.split.features(x)
        return self.split.head(a), a


def _has_region(data: PreparedDataset) -> torch.Tensor:
    """(N,) bool over the training split: defective images with a mask file or defect boxes."""
    rows = data.rows("train")
    return torch.tensor([(lab == 1) and (bool(mask) or bool(defects)) for lab, mask, defects in
                         zip(rows["label"], rows["mask"], rows["defects"])], dtype=torch.bool)


def resolve_mask_loss(cfg: TrainConfig, data: PreparedDataset) -> tuple[str, str]:
    """The mask term this run uses, ``energy`` or ``none``, and the line that says why.

    ``auto`` (the default) is ``energy`` when some defective training image has a mask or boxes
    (measured: docs/architecture.md, "Mask guidance (measured)"), else ``none``.
    """
    if cfg.mask_loss not in ("auto", "none", "energy"):
        raise QrsError(f"unknown --mask-loss {cfg.mask_loss!r}; expected auto, none or energy")
    if cfg.mask_loss != "auto":
        return cfg.mask_loss, ""
    if bool(_has_region(data).any()):
        return "energy", ("mask guidance is on by default (--mask-loss auto: the training split has defect masks or "
                          "boxes); --mask-loss none trains on the labels alone")
    return "none", "no defect masks or boxes in the training split: trained on the labels alone (no mask guidance)"


def mask_guidance(cfg: TrainConfig, model: nn.Module, data: PreparedDataset, total_steps: int) -> MaskGuidance | None:
    """The run's :class:`MaskGuidance` for a resolved ``mask_loss`` (None for ``none``); an error when
    ``energy`` finds no mask at all."""
    if cfg.mask_loss == "none":
        return None
    if not 0 <= cfg.mask_fraction <= 1 or cfg.mask_weight < 0 or not 0 <= cfg.mask_warmup <= 1:
        raise QrsError("--mask-fraction and --mask-warmup must be in [0, 1] and --mask-weight >= 0")
    if cfg.mask_map not in METHODS:
        raise QrsError(f"unknown --mask-map {cfg.mask_map!r}; expected one of {', '.join(METHODS)}")
    split = gap_linear(model)
    if split is None:
        raise QrsError(f"--mask-loss energy needs a model explained in closed form; {cfg.arch} is not")
    has_region = _has_region(data)
    n_defective = int((data.rows("train")["label"] == 1).sum())
    if not has_region.any():
        raise QrsError(f"--mask-loss energy needs defect masks or boxes, but none of the {n_defective} defective "
                       f"training images of {data.root} has any; train with --mask-loss none")
    candidates = torch.nonzero(has_region).flatten()
    keep = round(cfg.mask_fraction * len(candidates))
    chosen = candidates[torch.randperm(len(candidates), generator=torch.Generator().manual_seed(cfg.seed))[:keep]]
    use = torch.zeros(len(has_region), dtype=torch.bool)
    use[chosen] = True
    dilate = default_dilation(data.img_size) if cfg.mask_dilate is None else cfg.mask_dilate
    if dilate < 0:
        raise QrsError(f"--mask-dilate must be >= 0 pixels, got {dilate}")
    return MaskGuidance(split, use, cfg.mask_map, dilate, cfg.mask_weight, cfg.mask_warmup, total_steps)


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Adam (the paper's) or AdamW (decoupled weight decay, the usual choice for fine-tuning)."""
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    raise QrsError(f"unknown --optimizer {cfg.optimizer!r}; expected adam or adamw")


def make_scheduler(optimizer: torch.optim.Optimizer, schedule: str, total_steps: int,
                   warmup_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    """The per-step learning-rate schedule, stepped after every batch.

    constant: the learning rate as given. cosine: cosine decay to 0 over the run. Both start with
    a linear warm-up from 1% over ``warmup_steps`` when it is > 0. onecycle: torch's OneCycleLR (up
    from lr/25 to lr, then down to lr/1e4, momentum cycled in reverse); its rising phase is the
    warm-up, 30% of the run unless ``warmup_steps`` says otherwise.
    """
    sched = torch.optim.lr_scheduler
    if schedule == "onecycle":
        pct = warmup_steps / total_steps if warmup_steps else 0.3
        return sched.OneCycleLR(optimizer, max_lr=[g["lr"] for g in optimizer.param_groups], total_steps=total_steps,
                                pct_start=min(max(pct, 1 / total_steps), 0.99))
    if schedule == "constant":
        main = sched.LambdaLR(optimizer, lambda step: 1.0)
    elif schedule == "cosine":
        main = sched.CosineAnnealingLR(optimizer, T_max=max(1, total_steps - warmup_steps))
    else:
        raise QrsError(f"unknown --schedule {schedule!r}; expected constant, cosine or onecycle")
    if warmup_steps <= 0:
        return main
    warmup = sched.LinearLR(optimizer, start_factor=0.01, end_factor=1.0, total_iters=warmup_steps)
    return sched.SequentialLR(optimizer, [warmup, main], milestones=[warmup_steps])


def class_weight_tensor(labels: torch.Tensor, mode: str) -> torch.Tensor | None:
    """Inverse-frequency weights n / (2 n_c) for ``auto``; None for ``none``."""
    if mode == "none":
        return None
    counts = torch.bincount(labels, minlength=2).float()
    if (counts == 0).any():
        raise QrsError(f"the training split needs both classes; found {counts.tolist()} (good, defective)")
    return counts.sum() / (2 * counts)


def _autocast(device: torch.device, enabled: bool) -> torch.autocast:
    dtype = torch.bfloat16 if device.type == "cpu" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=enabled)


def train_one_epoch(model: nn.Module, loader: DataLoader, criterion: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, scaler: torch.amp.GradScaler,
                    meta: dict[str, Any], cfg: TrainConfig, ctx: DistContext, generator: torch.Generator, epoch: int,
                    on_batch: Callable[[int, int], None] | None,
                    guidance: MaskGuidance | None = None,
                    on_step: Callable[[int, dict[str, float]], None] | None = None) -> dict[str, float]:
    """One pass over the training split; the mean training loss (and, guided, the mean mask term and
    the last weight lambda) over all ranks. ``model`` returns (logits, A) when ``guidance`` is given.
    ``on_step(step, values)`` gets this process's batch values after every optimiser step (``step``
    counts from 1 over the run)."""
    model.train()
    totals = torch.zeros(4, dtype=torch.float64)
    lam = 0.0
    bar = tqdm(loader, desc=f"epoch {epoch}", unit="batch", leave=False, disable=not (cfg.progress and ctx.is_main))
    for i, batch in enumerate(bar):
        if on_batch is not None:
            on_batch(epoch, i)
        images, defect = augment_batch(batch["image"], cfg.augment, generator, batch.get("defect"))
        images = images.to(ctx.device, non_blocking=True)
        labels = batch["label"].to(ctx.device, non_blocking=True)
        with _autocast(ctx.device, cfg.amp):
            if guidance is None:
                loss = criterion(model(normalize(images, meta)), labels)
            else:
                logits, a = model(normalize(images, meta))
                loss = criterion(logits, labels)
                lam = mask_weight((epoch - 1) * len(loader) + i, guidance.total_steps, guidance.weight,
                                  guidance.warmup)
                chosen = select_masked(labels, defect.to(ctx.device), guidance.use[batch["index"]].to(ctx.device))
                term_value = math.nan
                if chosen.any():
                    cam = closed_form_cam(guidance.split, a[chosen], method=guidance.method)
                    term = energy_loss(cam, grid_mask(defect.to(ctx.device)[chosen], cam.shape[-2:],
                                                      guidance.dilate)).mean()
                    loss = loss + lam * term
                    term_value = term.item()
                    totals[2:] += torch.tensor([term_value * int(chosen.sum()), int(chosen.sum())],
                                               dtype=torch.float64)
        lr = optimizer.param_groups[0]["lr"]
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        totals[:2] += torch.tensor([loss.item() * len(labels), len(labels)], dtype=torch.float64)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if on_step is not None:
            values = {"train_loss": loss.item(), "lr": lr}
            if guidance is not None:
                values.update(train_mask_loss=term_value, mask_weight=lam)
            on_step((epoch - 1) * len(loader) + i + 1, values)
    totals = all_reduce_sum(totals, ctx)
    out = {"train_loss": float(totals[0] / totals[1])}
    if guidance is not None:
        out.update(train_mask_loss=float(totals[2] / totals[3]) if totals[3] else math.nan, mask_weight=lam)
    return out


@torch.inference_mode()
def validate(model: nn.Module, loader: DataLoader, criterion: nn.Module, meta: dict[str, Any],
             ctx: DistContext) -> dict[str, float]:
    """Validation loss, accuracy and F1 (defective = positive), reduced over all ranks."""
    model.eval()
    sums = torch.zeros(5, dtype=torch.float64)
    for batch in loader:
        images = batch["image"].to(ctx.device)
        labels = batch["label"].to(ctx.device)
        logits = model(normalize(images, meta)).float()
        pred = logits.argmax(1)
        sums += torch.tensor([
            criterion(logits, labels).item() * len(labels), len(labels), (pred == labels).sum().item(),
            ((pred == 1) & (labels == 1)).sum().item(), ((pred == 1) != (labels == 1)).sum().item(),
        ], dtype=torch.float64)
    loss_sum, n, correct, tp, wrong = all_reduce_sum(sums, ctx).tolist()
    return {"val_loss": loss_sum / n, "val_acc": correct / n, "val_f1": 2 * tp / (2 * tp + wrong) if tp else 0.0}


PRECISE_BN_IMAGES = 2048
"""Most training images (per process, evenly spaced) whose statistics precise BatchNorm recomputes."""


def recompute_bn(model: nn.Module, loader: DataLoader, meta: dict[str, Any], device: torch.device) -> None:
    """Precise BatchNorm: the running statistics of every BatchNorm layer recomputed as the average over
    the training images of ``loader`` under the current weights (``torch.optim.swa_utils.update_bn``),
    instead of the exponential average of the last steps. With few optimiser steps (tens, as a few
    hundred parts in batches of 32 give) the running statistics still lag far behind the weights, and
    the model in eval mode, which validation, the checkpoints and every map use, is not the model that
    was trained."""
    torch.optim.swa_utils.update_bn((normalize(batch["image"].to(device), meta) for batch in loader), model)


def _loaders(data: PreparedDataset, cfg: TrainConfig, ctx: DistContext,
             generator: torch.Generator) -> tuple[DataLoader, DataLoader, DataLoader, torch.Tensor]:
    """The training, validation and precise-BatchNorm loaders, and the training split's labels."""
    train_set = data.split("train", with_masks=False, with_defect=cfg.mask_loss != "none")
    val_set = data.split("val", with_masks=False)
    with main_first(ctx):
        for split in ("train", "val"):
            data.image_cache(split, progress=cfg.progress and ctx.is_main)
    sampler = DistributedSampler(train_set, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True,
                                 seed=cfg.seed) if ctx.distributed else None
    train_loader = DataLoader(train_set, batch_size=cfg.batch_size, shuffle=sampler is None, sampler=sampler,
                              generator=generator if sampler is None else None, num_workers=cfg.num_workers,
                              drop_last=len(train_set) > cfg.batch_size * ctx.world_size,
                              persistent_workers=cfg.num_workers > 0)
    val_loader = DataLoader(Subset(val_set, shard_indices(len(val_set), ctx)), batch_size=cfg.batch_size,
                            num_workers=cfg.num_workers)
    shard = shard_indices(len(train_set), ctx)
    spread = shard[::math.ceil(len(shard) / PRECISE_BN_IMAGES)]
    bn_loader = DataLoader(Subset(data.split("train", with_masks=False), spread), batch_size=cfg.batch_size,
                           num_workers=cfg.num_workers)
    return train_loader, val_loader, bn_loader, train_set.labels


def _write_log(out: Path, history: list[dict[str, Any]]) -> None:
    write_text(out / "log.jsonl", "".join(json.dumps(h) + "\n" for h in history))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(history[0]))
    writer.writeheader()
    writer.writerows(history)
    write_text(out / "log.csv", buf.getvalue())


def training_finished(cfg: TrainConfig) -> bool:
    """True when the run's ``last.pt`` reached ``cfg.num_epochs`` or stopped early (nothing to resume)."""
    last = cfg.paths()[2]
    if not last.is_file():
        return False
    state = read_checkpoint(last)
    stopped = state.get("early_stopping", {}).get("bad_epochs", 0) >= cfg.patience
    return state["meta"]["epoch"] >= cfg.num_epochs or stopped


def train(cfg: TrainConfig, *, on_batch: Callable[[int, int], None] | None = None) -> TrainResult:
    """Train per ``cfg``; ``on_batch(epoch, batch_index)`` is called before every training step."""
    return _train(cfg, init_distributed(cfg.device), on_batch)


def _train(cfg: TrainConfig, ctx: DistContext, on_batch: Callable[[int, int], None] | None) -> TrainResult:
    if cfg.num_epochs < 1 or cfg.batch_size < 1 or cfg.patience < 1 or cfg.learning_rate <= 0:
        raise QrsError("--num_epochs, --batch_size and --patience must be >= 1 and --learning_rate > 0")
    if not 0 <= cfg.warmup_epochs < cfg.num_epochs:
        raise QrsError(f"--warmup-epochs must be in [0, --num_epochs), got {cfg.warmup_epochs:g}")
    if cfg.tensorboard is not None:
        summary_writer_class()
    data = PreparedDataset(cfg.data_root)
    best_loss_path, best_acc_path, last_path = cfg.paths()
    out = cfg.out_dir()
    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed + ctx.rank)
    model = build_model(cfg.arch, pretrained=cfg.pretrained, weights=cfg.weights,
                        output_stride=cfg.output_stride).to(ctx.device)
    check_fits(training_need(model, data.img_size), cfg.batch_size, what=f"a training step of {cfg.arch}",
               size=data.img_size, device=ctx.device)
    meta = base_meta(cfg.arch, data.img_size, output_stride=cfg.output_stride, dataset_hash=data.dataset_hash,
                     seed=cfg.seed)
    meta["train_config"] = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()}
    meta["run_dir"] = str(out.resolve())
    mask_loss, mask_note = resolve_mask_loss(cfg, data)
    cfg = replace(cfg, mask_loss=mask_loss)
    if mask_note and ctx.is_main:
        print(f"note: {mask_note}", flush=True)
    train_loader, val_loader, bn_loader, train_labels = _loaders(data, cfg, ctx, generator)
    weights = class_weight_tensor(train_labels, cfg.class_weights)
    criterion = nn.CrossEntropyLoss(weight=weights.to(ctx.device) if weights is not None else None,
                                    label_smoothing=cfg.label_smoothing)
    optimizer = make_optimizer(model, cfg)
    steps = len(train_loader)
    scheduler = make_scheduler(optimizer, cfg.schedule, cfg.num_epochs * steps, round(cfg.warmup_epochs * steps))
    guidance = mask_guidance(cfg, model, data, cfg.num_epochs * steps)
    if guidance is not None:
        meta["mask_guidance"] = guidance.summary(int((train_labels == 1).sum()))
        if ctx.is_main:
            g = meta["mask_guidance"]
            print(f"mask guidance: energy loss on the {g['map']} map, weight {g['weight']:g} (ramped up over the first "
                  f"{g['warmup']:.0%} of the steps), masks dilated by {g['dilate']} px; masks of {g['n_masked']} "
                  f"of the {g['n_defective']} defective training images are used", flush=True)
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=cfg.amp and ctx.device.type == "cuda")
    stopper = EarlyStopping(cfg.patience)
    best = {"val_loss": math.inf, "val_acc": -1.0}
    history: list[dict[str, Any]] = []
    start_epoch = 1
    if cfg.resume:
        state = read_checkpoint(last_path)
        saved = state["meta"]
        if (saved["arch"] != cfg.arch or saved["dataset_hash"] != data.dataset_hash
                or model_size(saved) != data.img_size or model_output_stride(saved) != cfg.output_stride):
            raise QrsError(f"{last_path} was trained with another arch, dataset, image size or output stride "
                           f"({saved['arch']}, {size_text(model_size(saved))} px, stride {model_output_stride(saved)}); "
                           "cannot resume from it")
        model.load_state_dict(state["state_dict"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        stopper = EarlyStopping(**state["early_stopping"])
        best, history = state["best"], state["history"]
        torch.set_rng_state(state["rng"]["torch"])
        gen_states = state["rng"]["generator"]
        if len(gen_states) == ctx.world_size:
            generator.set_state(gen_states[ctx.rank])
        elif ctx.is_main:
            print(f"note: {last_path} was written by {len(gen_states)} process(es), this run has {ctx.world_size}: "
                  "augmentation is reseeded, so the run differs from an uninterrupted one")
        start_epoch = state["meta"]["epoch"] + 1
    monitor = TrainMonitor(out, ctx, title=f"{out.name}: {cfg.arch}, {'mask-guided' if guidance else 'labels only'}, "
                                           f"seed {cfg.seed}",
                           tensorboard=cfg.tensorboard, val_split=data.split("val") if cfg.tensorboard else None,
                           meta=meta, purge_step=(start_epoch - 1) * steps + 1 if cfg.resume else None)
    net = model if guidance is None else WithFeatures(model, guidance.split)
    ddp = DistributedDataParallel(net) if ctx.distributed else net
    epochs = tqdm(range(start_epoch, cfg.num_epochs + 1), desc="train", unit="epoch", initial=start_epoch - 1,
                  total=cfg.num_epochs, disable=not (cfg.progress and ctx.is_main))
    stopped = False
    for epoch in epochs:
        if isinstance(train_loader.sampler, DistributedSampler):
            train_loader.sampler.set_epoch(epoch)
        t0 = time.perf_counter()
        losses = train_one_epoch(ddp, train_loader, criterion, optimizer, scheduler, scaler, meta, cfg, ctx,
                                 generator, epoch, on_batch, guidance, monitor.step)
        if cfg.precise_bn:
            recompute_bn(model, bn_loader, meta, ctx.device)
        broadcast_buffers(model, ctx)
        metrics = validate(model, val_loader, criterion, meta, ctx)
        row = {"epoch": epoch, "mask_loss": cfg.mask_loss, **losses, **metrics, "time_s": time.perf_counter() - t0,
               "lr": optimizer.param_groups[0]["lr"]}
        train_loss = losses["train_loss"]
        history.append(row)
        epoch_meta = {**meta, "epoch": epoch, "val_metrics": metrics}
        stopped = stopper.step(metrics["val_loss"])
        gen_states = [torch.as_tensor(s) for s in all_gather_objects(generator.get_state(), ctx)]
        if ctx.is_main:
            if metrics["val_loss"] < best["val_loss"]:
                best["val_loss"] = metrics["val_loss"]
                save_checkpoint(best_loss_path, model, {**epoch_meta, "selected_by": "best_loss"})
            if metrics["val_acc"] > best["val_acc"]:
                best["val_acc"] = metrics["val_acc"]
                save_checkpoint(best_acc_path, model, {**epoch_meta, "selected_by": "best_acc"})
            save_checkpoint(last_path, model, {**epoch_meta, "selected_by": "last"}, optimizer=optimizer.state_dict(),
                            scheduler=scheduler.state_dict(), scaler=scaler.state_dict(), early_stopping=asdict(stopper), best=dict(best),
                            history=history, rng={"torch": torch.get_rng_state(), "generator": gen_states})
            _write_log(out, history)
            monitor.epoch(history, epoch * steps, model)
            epochs.set_postfix(train=f"{train_loss:.3f}", val=f"{metrics['val_loss']:.3f}",
                               acc=f"{metrics['val_acc']:.3f}", f1=f"{metrics['val_f1']:.3f}")
        if stopped:
            break
    epochs.close()
    monitor.close()
    barrier(ctx)
    return TrainResult(best_loss_path, best_acc_path, last_path, history, stopped)

