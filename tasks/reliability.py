"""What keeps a days-long run from losing work: atomic and safe checkpoints, interruption, exact resume.

* :class:`AtomicCheckpointIO` writes each checkpoint to a temporary file in the same folder, flushes it
  to disk and renames it over the target, so a process killed mid-save leaves the previous checkpoint
  intact; it reads every checkpoint with ``torch.load(weights_only=True)``, so resuming from a file
  cannot run code.
* :class:`RunCheckpoint` keeps ``best.ckpt`` by the task's metric and writes ``last.ckpt`` after every
  validation (Lightning 2.6's ``ModelCheckpoint`` writes it only when a best checkpoint is written at the
  same step, so a run whose metric stopped improving would resume from the epoch of its best);
* :class:`InterruptCheckpoint` writes ``last.ckpt`` when a run is stopped by Ctrl-C or SIGTERM (Lightning
  turns SIGTERM into ``SIGTERMException`` at the next batch boundary).
* :func:`rng_state` / :func:`restore_rng_state` put Python's, NumPy's and torch's random states into the
  checkpoint (as tensors and plain numbers, loadable with ``weights_only=True``), so a resumed run draws
  the same shuffles and augmentations as an uninterrupted one.
* :class:`ResumableCSVLogger` keeps a resumed run's ``metrics.csv`` and appends to it (Lightning's
  ``CSVLogger`` deletes the file when its folder is not empty).
* :class:`NonFiniteLossError` is what a task raises when its loss stops being finite.
"""

from __future__ import annotations

import csv
import logging
import os
import random
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException

from backbones.weights import WeightsError, torch_load_safe

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite."""


class RunCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` whose ``last.ckpt`` follows the run: written at every checkpointing point
    (each validation, or each epoch's end), whether or not a best checkpoint was written then."""

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
        finally:
            partial.unlink(missing_ok=True)
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


class _AppendingWriter(ExperimentWriter):
    def _check_log_dir_exists(self) -> None:
        """Keep an earlier ``metrics.csv`` (a resumed run's) and take its columns, so new rows append to it."""
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as file:
                self.metrics_keys = next(csv.reader(file), [])


class ResumableCSVLogger(CSVLogger):
    """Lightning's ``CSVLogger``, except that a run resumed in its own directory (``--ckpt_path last``, a
    requeued SLURM job) appends to its ``metrics.csv`` instead of deleting it. Rows logged after the
    checkpoint a run resumed from and before it stopped appear twice; their ``step`` tells them apart."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment


class InterruptCheckpoint(pl.Callback):
    """Save ``last.ckpt`` (next to the other checkpoints) when training is interrupted by Ctrl-C or SIGTERM."""

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, (KeyboardInterrupt, SIGTERMException)) or not trainer.training:
            return
        callback = trainer.checkpoint_callback
        folder = Path(callback.dirpath) if callback is not None and callback.dirpath else Path(trainer.default_root_dir)
        path = folder / "last.ckpt"
        trainer.save_checkpoint(path)
        log.warning("interrupted (%s): saved %s; resume with --ckpt_path %s", type(exception).__name__, path, path)


def rng_state() -> dict[str, Any]:
    """Python's, NumPy's and torch's (CPU and CUDA) random states, as tensors and plain numbers."""
    version, internal, gauss = random.getstate()
    kind, keys, position, has_gauss, cached = np.random.get_state()
    state = {
        "python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "position": int(position),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    python = state["python"]
    random.setstate((python["version"], tuple(int(v) for v in python["state"].tolist()), python["gauss"]))
    numpy = state["numpy"]
    np.random.set_state(
        (numpy["kind"], numpy["keys"].numpy().astype(np.uint32), numpy["position"], numpy["has_gauss"], numpy["cached"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
