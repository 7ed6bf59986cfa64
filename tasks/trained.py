"""A trained task from its checkpoint, without a Trainer: the network with its weights, its label set and
the preprocessing its datamodule evaluated with. ``tasks.export`` builds on it.

The file is read with ``weights_only=True`` (a checkpoint holding pickled code is refused, as by every
loader here). The task class is the one the checkpoint records (``task``); checkpoints written before it
was recorded are recognised by where their network's tensors are.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from backbones.weights import WeightsError, check_architecture, load_state_dict_checked, torch_load_safe

#: the task classes by their ``python -m`` name
TASKS = {
    "classify": "tasks.classify.ClassificationTask",
    "detect": "tasks.detect.DetectionTask",
    "segment": "tasks.segment.SegmentationTask",
    "localize": "tasks.localize.LocalizationTask",
}


@dataclass
class TrainedTask:
    """A task rebuilt from a checkpoint, in eval mode on the CPU.

    Attributes:
        kind: ``classify``, ``detect``, ``segment`` or ``localize``.
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


def task_kind(raw: dict) -> str:
    """Which task wrote ``raw``: the recorded class, else where its network's tensors are."""
    recorded = raw.get("task")
    if recorded:
        for kind, path in TASKS.items():
            if path == recorded:
                return kind
        raise WeightsError(f"the checkpoint was written by {recorded}, which this version does not have")
    keys = raw.get("state_dict") or {}
    if any(k.startswith("detector.") for k in keys):
        return "detect"
    if any(k.startswith("backbone.") for k in keys):
        return "classify"
    if any(k.startswith("model.") for k in keys):
        return "segment" if "aux_loss" in (raw.get("hyper_parameters") or {}) else "localize"
    raise WeightsError("not a checkpoint of this project's tasks: no network weights in its state_dict")


def task_class(kind: str):
    module, name = TASKS[kind].rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


def load_task(checkpoint: str | Path) -> TrainedTask:
    """The task of ``checkpoint`` with its trained weights, in eval mode (``weights_only`` loading)."""
    path = Path(checkpoint)
    raw = torch_load_safe(path, f"checkpoint {path}")
    if not isinstance(raw, dict) or "state_dict" not in raw or "hyper_parameters" not in raw:
        raise WeightsError(f"{path}: not a checkpoint of this project's tasks (no state_dict or hyper_parameters)")
    kind = task_kind(raw)
    cls = task_class(kind)
    hparams = {k: v for k, v in raw["hyper_parameters"].items() if not k.startswith("_")}
    hparams.update(weights=None, weights_backbone=None)  # the checkpoint holds the trained weights
    if not hparams.get("num_classes"):
        raise WeightsError(f"{path}: records no num_classes: was it written before the first validation?")
    task = cls(**hparams)
    prefix = f"{task.network_attr}."
    state = {k[len(prefix) :]: v for k, v in raw["state_dict"].items() if k.startswith(prefix)}
    network = getattr(task, task.network_attr)
    check_architecture((raw.get("backbone") or {}).get("architecture"), task.backbone_module(), str(path))
    load_state_dict_checked(network, state, str(path))
    task.class_names = list(raw.get("class_names") or []) or None
    task.category_ids = list(raw.get("category_ids") or []) or None
    task.eval()
    data = dict(raw.get("datamodule_hyper_parameters") or {})
    state = raw.get(str(data.get("_class_path", "")).rsplit(".", 1)[-1]) or {}  # Lightning's key: the class name
    return TrainedTask(kind, task, data, path, state if isinstance(state, dict) else {})
