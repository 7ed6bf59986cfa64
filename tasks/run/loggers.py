"""Where a run's metrics go: Weights & Biases (online when credentials are configured, offline otherwise)
and, beside any logger, a ``metrics.csv`` in the run directory that a resumed run appends to.

* :func:`wandb_credentials_available` -- whether W&B can log in without asking (W&B's own lookup);
* :func:`generate_run_id` -- a W&B-style run id, kept in the run directory so that a resumed run logs into
  the same W&B run;
* :class:`ResumableCSVLogger` -- Lightning's ``CSVLogger``, except that a run resumed in its own directory
  keeps its ``metrics.csv`` and appends to it (Lightning's deletes the file when its folder is not empty);
* :class:`ValidationLine` -- one line per validation where the output is not a terminal (a cluster's log).
"""

from __future__ import annotations

import csv
import os
import sys

import lightning.pytorch as pl
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only

PROJECT = "residual-zoo"


def wandb_credentials_available() -> bool:
    """Whether W&B can log in without asking, by W&B's own lookup (``wandb.login(prompt=False, verify=False)``,
    what W&B names for this check): ``WANDB_API_KEY``, a netrc entry for the configured host (``WANDB_BASE_URL``:
    a self-hosted server as well as api.wandb.ai; the file ``$NETRC`` names, or ``~/.netrc``), or an identity
    token file (``WANDB_IDENTITY_TOKEN_FILE``). The key is not checked against the server.

    On ranks other than 0 it answers without looking (only rank 0 logs to W&B, and the lookup starts W&B's
    service process)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    if rank_zero_only.rank != 0:
        return False
    import wandb

    try:
        return bool(wandb.login(prompt=False, verify=False))
    except Exception as error:  # W&B's own lookup failed (a malformed netrc file, ...): say so, log offline
        rank_zero_info(f"W&B: looking for credentials failed ({error}); logging offline")
        return False


def generate_run_id() -> str:
    """A W&B-style run id (8 lowercase letters and digits)."""
    import secrets
    import string

    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(8))


# CSVLogger offers no option to keep an existing metrics.csv: its writer's private check is replaced
# (Lightning's minor version is bounded in pyproject; tests/test_reliability.py checks the rows are kept)
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


class ValidationLine(pl.Callback):
    """One line per validation on standard output when it is not a terminal (a SLURM log, a pipe: where the
    progress bar's metrics never appear): the epoch, the step, the metric ``best.ckpt`` is chosen by with its
    best so far, and the split's other headline metrics."""

    def __init__(self, always: bool = False) -> None:
        self.always = always
        self.best: float | None = None

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero or (sys.stdout.isatty() and not self.always):
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(("val/", "val_ema/"))}
        callback = trainer.checkpoint_callback
        monitor = getattr(callback, "monitor", None) or getattr(pl_module, "monitor", "val/loss")
        mode = getattr(callback, "mode", "max")
        value = metrics.get(monitor)
        if value is not None:
            better = self.best is None or (value > self.best if mode == "max" else value < self.best)
            self.best = value if better else self.best
        shown = [k for k in metrics if "/" not in k.split("/", 1)[1] and k != monitor][:6]  # no per-class entries
        head = f"{monitor} {value:.4f} (best {self.best:.4f})" if value is not None else f"{monitor} not logged"
        rest = ", ".join(f"{k} {metrics[k]:.4f}" for k in shown)
        print(f"validation: epoch {trainer.current_epoch}, step {trainer.global_step}: {head}"
              + (f"; {rest}" if rest else ""), flush=True)  # fmt: skip
