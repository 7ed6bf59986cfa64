"""Learning-rate schedules of the papers' recipes, as ``torch.optim.lr_scheduler.LRScheduler`` subclasses.

Each is stepped per optimizer step or per epoch (the task's ``scheduler_interval``); its ``last_epoch``
counts whichever it is stepped by. Schedules whose length is the run's (``total_iters=None``) get it
from the task through :meth:`set_total_iters` once the trainer knows it.
"""

from __future__ import annotations

import math
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


class _Warmup(LRScheduler):
    """A decay curve times a warm-up factor, in closed form: the rate at step ``t`` is
    ``base_lr * decay(t) * warm(t)`` whatever steps came before, so a resumed run continues on the curve.
    ``total_iters=None`` means the whole run, set by the task through :meth:`set_total_iters`."""

    def __init__(self, optimizer: Optimizer, total_iters: int | None, warmup_iters: int, warmup_factor: float,
                 warmup_method: WarmupMethod, last_epoch: int) -> None:  # fmt: skip
        if warmup_method not in ("linear", "constant"):
            raise ValueError(f"warmup_method={warmup_method!r} must be 'linear' or 'constant'")
        self.total_iters = total_iters
        self.warmup_iters = warmup_iters
        self.warmup_factor = warmup_factor
        self.warmup_method = warmup_method
        super().__init__(optimizer, last_epoch)

    def set_total_iters(self, total: int) -> None:
        if self.total_iters is None:
            self.total_iters = int(total)

    def decay(self, step: int) -> float:
        raise NotImplementedError

    def get_lr(self) -> list[float]:
        step = self.last_epoch
        factor = self.decay(step) * _warmup_factor(step, self.warmup_iters, self.warmup_factor, self.warmup_method)
        return [base * factor for base in self.base_lrs]


class WarmupMultiStepLR(_Warmup):
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
        self.milestones = list(milestones)
        self.gamma = gamma
        super().__init__(optimizer, None, warmup_iters, warmup_factor, warmup_method, last_epoch)

    def decay(self, step: int) -> float:
        return self.gamma ** sum(1 for m in self.milestones if step >= m)


class WarmupPolyLR(_Warmup):
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
        self.power = power
        super().__init__(optimizer, total_iters, warmup_iters, warmup_factor, warmup_method, last_epoch)

    def decay(self, step: int) -> float:
        total = self.total_iters or 1
        return max(0.0, 1.0 - min(step, total) / total) ** self.power


class WarmupCosineLR(_Warmup):
    """Cosine decay to ``eta_min_factor x lr`` over the run after a linear warm-up (Loshchilov & Hutter 2017;
    Goyal et al. 2017's warm-up), in closed form: the rate at step ``t`` depends on ``t`` alone, so a resumed
    run continues on the same curve.

    ``lr_t = lr * warm(t) * (f + (1 - f) * (1 + cos(pi * s)) / 2)`` with ``s = (t - W) / (T - W)`` after the
    warm-up (``s = 0`` during it), ``f = eta_min_factor``, ``T = total_iters``, ``W = warmup_iters``.

    Args:
        optimizer: the wrapped optimizer.
        total_iters: ``T``; ``None`` means the whole run (set by the task).
        warmup_iters: length of the warm-up.
        warmup_factor: rate multiplier at the start of the warm-up.
        warmup_method: ``linear`` or ``constant``.
        eta_min_factor: the rate at the end, as a fraction of the initial rate.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        total_iters: int | None = None,
        warmup_iters: int = 0,
        warmup_factor: float = 0.001,
        warmup_method: WarmupMethod = "linear",
        eta_min_factor: float = 0.0,
        last_epoch: int = -1,
    ) -> None:
        self.eta_min_factor = eta_min_factor
        super().__init__(optimizer, total_iters, warmup_iters, warmup_factor, warmup_method, last_epoch)

    def decay(self, step: int) -> float:
        total = max(self.total_iters or 1, self.warmup_iters + 1)
        progress = min(max(step - self.warmup_iters, 0) / (total - self.warmup_iters), 1.0)
        f = self.eta_min_factor
        return f + (1 - f) * 0.5 * (1 + math.cos(math.pi * progress))
