"""How every task evaluates, written once (mixed into ``tasks.core.base.BaseTask``): ``validate`` and
``test`` steps and epochs over the task's :meth:`~TaskEvaluation.evaluate_batch` and
:meth:`~TaskEvaluation.epoch_scores`, and the EMA model's validation beside the trained one's.

A split's metrics are logged as ``<split>/<name>``: ``val``, ``test``, and ``val_ema`` -- with an
exponential moving average of the weights (``tasks.core.ema.ExponentialMovingAverage``), each validation
batch also runs through the averaged network, so validation reports both models, as torchvision's
classification reference does (``train.py``: "Test" and "Test: EMA").
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn

#: the splits a task keeps metrics for
EVAL_SPLITS = ("val", "val_ema", "test")


def data_split(split: str) -> str:
    """The dataset split a metric split reads (``val_ema`` evaluates the validation images)."""
    return "val" if split == "val_ema" else split


class TaskEvaluation:
    """Validation and test loops over two task hooks: :meth:`evaluate_batch` (a batch's outputs into the
    split's metrics; returns what the W&B sample logger draws) and :meth:`epoch_scores` (the split's
    epoch metrics, computed over all ranks and logged), with :meth:`reset_scores` between epochs."""

    network_attr: str

    def evaluate_batch(self, batch: dict, split: str) -> Any:
        """Run the network on an evaluation batch and update ``split``'s metrics."""
        raise NotImplementedError

    def epoch_scores(self, split: str) -> None:
        """Compute, log and reset ``split``'s metrics at the end of an epoch (per-batch metrics that
        Lightning reduces itself need nothing here)."""

    def reset_scores(self, split: str) -> None:
        """Forget what ``split``'s metrics gathered (the sanity check's batches, a new epoch)."""

    # -- the EMA model --------------------------------------------------------------------------------
    def ema_network(self) -> nn.Module | None:
        """The averaged network of a ``tasks.core.ema.ExponentialMovingAverage`` callback, while fitting."""
        from .ema import ExponentialMovingAverage  # (the EMA module imports Lightning's callbacks: on first use)

        if self._trainer is None:
            return None
        for callback in self._trainer.callbacks:
            average = callback.averaged_task() if isinstance(callback, ExponentialMovingAverage) else None
            if average is not None:
                return getattr(average, self.network_attr)
        return None

    @contextmanager
    def network_swapped(self, network: nn.Module) -> Iterator[None]:
        """Evaluate with ``network`` in place of the task's own (the EMA model), then put it back."""
        own = getattr(self, self.network_attr)
        network.train(own.training)  # held outside the task, it is not put in eval mode with it
        setattr(self, self.network_attr, network)
        try:
            yield
        finally:
            setattr(self, self.network_attr, own)

    # -- Lightning's hooks ----------------------------------------------------------------------------
    def validation_step(self, batch: dict, batch_idx: int) -> Any:
        outputs = self.evaluate_batch(batch, "val")
        ema = self.ema_network()
        if ema is not None:
            with self.network_swapped(ema):
                self.evaluate_batch(batch, "val_ema")
        return outputs

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self.evaluate_batch(batch, "test")

    def on_validation_epoch_start(self) -> None:
        for split in ("val", "val_ema"):
            self.reset_scores(split)

    def on_test_epoch_start(self) -> None:
        self.reset_scores("test")

    def on_validation_epoch_end(self) -> None:
        splits = ("val", "val_ema") if self.ema_network() is not None else ("val",)
        for split in splits:
            if self.trainer.sanity_checking:  # a few batches: scores that mean nothing, never logged
                self.reset_scores(split)
            else:
                self.epoch_scores(split)

    def on_test_epoch_end(self) -> None:
        self.epoch_scores("test")
