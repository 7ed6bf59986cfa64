"""What every task shares, written once: its arguments, the network's weights, the label set, checkpoint
metadata, the optimizer and schedule, the speed switches, and the guard against a diverging loss.

A task's constructor is its hyperparameters (torchgeo's pattern). :class:`BaseTask` takes the arguments
every task has (the backbone by zoo name plus any builder option, the weights to start from, the
injected optimizer and schedule, the speed and reliability switches); a task's own signature names only
what is its own and passes the rest on as ``**kwargs``, which LightningCLI follows into this signature
for ``--help`` and type checks. A task declares where its network lives (``network_attr``, also its
prefix in the task's state dict) and which layer's rows are its classes (``classifier_key``), and
implements ``build_network``, its steps and its metric.
"""

from __future__ import annotations

import inspect
import logging
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.loggers import WandbLogger
from torch import nn

from backbones import Backbone, BackboneName, build_backbone, check_backbone_name
from backbones.weights import (
    adopt_architecture,
    apply_weights,
    check_architecture,
    load_state_dict_checked,
    read_state_dict,
    remap,
)
from datamodules.contract import IdLabelledData, LabelledData
from zoo_common import checkpoints

from .contract import TaskContract
from .draws import StepSeeded
from .guards import TaskGuards
from .loops import TaskEvaluation
from .optim import Recipe, TaskOptimization

log = logging.getLogger(__name__)

#: Arguments that change how a run executes, not what the model is: kept out of checkpoint hparams, so
#: that a later validate/predict command line decides them (LightningCLI applies a checkpoint's hparams).
RUNTIME_OPTIONS: tuple[str, ...] = ("channels_last", "compile", "log_samples", "nonfinite_loss")


def classes_in(state: dict[str, torch.Tensor], key: str, source: str, what: str) -> int:
    """The number of output rows of the layer ``key`` in ``state``."""
    if key not in state:
        raise ValueError(f"weights={source!r} is not a {what} state dict: it has no {key!r}")
    return int(state[key].shape[0])


def check_num_classes(given: int | None, found: int, source: str) -> int:
    if given is not None and given != found:
        raise ValueError(
            f"model.num_classes={given} but weights={source!r} have {found}; leave num_classes unset, or "
            f"use model.weights_backbone to start a model with another label set from these weights"
        )
    return found


def read_weights(source: str, backbone: str, flag: str) -> tuple[dict, dict]:
    """``backbones.weights.read_state_dict``, a failed download naming the flag that takes a local file."""
    try:
        return read_state_dict(source, backbone)
    except checkpoints.WeightsError as err:
        if "could not download" not in str(err):
            raise
        raise checkpoints.WeightsError(
            f"{flag}={source}: {err} On the command line: --{flag} <file> (a local copy), or --{flag} null to start "
            f"from random weights (detection from scratch: --model.norm bn --model.freeze_at 0 too)"
        ) from None


class BaseTask(TaskContract, TaskEvaluation, TaskOptimization, TaskGuards, StepSeeded, pl.LightningModule):
    """Shared machinery of every task.

    Args:
        backbone: zoo name (``python -m backbones`` lists them).
        backbone_args: any builder option of the backbone, e.g. ``{"stride_in_1x1": true}``.
        num_classes: size of the label set; ``None`` takes it from the weights or the datamodule (an
            error if they disagree with a given value).
        weights: a whole model to start from -- a torchvision weights name, a weight file or a checkpoint
            of this task; its label set comes with it.
        weights_backbone: weights for the backbone only (torchvision name, file, or any task's
            checkpoint, e.g. a ``tasks.classify`` one); the rest starts fresh. Variant options the file
            records (``stride_in_1x1``, ``unit``, ...) are adopted unless ``backbone_args`` sets them.
        optimizer: injected optimizer; the configs carry the papers' recipes. ``None``: the task's default
            recipe, scaled to the run's global batch (SGD, momentum 0.9, weight decay 1e-4; lr 0.1 per 256
            images for classification; for detection detectron2's 0.02 per 16 from trained weights, 0.01 per
            2 but at most 0.01 from scratch; for segmentation torchvision's FCN 0.02 per 32 from trained
            weights, AdamW 0.003 per 8 from scratch), stated in the log.
        scheduler: injected learning-rate schedule. ``None``: the task's default, stepped per iteration: a
            linear warm-up (at most a tenth of the run), then cosine decay (classification), ÷10 at 2/3
            and 8/9 of the run (detection, detectron2's schedule) or poly decay, power 0.9 (segmentation).
        scheduler_interval: step an injected schedule each ``epoch`` or each optimizer ``step``; ``None``
            is the task's own (``epoch`` for classification, ``step`` for detection and segmentation).
        weight_decay_norm_bias: apply weight decay to normalization weights and biases too.
        channels_last: NHWC memory layout; ``None`` is the task's default (on CUDA for classification
            and segmentation, off for detection).
        compile: ``torch.compile`` the backbone.
        nonfinite_loss: ``stop`` the run on a NaN/inf loss, naming the step and the batch, or ``skip``
            such batches (counted in ``train/skipped_nonfinite``).
        reference_batch_size: the global batch the optimizer's learning rate is meant for.
        scale_lr: scale the learning rate linearly with the actual global batch (Goyal et al. 2017).
        log_samples: validation images logged to W&B with their predictions (``None``: the task's
            default, 16 for classification, 4 otherwise; 0 logs none).
    """

    #: the metric that picks the best checkpoint, and whether higher is better
    monitor: str = "val/loss"
    mode: Literal["min", "max"] = "min"
    #: ``--trainer.benchmark`` default: cuDNN's algorithm search pays off when every batch has one shape
    cudnn_benchmark: bool | None = None
    #: the network's state-dict key whose rows are the classes (``background_rows`` of them are not)
    classifier_key: str = ""
    background_rows: int = 0
    #: what the weights of ``network_attr`` are called in messages
    network_kind: str = "model"
    default_scheduler_interval: Literal["epoch", "step"] = "epoch"
    default_channels_last: bool | None = None
    default_log_samples: int = 4
    #: the task's own options that say where outputs go, not what the model is (kept out of checkpoints)
    output_options: tuple[str, ...] = ()
    #: what trains when the config names no optimizer or schedule (``tasks.core.optim.Recipe``)
    recipe: Recipe = Recipe("SGD", lr=0.1, images=256, decay="cosine")

    def __init__(
        self,
        backbone: BackboneName = "resnet50",
        backbone_args: dict[str, Any] | None = None,
        num_classes: int | None = None,
        weights: str | None = None,
        weights_backbone: str | None = None,
        optimizer: OptimizerCallable | None = None,
        scheduler: LRSchedulerCallable | None = None,
        scheduler_interval: Literal["epoch", "step"] | None = None,
        weight_decay_norm_bias: bool = True,
        channels_last: bool | None = None,
        compile: bool = False,
        nonfinite_loss: Literal["stop", "skip"] = "stop",
        reference_batch_size: int | None = None,
        scale_lr: bool = False,
        log_samples: int | None = None,
    ) -> None:
        super().__init__()
        if scale_lr and not reference_batch_size:
            raise ValueError(
                "model.scale_lr needs model.reference_batch_size: the global batch the learning rate is for"
            )
        if nonfinite_loss not in ("stop", "skip"):
            raise ValueError(f"model.nonfinite_loss={nonfinite_loss!r} must be 'stop' or 'skip'")
        if weights and weights_backbone:
            raise ValueError(
                f"set either model.weights (the whole {self.network_kind}) or model.weights_backbone, not both"
            )
        self.save_hyperparameters(ignore=["optimizer", "scheduler", *RUNTIME_OPTIONS, *self.output_options])
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.scheduler_interval = scheduler_interval or self.default_scheduler_interval
        self.use_channels_last = self.default_channels_last if channels_last is None else channels_last
        self.use_compile = compile
        self.nonfinite_loss = nonfinite_loss
        self.log_samples = self.default_log_samples if log_samples is None else log_samples
        self.skipped_nonfinite = 0
        self.skipped_images = 0
        self._speedups_applied = False
        setattr(self, self.network_attr, None)
        self.class_names: list[str] | None = None
        #: dataset category id of each class (COCO-style label spaces), when the label set has ids
        self.category_ids: list[int] | None = None
        self.backbone_options: dict[str, Any] = {}
        self._weights: tuple[dict, dict] | None = None
        if weights:
            state, meta = read_weights(weights, backbone, "model.weights")
            prefix = f"{self.network_attr}."
            if any(k.startswith(prefix) for k in state):  # a checkpoint of this task
                state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            found = classes_in(state, self.classifier_key, weights, self.network_kind) - self.background_rows
            self.hparams.num_classes = check_num_classes(num_classes, found, weights)
            self.labels_from_weights(meta, found)
            self._weights = (state, meta)
        if self.hparams.num_classes:  # known now (given, or from the weights): build the network at once
            self.configure_models()

    # -- the label set ---------------------------------------------------------------------------
    def labels_from_weights(self, meta: dict, found: int) -> None:
        """Take the label set a weights source records (a checkpoint's names and ids, torchvision's names)."""
        self.class_names = meta.get("class_names") or meta.get("categories")
        self.category_ids = meta.get("category_ids")

    def setup(self, stage: str) -> None:
        """Reconcile the label set with the datamodule's, build the network if not yet built, speed it up."""
        datamodule = self.trainer.datamodule
        if stage != "predict" and isinstance(datamodule, LabelledData):
            self.labels_from_data(datamodule)
        self.require_num_classes(stage)
        if getattr(self, self.network_attr) is None:
            self.configure_models()
        self.apply_speedups()

    def labels_from_data(self, datamodule) -> None:
        """The datamodule's label set: ``num_classes`` unless given (then they must agree), and its class
        names (and category ids) unless the weights or a checkpoint brought a label set of that size.

        A label set of category ids (detection) maps the data's ids to the model's classes by id, so a
        model whose ids came with its weights may cover more classes than the data has.
        """
        n = int(datamodule.num_classes)
        names = list(datamodule.class_names or range(n))
        ids = datamodule.category_ids if isinstance(datamodule, IdLabelledData) else None
        hp = self.hparams
        if hp.num_classes is None:
            hp.num_classes = n
        elif hp.num_classes != n and not (ids is not None and self.category_ids is not None):
            raise ValueError(
                f"model.num_classes={hp.num_classes} but the dataset has {n} classes ({type(datamodule).__name__}); "
                f"remove model.num_classes to take it from the data"
            )
        if ids is not None and self.category_ids is None:
            self.category_ids, self.class_names = list(ids), names
        elif ids is None and (self.class_names is None or len(self.class_names) != n):
            self.class_names = names

    def require_num_classes(self, stage: str) -> None:
        """An error saying what to pass when neither the config, the weights nor the data gave
        ``num_classes`` (prediction reads no labels: its classes come with the trained checkpoint)."""
        if self.hparams.num_classes is not None:
            return
        if stage == "predict":
            raise ValueError(
                "predict needs a trained model: pass --ckpt_path <checkpoint> (or model.weights with model.num_classes)"
            )
        raise ValueError("model.num_classes is not set and the datamodule does not tell it")

    def class_name(self, index: int) -> str:
        """The name of class ``index`` of the network's outputs (detection's background row excluded)."""
        k = index - self.background_rows
        if self.class_names and 0 <= k < len(self.class_names):
            return str(self.class_names[k])
        return str(index)

    # -- the network and its weights ------------------------------------------------------------------
    def build_network(self) -> nn.Module:
        """The task's network, built from ``self.hparams`` (its backbone through :meth:`make_backbone`)."""
        raise NotImplementedError

    def configure_metrics(self) -> None:
        """Build the task's metrics once the label set is known."""

    def configure_models(self) -> None:
        network = self.build_network()
        setattr(self, self.network_attr, network)
        if self._weights is not None:
            state, meta = self._weights
            self._weights = None
            what = f"weights={self.hparams.weights!r}"
            if isinstance(network, Backbone):
                apply_weights(
                    network, state, what=what, checkpoint_backbone=meta.get("checkpoint_backbone"),
                    architecture=meta.get("architecture"),
                )  # fmt: skip
            else:
                check_architecture(meta.get("architecture"), self.backbone_module(), what)
                load_state_dict_checked(network, remap(state), what)
            self.on_weights_loaded(self.hparams.weights)
        self.configure_metrics()

    def on_weights_loaded(self, source: str) -> None:
        """Called after ``weights`` were loaded into the network (detection adjusts torchvision's eps)."""

    def make_backbone(self, **overrides: Any) -> Backbone:
        """``build_backbone(backbone, **backbone_args, **overrides)`` with ``weights_backbone`` loaded (no
        classifier), adopting the variant options the weights record (see ``backbones.weights``)."""
        hp = self.hparams
        check_backbone_name(hp.backbone)
        given = dict(hp.backbone_args or {})
        if "weights" in given:
            raise ValueError("set model.weights_backbone instead of model.backbone_args.weights")
        source, state, meta = hp.weights_backbone, None, {}
        if source:
            state, meta = read_weights(source, hp.backbone, "model.weights_backbone")
        elif self._weights is not None:
            meta = self._weights[1]
        adopted = {}
        if meta.get("architecture"):
            with torch.device("meta"):  # what these options build, to see what the weights would change
                default = build_backbone(hp.backbone, **given, **overrides).architecture
            adopted = adopt_architecture(given, meta["architecture"], default)
        if adopted:
            log.info("%s record %s: building %s with them", source or hp.weights, adopted, hp.backbone)
            hp.backbone_args = given = {**given, **adopted}  # recorded in the checkpoint's hparams
        net = build_backbone(hp.backbone, **given, **overrides)
        if state is not None:
            apply_weights(
                net, checkpoints.backbone_state(state, meta.get("backbone_keys")), what=f"weights={source!r}",
                ignore_head=True,
                checkpoint_backbone=meta.get("checkpoint_backbone"), architecture=meta.get("architecture"),
            )  # fmt: skip
        self.backbone_options = {k: v for k, v in {**given, **overrides}.items() if k != "num_classes"}
        return net

    def backbone_module(self) -> Backbone | None:
        """The zoo backbone inside the network."""
        network = getattr(self, self.network_attr)
        return next((m for m in network.modules() if isinstance(m, Backbone)), None) if network is not None else None

    def detached_stages(self) -> nn.Module | None:
        """Where a head keeps the stages it took with ``Backbone.truncate`` (the C4 detector's box head)."""
        return None

    def backbone_record(self) -> dict:
        """What a checkpoint records of its backbone: name, builder options, ``architecture``, and where its
        tensors are (``keys``, read by ``zoo_common.checkpoints.backbone_state`` and ``backbones.export``)."""
        body = self.backbone_module()
        if body is None:
            return {}
        paths = {id(m): name for name, m in self.named_modules()}
        keys = {"": f"{paths[id(body)]}." if paths[id(body)] else ""}
        detached = self.detached_stages()
        if detached is not None:
            for index, attr in enumerate(body.detached):
                keys[f"{attr}."] = f"{paths[id(detached)]}.{index}."
        return {"name": body.name, "options": self.backbone_options, "architecture": body.architecture, "keys": keys}

    # -- checkpoints -----------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """The task's record (``zoo_common.checkpoints``): its registry path, label set, backbone record and
        the random states a resumed run needs. Non-finite weights are never written."""
        self.refuse_nonfinite_weights(checkpoint.get("state_dict") or {})
        with self.rng_outside_the_step():  # (a checkpoint written in the middle of a step: tasks.core.draws)
            checkpoints.write_task_record(
                checkpoint, task=self.registry_path(), class_names=self.class_names, category_ids=self.category_ids,
                backbone=self.backbone_record(),
            )  # fmt: skip

    @classmethod
    def registry_path(cls) -> str:
        """How checkpoints name this task: its ``tasks.registry`` path, the same whether the command ran as
        ``python -m tasks.<kind>`` (module ``__main__``) or was imported; a class outside the registry by
        its module path."""
        from ..registry import TASKS

        if cls.kind in TASKS and TASKS[cls.kind].rpartition(".")[2] == cls.__name__:
            return TASKS[cls.kind]
        module = cls.__module__
        if module == "__main__":
            import sys

            spec = getattr(sys.modules["__main__"], "__spec__", None)
            module = spec.name if spec is not None else module
        return f"{module}.{cls.__qualname__}"

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if checkpoints.RNG_STATE in checkpoint and self._trainer is not None:  # resuming, not loading to predict
            checkpoints.restore_rng_state(checkpoint[checkpoints.RNG_STATE])
        if checkpoint.get(checkpoints.CLASS_NAMES):
            self.class_names = list(checkpoint[checkpoints.CLASS_NAMES])
        if checkpoint.get(checkpoints.CATEGORY_IDS):
            self.category_ids = list(checkpoint[checkpoints.CATEGORY_IDS])
        recorded = checkpoint.get(checkpoints.BACKBONE) or {}
        body = self.backbone_module()
        if body is not None:
            check_architecture(recorded.get("architecture"), body, "the checkpoint's weights")

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path, map_location=None, hparams_file=None, strict=None, *,
                             record: checkpoints.TaskCheckpoint | None = None, **kwargs: Any):  # fmt: skip
        """Lightning's ``load_from_checkpoint`` for this project's checkpoints: the file is read with
        ``weights_only=True`` and must be one of this task's (another task's says which wrote it), its
        hyperparameters may not ask to build a class, and the weights it started from (``weights``,
        ``weights_backbone``) are not read again: the trained ones are in the file. ``kwargs`` override
        hyperparameters, as in Lightning's."""
        from ..registry import kind_of

        record = record or checkpoints.read_task_checkpoint(checkpoint_path)
        checkpoints.refuse_class_specs(record.raw.get("hyper_parameters") or {}, record.path)
        if record.task and kind_of(record.task) != cls.kind:
            raise checkpoints.WeightsError(
                f"{record.path} is a checkpoint of {record.task} (python -m tasks.{kind_of(record.task)}), not of "
                f"{cls.__name__}: load it with that task"
            )
        kwargs = {"weights": None, "weights_backbone": None, **kwargs}
        return super().load_from_checkpoint(
            record.path, map_location=map_location, hparams_file=hparams_file, strict=strict, weights_only=True,
            **kwargs,
        )  # fmt: skip

    @classmethod
    def wrote(cls, checkpoint: checkpoints.TaskCheckpoint) -> bool:
        """Whether ``checkpoint`` -- one written before checkpoints recorded their task -- holds this task: its
        network's tensors and only arguments this task takes."""
        prefix = f"{cls.network_attr}."
        if not any(k.startswith(prefix) for k in checkpoint.state_dict):
            return False
        return set(checkpoint.hyper_parameters) <= cls.argument_names()

    @classmethod
    def argument_names(cls) -> set[str]:
        """Every constructor argument of the task, its own and the ones it passes on to the base."""
        names: set[str] = set()
        for klass in cls.__mro__:
            if "__init__" in vars(klass) and issubclass(klass, BaseTask):
                names |= set(inspect.signature(klass.__init__).parameters) - {"self", "kwargs"}
        return names

    # -- outputs -----------------------------------------------------------------------------------------
    def output_path(self, configured: str | None, default: str) -> Path:
        """Where ``predict``/``test`` write: the configured path, else ``default`` in the run directory."""
        return Path(configured) if configured else Path(self.trainer.default_root_dir) / default

    def configure_callbacks(self) -> list[pl.Callback]:
        """W&B samples when ``log_samples > 0``; Lightning's ``LearningRateMonitor`` whenever a logger is on,
        which writes the main group's rate as ``train/lr`` on the steps the loggers write
        (``trainer.log_every_n_steps``; the scheduler is named ``train`` and the groups ``lr``, ``lr_no_decay``,
        ... by ``tasks.core.optim``)."""
        from ..outputs.media import WandbSamples

        callbacks: list[pl.Callback] = [WandbSamples(self.log_samples)] if self.log_samples > 0 else []
        if self._trainer is not None and self.trainer.loggers:
            callbacks.append(LearningRateMonitor(logging_interval="step"))
        return callbacks

    def forward(self, images: torch.Tensor):
        """The network on a batch of images, in the task's memory format (detection adds targets)."""
        return getattr(self, self.network_attr)(self.to_memory_format(images))

    def wandb_loggers(self) -> list[WandbLogger]:
        if self._trainer is None:
            return []
        return [lg for lg in self.trainer.loggers if isinstance(lg, WandbLogger)]
