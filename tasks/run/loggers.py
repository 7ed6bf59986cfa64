"""Where a run's metrics go: Weights & Biases (online when credentials are configured, offline otherwise)
and, beside any logger, a ``metrics.csv`` in the run directory that a resumed run appends to.

* :func:`wandb_credentials_available` -- whether W&B can log in without asking;
* :func:`generate_run_id` -- a W&B-style run id, kept in the run directory so that a resumed run logs into
  the same W&B run;
* :class:`ResumableCSVLogger` -- Lightning's ``CSVLogger``, except that a run resumed in its own directory
  keeps its ``metrics.csv`` and appends to it (Lightning's deletes the file when its folder is not empty).
"""

from __future__ import annotations

import csv
import netrc
import os

from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment

PROJECT = "residual-zoo"


def wandb_credentials_available() -> bool:
    """Whether W&B can log in without asking: an API key in the environment or in ~/.netrc."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
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
