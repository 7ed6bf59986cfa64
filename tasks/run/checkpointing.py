"""What keeps a days-long run from losing work: atomic and safe checkpoints and a checkpoint on interruption.

* :class:`AtomicCheckpointIO` writes each checkpoint to a temporary file in the same folder, flushes it
  to disk and renames it over the target, so a process killed mid-save leaves the previous checkpoint
  intact; it reads every checkpoint with ``torch.load(weights_only=True)``, so resuming from a file
  cannot run code.
* :class:`RunCheckpoint` keeps ``best.ckpt`` by the task's metric and writes ``last.ckpt`` after every
  validation (Lightning 2.6's ``ModelCheckpoint`` writes it only when a best checkpoint is written at the
  same step, so a run whose metric stopped improving would resume from the epoch of its best);
* :class:`ValidateAtEnd` validates after the last training step when the schedule would not, so every ``fit``
  ends with its metrics and ``best.ckpt``;
* :class:`InterruptCheckpoint` writes ``last.ckpt`` when a run is stopped by Ctrl-C or SIGTERM (Lightning
  turns SIGTERM into ``SIGTERMException`` at the next batch boundary).

What a checkpoint holds beside Lightning's keys (the random states that make a resume exact, the label
set, the backbone record) is ``zoo_common.checkpoints``'.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from zoo_common.checkpoints import WeightsError, torch_load_safe

from .run_dirs import disk_problem

log = logging.getLogger(__name__)


class RunCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` whose ``last.ckpt`` follows the run: written at every checkpointing point
    (each validation, or each epoch's end), whether or not a best checkpoint was written then."""

    # ModelCheckpoint has no public hook for "save last now": _should_skip_saving_checkpoint,
    # _should_save_on_train_epoch_end, _last_global_step_saved, _monitor_candidates and _save_last_checkpoint are
    # its private steps (Lightning's minor version is bounded in pyproject; tests/test_reliability.py checks
    # last.ckpt follows the run)
    def _save_last_always(self, trainer: pl.Trainer, at_epoch_end: bool) -> None:
        if (
            self.save_last
            and not self._should_skip_saving_checkpoint(trainer)
            and self._should_save_on_train_epoch_end(trainer) == at_epoch_end
            and self._last_global_step_saved != trainer.global_step  # not written just now with a best one
        ):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        self._save_last_always(trainer, at_epoch_end=True)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        self._save_last_always(trainer, at_epoch_end=False)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written atomically (temporary file, fsync, rename) and read with ``weights_only=True``."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.parent / f".{path.name}.partial-{os.getpid()}"
        try:
            with open(partial, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(partial, path)  # atomic on POSIX: readers see the old file or the new one
        except OSError as err:  # a full disk, a read-only folder: said in one line naming the folder
            raise OSError(disk_problem(err, path.parent)) from None
        except RuntimeError as err:  # torch.save reports a failed write as a RuntimeError wrapping the OSError
            if "write" not in str(err).lower() and "space" not in str(err).lower():
                raise
            hint = "Free space, or point --trainer.default_root_dir elsewhere"
            raise OSError(f"cannot write {path}: {err}. {hint}") from None
        finally:
            try:
                partial.unlink(missing_ok=True)
            except OSError:
                pass  # (a read-only folder: the error above is the one to show)
        try:  # make the rename itself durable
            fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError:
            pass

    def load_checkpoint(self, path: _PATH, map_location: Any | None = None, weights_only: bool | None = None) -> dict:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint {path} does not exist")
        try:
            return torch_load_safe(path, f"checkpoint {path}")
        except WeightsError as err:
            raise WeightsError(
                f"{err} A checkpoint from an earlier run that cannot be read cannot be resumed."
            ) from None


class ValidateAtEnd(pl.Callback):
    """Validate after the run's last training step when the schedule would not (``val_check_interval: 10000``
    in a run shorter than that), so that every ``fit`` ends with its metrics logged and ``best.ckpt`` written.

    Lightning validates after a step at which ``Trainer.should_stop`` is set (as for early stopping); this
    sets it at the last step -- ``max_steps`` reached, or the last batch of the last epoch -- which ends the run
    there anyway. A run whose schedule validates at that step validates once."""

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args) -> None:
        last_step = 0 < trainer.max_steps <= trainer.global_step
        epochs = trainer.max_epochs if trainer.max_epochs is not None else -1
        last_epoch = 0 < epochs <= trainer.current_epoch + 1
        if last_step or (last_epoch and trainer.fit_loop.epoch_loop.batch_progress.is_last_batch):
            trainer.should_stop = True


class InterruptCheckpoint(pl.Callback):
    """Save ``last.ckpt`` (next to the other checkpoints) when ``fit`` is interrupted by Ctrl-C or SIGTERM --
    in a training step or in one of its validations (a signal during validation once saved nothing)."""

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, (KeyboardInterrupt, SIGTERMException)) or trainer.state.fn != TrainerFn.FITTING:
            return
        callback = trainer.checkpoint_callback
        folder = Path(callback.dirpath) if callback is not None and callback.dirpath else Path(trainer.default_root_dir)
        path = folder / "last.ckpt"
        if trainer.validating:  # in one of fit's validations
            _as_after_the_validation(trainer.fit_loop)
        trainer.save_checkpoint(path, weights_only=False)  # the whole state: a resumable checkpoint
        log.warning("interrupted (%s): saved %s; resume with --ckpt_path %s", type(exception).__name__, path, path)


def _as_after_the_validation(fit_loop) -> None:
    """The loops' counters as the end of the validation in progress leaves them (Lightning's ``_BatchProgress``
    and epoch progress; a checkpoint of the state mid-validation resumes by training nothing): the validation
    run to its end, the step after which it ran counted, and at an epoch's end the epoch processed -- the state
    ``last.ckpt`` has when written after that validation. Its metrics are lost; the weights, the optimizer, the
    schedule and the data order are those of the last training step."""
    epoch_loop = fit_loop.epoch_loop
    progress, batches = epoch_loop.val_loop.batch_progress, int(sum(epoch_loop.val_loop.max_batches))
    for name in ("ready", "started", "processed", "completed"):
        left = batches - getattr(progress.current, name)
        setattr(progress.current, name, batches)
        setattr(progress.total, name, getattr(progress.total, name) + left)
    progress.is_last_batch = True
    epoch_loop._batches_that_stepped += 1  # (training_epoch_loop.on_advance_end, after its validation)
    if epoch_loop.batch_progress.is_last_batch:
        fit_loop.epoch_progress.increment_processed()  # (fit_loop.on_advance_end)
