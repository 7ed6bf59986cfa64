"""The model side's random draws during training, as a function of the step (mixed into ``BaseTask``).

A training step draws random numbers on the model side too: dropout, the RPN's and RoI heads' sampled anchors
and regions (``torch.randperm`` in torchvision's samplers), MixUp and CutMix, the localizer's sampled anchors.
Drawn from the global generator, they depend on everything drawn before, so a run resumed in the middle of an
epoch would draw other numbers than the uninterrupted run at the same step. Here each step draws from the
global generator seeded by the run's seed, the epoch, the batch and the rank -- the data side's rule
(``datamodules.loading.EpochSeeded``) -- and the generator's state from before the step is put back after it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from datamodules.loading import run_seed


def step_seed(run: int, epoch: int, batch: int, rank: int) -> int:
    """The seed of training step ``(epoch, batch)`` on ``rank`` of a run seeded with ``run``."""
    seed = ((run * 1_000_003 + epoch) * 10_000_019 + batch) % 2**62
    return (seed * 1_009 + rank) % 2**63


class StepSeeded:
    """``on_train_batch_start`` seeds the step's draws (:func:`step_seed`); ``on_train_batch_end`` puts the
    global generators back as they were."""

    _model_seed: int | None = None
    _outside_rng: tuple | None = None

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self._model_seed is None:
            self._model_seed = run_seed()  # rank 0's; fixed before the run's first step, the same on resume
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
        self._outside_rng = torch.get_rng_state(), cuda
        torch.manual_seed(step_seed(self._model_seed, self.current_epoch, batch_idx, self.global_rank))

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._outside_rng is not None:
            _set(self._outside_rng)
            self._outside_rng = None

    @contextlib.contextmanager
    def rng_outside_the_step(self) -> Iterator[None]:
        """The global generators as they were before the current step (a checkpoint written in the middle of a
        step -- SLURM's warning, SIGTERM -- records those, not the step's seeded ones: a resumed run's seeds
        and shuffles come from them)."""
        if self._outside_rng is None:
            yield
            return
        inside = torch.get_rng_state(), torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
        _set(self._outside_rng)
        try:
            yield
        finally:
            _set(inside)


def _set(state: tuple) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)
