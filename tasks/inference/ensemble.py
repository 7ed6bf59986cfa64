"""``model.ensemble``: several trained checkpoints of one task evaluated and predicting as one model (the 2015
entries' ensembles: the ResNet paper's Table 5 for classification, Table 9 and Table 12 for detection).

A task that offers it mixes in :class:`EnsembleOption` and takes an ``ensemble`` argument: the checkpoints
of *all* the members (the task's own network, built from its arguments, is then only a shell for the data and
the metrics; ``--ckpt_path`` is refused beside it, since it would name a network the ensemble does not use).
The members are read with ``weights_only=True`` like every checkpoint (``tasks.inference.loading``), must be
of the same task and share the label set -- the same class names in the same order (and, for detection, the
same category ids), checked against each other and against the data's --, with an error naming the
checkpoint that differs. ``validate``, ``test`` and ``predict`` take it, and ``load_predictor`` as
``load_predictor([a, b, ...])`` or ``ensemble=[...]``; ``fit`` refuses it. How the members' outputs
combine is each task's (classification: ``ClassificationTask.eval_logits``; detection:
``tasks.heads.ensemble``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .. import registry
from .loading import TrainedTask, load_task


def _labels(task) -> tuple[list[str] | None, list[int] | None]:
    names = [str(n) for n in task.class_names] if task.class_names is not None else None
    return names, (list(task.category_ids) if task.category_ids is not None else None)


def _shown(labels: tuple) -> str:
    names, ids = labels
    text = f"{len(names)} classes {names[:6]}{'...' if len(names) > 6 else ''}" if names else "no class names"
    return text + (f", category ids {ids[:6]}{'...' if len(ids) > 6 else ''}" if ids else "")


def load_members(paths: Sequence[str], kind: str, labels: tuple | None = None) -> list[TrainedTask]:
    """The tasks of ``paths`` (checkpoints of task ``kind``), which must share one label set (``labels``, the
    data's ``(class names, category ids)``, when known)."""
    if not paths:
        raise ValueError("model.ensemble is empty: list the members' checkpoints")
    members: list[TrainedTask] = []
    for path in paths:
        member = load_task(path)
        if member.kind != kind:
            raise ValueError(
                f"model.ensemble: {member.path} is a checkpoint of {registry.TASKS[member.kind]}, not of "
                f"{registry.TASKS[kind]}: an ensemble's members are checkpoints of one task"
            )
        found = _labels(member.task)
        reference, source = (labels, "the data") if labels is not None else (None, "")
        if members:
            reference, source = _labels(members[0].task), str(members[0].path)
        if reference is not None and not _same(found, reference):
            raise ValueError(
                f"model.ensemble: {member.path} has {_shown(found)}, but {source} has {_shown(reference)}: an "
                f"ensemble's members must share the label set (the same classes, in the same order)"
            )
        members.append(member)
    return members


def _same(found: tuple, reference: tuple) -> bool:
    """The same class names (where both have them) and the same category ids (where both have them)."""
    return all(a is None or b is None or a == b for a, b in zip(found, reference))


class EnsembleOption:
    """Mixed into a task (before ``BaseTask``) that takes an ``ensemble`` argument (see the module)."""

    ensemble: list[str] | None = None
    members: list[TrainedTask] = []  # noqa: RUF012 - replaced per instance when loaded

    def setup(self, stage: str) -> None:
        if not self.ensemble:
            return super().setup(stage)
        self.refuse_arguments(stage, {"ensemble": self.ensemble}, None)
        if stage == "predict":  # no labels in the data: the members bring them, and the number of classes
            self.use_ensemble(self.ensemble)
            self.hparams.num_classes = self.hparams.num_classes or self.members[0].task.hparams.num_classes
            return super().setup(stage)
        super().setup(stage)
        self.use_ensemble(self.ensemble, _labels(self))

    @classmethod
    def refuse_arguments(cls, subcommand: str, model: dict[str, Any], ckpt_path: str | None) -> None:
        """``ensemble`` with ``fit``, or beside ``--ckpt_path``, is refused."""
        super().refuse_arguments(subcommand, model, ckpt_path)
        if not model.get("ensemble"):
            return
        if subcommand == "fit":
            raise ValueError("model.ensemble is for validate, test and predict: fit trains one network")
        if ckpt_path:
            raise ValueError(
                f"--ckpt_path {ckpt_path} with model.ensemble: the ensemble is the checkpoints listed in "
                f"model.ensemble only; list this one there too, and drop --ckpt_path"
            )

    def set_inference_option(self, name: str, value: Any) -> None:
        """``ensemble`` (the predictor's): the members, checked against this task's label set."""
        if name != "ensemble":
            return super().set_inference_option(name, value)
        self.use_ensemble(value, _labels(self) if self.class_names is not None else None)

    def use_ensemble(self, paths: Sequence[str] | None, labels: tuple | None = None) -> None:
        """Evaluate and predict with the members of ``paths`` (``None``: this task's own network); the task
        takes the members' label set."""
        self.ensemble = list(paths) if paths else None
        self.members = load_members(self.ensemble, self.kind, labels) if self.ensemble else []
        if self.members:
            self.class_names, self.category_ids = self.members[0].task.class_names, self.members[0].task.category_ids

    def member_tasks(self) -> list[Any]:
        """The members' tasks, on this task's device and in eval mode."""
        return [m.task.to(self.device).eval() for m in self.members]

    def member_networks(self) -> list[Any]:
        return [getattr(t, t.network_attr) for t in self.member_tasks()]
