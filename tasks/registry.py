"""The tasks, by kind: each kind's command module and task class, in one table.

A checkpoint records the task that wrote it as its registry path (``tasks.detect.DetectionTask``), the same
however the command was started (``python -m tasks.detect`` runs the module as ``__main__``). Reading one
back, :func:`kind_of` maps what it records to a kind *without importing anything the file names*: only the
classes in this table are ever built from a checkpoint. Files written before the task was recorded this way
(``__main__.DetectionTask``) are recognized by their class name.

A new task is one line here (and its command module, ``tasks/<kind>.py``).
"""

from __future__ import annotations

import importlib

#: kind -> the task class's importable path (its module is the command: ``python -m tasks.<kind>``)
TASKS: dict[str, str] = {
    "classify": "tasks.classify.ClassificationTask",
    "detect": "tasks.detect.DetectionTask",
    "segment": "tasks.segment.SegmentationTask",
    "localize": "tasks.localize.LocalizationTask",
    "instance_segment": "tasks.instance_segment.InstanceSegmentationTask",
}

#: modules that moved into the wings, by their old names: a config or script naming
#: ``tasks.ema.ExponentialMovingAverage`` still finds the class (``tasks/__init__.py`` resolves these)
MOVED_MODULES: dict[str, str] = {
    "tasks.base": "tasks.core.base",
    "tasks.optim": "tasks.core.optim",
    "tasks.schedulers": "tasks.core.schedulers",
    "tasks.ema": "tasks.core.ema",
    "tasks.evaluation": "tasks.core.loops",
    "tasks.reliability": "tasks.run.checkpointing",
    "tasks.cli": "tasks.run.cli",
    "tasks.parse_errors": "tasks.run.parse_errors",
    "tasks.cluster": "tasks.run.slurm",
    "tasks.detection_models": "tasks.heads.faster_rcnn",
    "tasks.segmentation_models": "tasks.heads.fcn",
    "tasks.localization_models": "tasks.heads.localization",
    "tasks.tta": "tasks.heads.tta",
    "tasks.coco_eval": "tasks.metrics.coco",
    "tasks.detection_metrics": "tasks.metrics.devkits",
    "tasks.localization_metrics": "tasks.metrics.localization",
    "tasks.drawing": "tasks.outputs.drawing",
    "tasks.media": "tasks.outputs.media",
    "tasks.trained": "tasks.inference.loading",
    "tasks.predictor": "tasks.inference.predictor",
}


class UnknownTaskError(ValueError):
    """A checkpoint names a task this version does not have (or a class that is not a task)."""


def kind_of(recorded: str) -> str:
    """The kind of the task a checkpoint records: a kind, a registry path, or ``<module>.<class name>`` of
    a registered class written under another module name (``__main__``). Anything else is refused."""
    if recorded in TASKS:
        return recorded
    for kind, path in TASKS.items():
        if recorded == path:
            return kind
    name = recorded.rpartition(".")[2]
    module = recorded.rpartition(".")[0]
    for kind, path in TASKS.items():
        if module in ("__main__", path.rpartition(".")[0]) and name == path.rpartition(".")[2]:
            return kind
    raise UnknownTaskError(
        f"the checkpoint was written by {recorded}, which is not one of this version's tasks "
        f"({', '.join(TASKS.values())}); nothing it names is imported"
    )


def task_path(kind: str) -> str:
    """The importable path of the task class of ``kind``."""
    if kind not in TASKS:
        raise UnknownTaskError(f"no task kind {kind!r}; the kinds are {', '.join(TASKS)}")
    return TASKS[kind]


def task_class(kind: str) -> type:
    """The task class of ``kind`` (its command module imported)."""
    module, name = task_path(kind).rsplit(".", 1)
    return getattr(importlib.import_module(module), name)
