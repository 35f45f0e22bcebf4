"""How much memory a training step or a scoring batch needs, known before it runs.

What bounds memory at large image sizes is the activations, linear in the batch size and in the
number of pixels (a 1024 x 448 input has 9x the pixels of 224 x 224; a dilated last stage at output
stride 16 has 4x its cells). They are measured, not guessed: the model runs on PyTorch's ``meta``
device (shapes only, no data, no arithmetic, a fraction of a second) on images of the real size,
and

- training: every tensor autograd saves for the backward pass is counted
  (``torch.autograd.graph.saved_tensors_hooks``); a step needs that per image times the batch size,
  plus the weights, their gradients and two Adam moments;
- scoring: the largest input + output of any one layer per image (what must coexist while the
  forward pass runs without autograd), plus the full-size maps of the scoring path.

That is compared with the memory free on the device (CUDA: ``torch.cuda.mem_get_info``; CPU: the
kernel's ``MemAvailable``, within a container's cgroup limit), shared by the processes of a node
under torchrun on CPU, and a step that cannot fit stops before it starts, naming the largest
``--batch_size`` that does.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.autograd.graph import saved_tensors_hooks

from qrs.errors import QrsError
from qrs.images import Size, size_text

GIB = 2**30
MAP_COPIES = 10
"""Full-size float32 maps per image in the scoring path (C, M, masks over tau, localisation terms)."""
OPTIMIZER_COPIES = 4
"""float32 copies of the weights during training: weights, gradients, Adam's two moments."""


class InsufficientMemory(QrsError):
    """A step that would not fit in the device's free memory."""


@dataclass(frozen=True)
class MemoryNeed:
    """Bytes a step needs: ``fixed`` whatever the batch, plus ``per_image`` for every image of it."""

    per_image: int
    fixed: int

    def total(self, batch_size: int) -> int:
        return self.fixed + batch_size * self.per_image

    def largest_batch(self, available: int) -> int:
        """The largest batch size that fits in ``available`` bytes (0 when not even one image does)."""
        return max(0, (available - self.fixed) // self.per_image) if self.per_image else 2**31


def _meta_copy(model: nn.Module, train: bool) -> nn.Module:
    """The model on the meta device (no data), in training or eval mode; the model itself is untouched."""
    clone = copy.deepcopy(model).to("meta")
    return clone.train(train)


def _saved_bytes(clone: nn.Module, batch: int, size: Size) -> int:
    """Bytes of the tensors autograd saves for the backward pass of one forward pass of ``batch`` images."""
    saved = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal saved
        saved += t.numel() * t.element_size()
        return t

    with saved_tensors_hooks(pack, lambda t: t):
        clone(torch.empty(batch, 3, *size, device="meta"))
    return saved


def training_need(model: nn.Module, size: Size) -> MemoryNeed:
    """Memory of one training step: the tensors autograd saves per image (the difference between
    batches of 4 and 2, so that the weights autograd also saves, once per batch, are not counted per
    image), and the weights with their gradients and Adam moments."""
    clone = _meta_copy(model, True)
    per_image = (_saved_bytes(clone, 4, size) - _saved_bytes(clone, 2, size)) // 2
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    return MemoryNeed(per_image=per_image, fixed=OPTIMIZER_COPIES * params)


def scoring_need(model: nn.Module, size: Size) -> MemoryNeed:
    """Memory of one scoring batch: per image the largest input + output of a layer and the full-size maps."""
    clone = _meta_copy(model, False)
    largest = 0

    def measure(module: nn.Module, inputs: tuple[object, ...], output: object) -> None:
        nonlocal largest
        tensors = [t for t in (*inputs, output) if isinstance(t, torch.Tensor)]
        largest = max(largest, sum(t.numel() * t.element_size() for t in tensors))

    handles = [m.register_forward_hook(measure) for m in clone.modules() if not list(m.children())]
    try:
        with torch.no_grad():
            clone(torch.empty(1, 3, *size, device="meta"))
    finally:
        for handle in handles:
            handle.remove()
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    return MemoryNeed(per_image=largest + MAP_COPIES * 4 * size[0] * size[1], fixed=params)


def _cgroup_free() -> int | None:
    """Bytes left under this container's cgroup (v2 or v1) memory limit, None when there is none."""
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            limit = Path(limit_file).read_text().strip()
            usage = int(Path(usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 2**60:
            return max(0, int(limit) - usage)
    return None


def available_bytes(device: torch.device) -> int | None:
    """Free memory for this process's step on ``device``, None when it cannot be known (then nothing
    is checked). On CPU under torchrun the node's processes share it."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type != "cpu":
        return None
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
        free = int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None
    cgroup = _cgroup_free()
    if cgroup is not None:
        free = min(free, cgroup)
    return free // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def check_fits(need: MemoryNeed, batch_size: int, *, what: str, size: Size, device: torch.device,
               option: str = "--batch_size") -> None:
    """Stop with a clear message when ``batch_size`` images of ``size`` would not fit on ``device``."""
    available = available_bytes(device)
    total = need.total(batch_size)
    if available is None or total <= available:
        return
    largest = need.largest_batch(available)
    advice = (f"use {option} {largest} or less" if largest >= 1 else
              "not even one image fits: prepare the data at a smaller --img-size or use a larger --output-stride")
    raise InsufficientMemory(
        f"{what} at {size_text(size)} px with {option} {batch_size} needs about {total / GIB:.1f} GiB "
        f"({need.per_image / 2**20:.0f} MiB per image), but {available / GIB:.1f} GiB is free on {device.type}: "
        f"{advice}")

