"""Learning-rate schedules of the papers' recipes, as ``torch.optim.lr_scheduler.LRScheduler`` subclasses.

Each is stepped per optimizer step or per epoch (the task's ``scheduler_interval``); its ``last_epoch``
counts whichever it is stepped by. Schedules whose length is the run's (``total_iters=None``) get it
from the task through :meth:`set_total_iters` once the trainer knows it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

WarmupMethod = Literal["linear", "constant"]


def _warmup_factor(step: int, warmup_iters: int, warmup_factor: float, method: WarmupMethod) -> float:
    if step >= warmup_iters:
        return 1.0
    if method == "constant":
        return warmup_factor
    alpha = step / warmup_iters
    return warmup_factor * (1 - alpha) + alpha


class WarmupMultiStepLR(LRScheduler):
    """Step decay by ``gamma`` at ``milestones``, after an optional warm-up.

    * ResNet Sec. 4.2 (CIFAR): lr 0.1 divided by 10 at 32k and 48k iterations; ResNet-110 starts with
      0.01 for 400 iterations: ``milestones=[32000, 48000], warmup_iters=400, warmup_factor=0.1,
      warmup_method=constant``.
    * Goyal et al. 2017 / Faster R-CNN 1x: linear warm-up over 1000 iterations from 0.001 x lr, then
      ÷10 at 60k and 80k.

    Args:
        optimizer: the wrapped optimizer.
        milestones: steps (or epochs) at which the rate is multiplied by ``gamma``.
        gamma: decay factor.
        warmup_iters: length of the warm-up.
        warmup_factor: rate multiplier at the start of the warm-up.
        warmup_method: ``constant`` (hold ``warmup_factor``) or ``linear`` (ramp up to 1).
    """

    def __init__(
        self,
        optimizer: Optimizer,
        milestones: Sequence[int],
        gamma: float = 0.1,
        warmup_iters: int = 0,
        warmup_factor: float = 0.001,
        warmup_method: WarmupMethod = "linear",
        last_epoch: int = -1,
    ) -> None:
        if list(milestones) != sorted(milestones):
            raise ValueError(f"milestones must be increasing, got {list(milestones)}")
        if warmup_method not in ("linear", "constant"):
            raise ValueError(f"warmup_method={warmup_method!r} must be 'linear' or 'constant'")
        self.milestones = list(milestones)
        self.gamma = gamma
        self.warmup_iters = warmup_iters
        self.warmup_factor = warmup_factor
        self.warmup_method = warmup_method
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        step = self.last_epoch
        decay = self.gamma ** sum(1 for m in self.milestones if step >= m)
        warm = _warmup_factor(step, self.warmup_iters, self.warmup_factor, self.warmup_method)
        return [base * decay * warm for base in self.base_lrs]


class WarmupPolyLR(LRScheduler):
    """Polynomial decay ``lr * (1 - t / T) ** power`` (FCN / DeepLab "poly", power 0.9), optional warm-up.

    Args:
        optimizer: the wrapped optimizer.
        total_iters: ``T``; ``None`` means the whole run (set by the task).
        power: exponent.
        warmup_iters: length of the warm-up.
        warmup_factor: rate multiplier at the start of the warm-up.
        warmup_method: ``constant`` or ``linear``.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        total_iters: int | None = None,
        power: float = 0.9,
        warmup_iters: int = 0,
        warmup_factor: float = 0.001,
        warmup_method: WarmupMethod = "linear",
        last_epoch: int = -1,
    ) -> None:
        self.total_iters = total_iters
        self.power = power
        self.warmup_iters = warmup_iters
        self.warmup_factor = warmup_factor
        self.warmup_method = warmup_method
        super().__init__(optimizer, last_epoch)

    def set_total_iters(self, total: int) -> None:
        if self.total_iters is None:
            self.total_iters = int(total)

    def get_lr(self) -> list[float]:
        step = self.last_epoch
        total = self.total_iters or 1
        decay = max(0.0, 1.0 - min(step, total) / total) ** self.power
        warm = _warmup_factor(step, self.warmup_iters, self.warmup_factor, self.warmup_method)
        return [base * decay * warm for base in self.base_lrs]
