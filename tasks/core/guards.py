"""What a task does about batches that would harm a run: a non-finite loss stops it (or the batch is skipped),
and images skipped as unreadable are counted (mixed into ``tasks.core.base.BaseTask``)."""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite."""


class TaskGuards:
    """``guard_loss`` and ``count_skipped`` for the tasks' training and evaluation steps."""

    skipped_nonfinite: int = 0
    skipped_images: int = 0
    nonfinite_loss: str = "stop"

    def count_skipped(self, batch: dict) -> int:
        """Log ``data/skipped``, the images skipped so far as unreadable (``data.skip_corrupt``); return the
        batch's count."""
        skipped = int(batch.get("skipped", 0))
        if skipped:
            self.skipped_images += skipped
            self.log("data/skipped", float(self.skipped_images), on_step=True, on_epoch=False, reduce_fx="max")
        return skipped

    def guard_loss(self, loss: torch.Tensor, batch: dict) -> torch.Tensor:
        """Stop (or skip the batch) when the loss is NaN or infinite, naming the step and the batch.

        ``stop`` raises :class:`NonFiniteLossError` with the global step, the batch's
        image paths or ids and the last checkpoint to resume from, before any weight is touched.
        ``skip`` replaces the loss by a zero that still reaches every parameter (so DDP's gradient
        all-reduce stays in step across ranks), counts it and logs ``train/skipped_nonfinite``.
        """
        if torch.isfinite(loss).all():
            return loss
        where = batch.get("path") or batch.get("paths") or batch.get("image_id") or batch.get("image_ids") or []
        where = [str(w) for w in (where.tolist() if isinstance(where, torch.Tensor) else where)]
        if self.nonfinite_loss == "skip":
            self.skipped_nonfinite += 1
            self.log("train/skipped_nonfinite", float(self.skipped_nonfinite), on_step=True, reduce_fx="max")
            log.warning("non-finite loss at step %d, batch skipped: %s", self.global_step, ", ".join(where[:8]))
            return sum(p.sum() * 0.0 for p in self.parameters() if p.requires_grad)
        callback = self.trainer.checkpoint_callback if self._trainer is not None else None
        last = (callback.last_model_path or callback.best_model_path) if callback is not None else ""
        shown = ", ".join(where[:16]) + (f" ... ({len(where)} in all)" if len(where) > 16 else "")
        raise NonFiniteLossError(
            f"the training loss is {loss.item()} at step {self.global_step} (epoch {self.current_epoch}); "
            f"batch: {shown or 'unknown'}. {self._rate_in_effect()}Last good checkpoint: {last or 'none written yet'}. "
            f"Lower the learning rate or check these images, then resume with --ckpt_path {last or '<checkpoint>'}; "
            f"model.nonfinite_loss=skip skips such batches instead."
        )

    def on_before_zero_grad(self, optimizer) -> None:
        """With ``nonfinite_loss: skip``, the weights after each update are checked too: a finite loss can still
        give non-finite weights (an exploding update), which every later batch would only skip. The run stops at
        that step, naming it and the last good checkpoint; no checkpoint of such weights is written."""
        if self.nonfinite_loss != "skip":
            return
        params = [p for p in self.parameters() if p.requires_grad]
        if not params or bool(torch.stack([p.detach().isfinite().all() for p in params]).all()):
            return
        bad = next(name for name, p in self.named_parameters() if p.requires_grad and not p.isfinite().all())
        callback = self.trainer.checkpoint_callback if self._trainer is not None else None
        last = (callback.last_model_path or callback.best_model_path) if callback is not None else ""
        raise NonFiniteLossError(
            f"the weights became non-finite at step {self.global_step} (epoch {self.current_epoch}; {bad}, and "
            f"maybe others): model.nonfinite_loss=skip skips non-finite losses, not a diverging run. "
            f"{self._rate_in_effect()}Last good checkpoint: {last or 'none written yet'}; resume from it with a lower "
            f"learning rate (--ckpt_path {last or '<checkpoint>'})."
        )

    def refuse_nonfinite_weights(self, state: dict[str, torch.Tensor]) -> None:
        """Never write a checkpoint of non-finite weights as ``best`` or ``last``."""
        bad = [k for k, v in state.items() if v.is_floating_point() and not bool(v.isfinite().all())]
        if bad:
            raise NonFiniteLossError(
                f"not writing a checkpoint at step {self.global_step}: {bad[0]} (and {len(bad) - 1} more tensors) are "
                f"not finite. Resume from the last good checkpoint with a lower learning rate."
            )
