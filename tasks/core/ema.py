"""An exponential moving average of the weights, for every task, as torchvision's classification
reference keeps it (``references/classification/train.py``, ``--model-ema``; the 80.9 % ResNet-50 recipe).

Built on Lightning's ``WeightAveraging`` callback (``torch.optim.swa_utils.AveragedModel`` over the whole
task, weights and buffers), which checkpoints the average and restores it on resume. What is added:

* torchvision's schedule of updates: every ``every_n_steps`` optimizer steps ``avg = d * avg + (1 - d) * w``,
  with the decay adjusted to the run so that it means the same at any batch size and length:
  ``alpha = min(1, (1 - decay) * world * batch_per_process * every_n_steps / epochs)``, ``d = 1 - alpha``
  (``adjust: true``); during the first ``warmup_epochs`` epochs the average restarts at every update, so it
  leaves the warm-up equal to the weights;
* both models validated: Lightning's callback swaps the average in for validation; here the task runs each
  validation batch through both (``tasks.core.loops``): ``val/*`` is the trained model, ``val_ema/*`` the
  average, and ``best.ckpt`` is chosen by the average's metric, as its ``state_dict`` holds the average
  (``checkpoint["weights"] == "ema"``; the trained weights are under ``current_model_state``), so
  ``validate``/``test``/``predict`` from a checkpoint and ``backbones.export`` use the EMA weights.

Use: ``--trainer.callbacks+=tasks.core.ema.ExponentialMovingAverage`` (``configs/imagenet_resnet50_tv2.yaml``).
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, WeightAveraging
from lightning.pytorch.utilities import rank_zero_info

from datamodules.contract import BatchedData


class ExponentialMovingAverage(WeightAveraging):
    """EMA of a task's weights and buffers (see the module docstring).

    Args:
        decay: the decay per update before the adjustment (torchvision's recipe: 0.99998).
        every_n_steps: optimizer steps between updates (torchvision's ``--model-ema-steps``: 32).
        adjust: scale ``1 - decay`` by processes x batch x ``every_n_steps`` / epochs, as torchvision does.
        warmup_epochs: epochs during which the average restarts at each update (torchvision: the
            learning-rate warm-up's, 5 in its recipe).
        device: where the average lives (default: the model's device).
    """

    def __init__(
        self,
        decay: float = 0.99998,
        every_n_steps: int = 32,
        adjust: bool = True,
        warmup_epochs: int = 0,
        device: str | None = None,
    ) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ExponentialMovingAverage decay={decay} must be in [0, 1)")
        if every_n_steps < 1:
            raise ValueError(f"ExponentialMovingAverage every_n_steps={every_n_steps} must be 1 or more")
        super().__init__(device=device, use_buffers=True, avg_fn=self._average)
        self.decay = decay
        self.every_n_steps = every_n_steps
        self.adjust = adjust
        self.warmup_epochs = warmup_epochs
        self.decay_in_use = decay

    def _average(self, averaged: torch.Tensor, current: torch.Tensor, count: Any) -> torch.Tensor:
        """torchvision's ``ema_avg``; counters (BatchNorm's ``num_batches_tracked``) follow the model."""
        if not averaged.is_floating_point():
            return current
        return self.decay_in_use * averaged + (1.0 - self.decay_in_use) * current

    def adjusted_decay(self, trainer: pl.Trainer) -> float:
        """torchvision's: ``1 - min(1, (1 - decay) * world * batch * every_n_steps / epochs)``."""
        if not self.adjust:
            return self.decay
        epochs = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else 1
        if not isinstance(trainer.datamodule, BatchedData):
            raise ValueError(
                "ExponentialMovingAverage(adjust=true) needs the datamodule's batch_size; set adjust: false and "
                "give the decay per update"
            )
        batch = int(trainer.datamodule.batch_size)
        scale = trainer.world_size * batch * trainer.accumulate_grad_batches * self.every_n_steps / epochs
        return 1.0 - min(1.0, (1.0 - self.decay) * scale)

    def averaged_task(self) -> pl.LightningModule | None:
        """The averaged copy of the task (``tasks.core.loops`` validates its network), while fitting."""
        return self._average_model.module if self._average_model is not None else None

    # -- Lightning's hooks ----------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        pl_module.setup(stage)  # the network is built from the data's label set: before it is copied
        super().setup(trainer, pl_module, stage)
        self.decay_in_use = self.adjusted_decay(trainer)
        for callback in trainer.checkpoint_callbacks:
            if isinstance(callback, ModelCheckpoint) and (callback.monitor or "").startswith("val/"):
                callback.monitor = "val_ema/" + callback.monitor[4:]
        rank_zero_info(
            f"EMA of the weights: decay {self.decay_in_use:.6g} per update ("
            f"{f'{self.decay} adjusted as torchvision does' if self.adjust else 'as given'}), every "
            f"{self.every_n_steps} steps, restarting during {self.warmup_epochs} warm-up epochs; best.ckpt is chosen "
            f"by the average's metrics (val_ema/*)"
        )

    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        return step_idx is not None and step_idx % self.every_n_steps == 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if trainer.current_epoch < self.warmup_epochs and self._average_model is not None:
            self._average_model.n_averaged.fill_(0)  # the next update starts the average again

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        """Nothing is swapped: the task validates both models (``tasks.core.loops``)."""

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        """See :meth:`on_validation_epoch_start`."""

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        super().on_save_checkpoint(trainer, pl_module, checkpoint)
        if self._average_model is not None:
            checkpoint["weights"] = "ema"  # state_dict: the average; current_model_state: the trained weights
