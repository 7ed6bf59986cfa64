"""SLURM's warning before the time limit, handled at a step every process has finished.

SLURM sends ``--signal=SIGUSR1@<seconds>`` to every task of the job some time before its limit.
Lightning's own handler (``SLURMEnvironment(auto_requeue=True)``) saves the checkpoint and calls
``scontrol requeue`` inside the signal handler, wherever each process happens to be: mid-step, or in a
collective the other ranks are not in. Here the handler only remembers the signal; at the end of the next
training step (or validation) the ranks agree (one all-reduce of a flag, as Lightning already broadcasts
its SIGTERM flag every step), all of them save ``hpc_ckpt_<n>.ckpt`` in the run directory at that step,
training stops, the CLI closes the loggers, and only then does rank 0 requeue the job. The requeued job
keeps its id, so ``tasks.run.cli`` gives it the same run directory and W&B run and resumes it from the newest
checkpoint there (``resume_point``): the same weights, optimizer, counters, data position and random
states as an uninterrupted run at that step.

The handler is installed when the CLI starts (``install_warning_handler``), before the model and data
are built, so a warning that comes early is remembered instead of killing the process (SIGUSR1's default).
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
from pathlib import Path

import lightning.pytorch as pl

log = logging.getLogger(__name__)

WARNING_SIGNAL = signal.SIGUSR1
_warned: list[int] = []  # the signals received, appended by the handler (nothing else happens in it)


def under_slurm() -> bool:
    """Whether this process is a task of a SLURM job that Lightning will treat as its cluster: Lightning's
    rule (``SLURMEnvironment.detect``: ``SLURM_NTASKS`` set, the job not named ``bash`` or ``interactive``),
    without the warning ``detect`` prints wherever ``srun`` is installed but not used."""
    return "SLURM_NTASKS" in os.environ and os.environ.get("SLURM_JOB_NAME") not in ("bash", "interactive")


def restarted_job() -> bool:
    """Whether this is a SLURM job running again after a requeue (its own, ``scontrol requeue``, or a node
    failure): ``SLURM_RESTART_COUNT`` > 0."""
    return under_slurm() and int(os.environ.get("SLURM_RESTART_COUNT") or 0) > 0


def install_warning_handler(signum: int = WARNING_SIGNAL) -> None:
    """Remember SLURM's warning signal instead of dying of it; ``SlurmRequeue`` acts on it at a step."""
    _warned.clear()  # a new run (the tests run several in one process)
    signal.signal(signum, lambda received, frame: _warned.append(received))


def warned() -> bool:
    return bool(_warned)


def next_hpc_checkpoint(run_dir: Path) -> Path:
    """``hpc_ckpt_<n+1>.ckpt``: the name Lightning resumes from (the highest ``n`` in the run directory)."""
    names = (re.fullmatch(r"hpc_ckpt_(\d+)\.ckpt", p.name) for p in run_dir.glob("hpc_ckpt_*.ckpt"))
    numbers = [int(m.group(1)) for m in names if m]
    return run_dir / f"hpc_ckpt_{max(numbers, default=0) + 1}.ckpt"


def job_id() -> str:
    """The id ``scontrol requeue`` takes: ``<array job>_<task>`` for an array task, else the job id."""
    if os.environ.get("SLURM_ARRAY_JOB_ID"):
        return f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ["SLURM_JOB_ID"]


class StoppedForRequeue(Exception):
    """Raised on every rank at the step the run stopped at for SLURM's warning; the CLI then closes the
    loggers, requeues the job (``SlurmRequeue.requeue``) and exits normally."""


def resume_point(run_dir: Path) -> Path | None:
    """The checkpoint a restarted SLURM job resumes from: the newest of the run directory's
    ``hpc_ckpt_<n>.ckpt`` (saved at the time-limit warning) and ``checkpoints/last.ckpt`` (saved after
    every validation, and at the step SIGTERM stopped the run: ``scontrol requeue``, a preemption)."""
    found = [*run_dir.glob("hpc_ckpt_*.ckpt"), run_dir / "checkpoints" / "last.ckpt"]
    found = [p for p in found if p.is_file()]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


class SlurmRequeue(pl.Callback):
    """Save ``hpc_ckpt_<n>.ckpt`` and stop (``StoppedForRequeue``) at the first training step, or validation
    end, after SLURM's warning, on every rank at the same step -- but not at an epoch's last step or the
    validation after it, which Lightning would resume past the next epoch; ``requeue()`` then puts the job
    back in the queue.

    Added by ``tasks.run.cli.TaskCLI`` to every run that is a SLURM task (Lightning's own in-handler requeue is
    switched off: ``SLURMEnvironment(auto_requeue=False)``).
    """

    def __init__(self) -> None:
        self.checkpoint: Path | None = None  # set once the run has stopped for a requeue

    def _check(self, trainer: pl.Trainer) -> None:
        if self.checkpoint is not None or trainer.sanity_checking:
            return
        if trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            # an epoch's last step, or the validation after it: Lightning resumes a checkpoint of that state as
            # if the epoch, its validation and the next were done (tests/test_slurm.py); the next epoch's first
            # step saves instead (a run in its last epoch ends by itself)
            return
        if not trainer.strategy.reduce_boolean_decision(warned(), all=False):
            return
        self.checkpoint = next_hpc_checkpoint(Path(trainer.default_root_dir))
        trainer.save_checkpoint(self.checkpoint, weights_only=False)  # every rank, at this step: resumable
        if trainer.is_global_zero:
            log.warning(
                "SLURM's time-limit warning: saved %s at step %d; the job requeues itself when the run has closed",
                self.checkpoint,
                trainer.global_step,
            )
        raise StoppedForRequeue(self.checkpoint)  # now: no validation or epoch end in the time that is left

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args) -> None:
        self._check(trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == "fit":
            self._check(trainer)

    def requeue(self, trainer: pl.Trainer) -> bool:
        """Rank 0 asks SLURM to requeue the job (the other ranks only stop ignoring SIGTERM, which SLURM
        sends to end this run of the job). Returns whether the job was requeued."""
        if self.checkpoint is None:
            return False
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # this run is over and saved: let it exit by itself
        if not trainer.is_global_zero:
            return True
        result = subprocess.run(["scontrol", "requeue", job_id()], capture_output=True, text=True)
        if result.returncode != 0:
            log.error(
                "scontrol requeue %s failed (%s); resume with the same --run_name and --ckpt_path %s",
                job_id(),
                (result.stderr or result.stdout).strip(),
                self.checkpoint,
            )
            return False
        log.warning("requeued SLURM job %s; it resumes from %s", job_id(), self.checkpoint)
        return True
