"""A trained task from its checkpoint, without a Trainer: the network with its weights, its label set and
the preprocessing its datamodule evaluated with. ``tasks.export`` and the predictor build on it.

The file is read through ``zoo_common.checkpoints`` (``weights_only=True``: a checkpoint holding pickled code
is refused, as by every loader here). The task class is the one the checkpoint records, looked up in
``tasks.registry`` (nothing the file names is imported); files written before the task was recorded are
claimed by the registered task whose network and arguments they hold (``TaskContract.wrote``). The task is
built by its own ``load_from_checkpoint`` (``BaseTask.load_from_checkpoint``: the trained weights come from
the file, nothing is downloaded or read again).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zoo_common.checkpoints import TaskCheckpoint, WeightsError, read_task_checkpoint

from .. import registry


@dataclass
class TrainedTask:
    """A task rebuilt from a checkpoint, in eval mode on the CPU.

    Attributes:
        kind: its ``tasks.registry`` kind.
        task: the LightningModule (``task.network`` is its network).
        data: the datamodule's recorded arguments (``_class_path`` first), empty when none was recorded.
        path: the checkpoint.
        data_state: the datamodule's saved state (the per-pixel mean, with ``normalize: pixel_mean``).
    """

    kind: str
    task: Any
    data: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None
    data_state: dict[str, Any] = field(default_factory=dict)

    @property
    def network(self):
        return getattr(self.task, self.task.network_attr)

    @property
    def class_names(self) -> list[str]:
        """One name per output class of the network (detection's background first, as ``background``)."""
        n = int(self.task.hparams.num_classes) + self.task.background_rows
        return [self.task.class_name(k) if k >= self.task.background_rows else "background" for k in range(n)]


def checkpoint_kind(checkpoint: TaskCheckpoint) -> str:
    """Which registered task wrote ``checkpoint``: the recorded one, else the one that claims its contents."""
    if checkpoint.task:
        return registry.kind_of(checkpoint.task)
    for kind in registry.TASKS:
        if registry.task_class(kind).wrote(checkpoint):
            return kind
    raise WeightsError(
        f"{checkpoint.path}: not a checkpoint of this project's tasks: no registered task's network is in it"
    )


def load_task(checkpoint: str | Path) -> TrainedTask:
    """The task of ``checkpoint`` with its trained weights, in eval mode (``weights_only`` loading)."""
    record = read_task_checkpoint(checkpoint)
    kind = checkpoint_kind(record)
    if not record.hyper_parameters.get("num_classes"):
        raise WeightsError(f"{record.path}: records no num_classes: was it written before the first validation?")
    task = registry.task_class(kind).load_from_checkpoint(record.path, map_location="cpu", record=record).eval()
    return TrainedTask(kind, task, record.datamodule, record.path, record.datamodule_state)
