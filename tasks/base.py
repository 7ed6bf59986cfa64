"""What every task shares: backbone construction, optimizer/scheduler injection, speed switches, logging.

A task's constructor is its hyperparameters (torchgeo's pattern): the backbone by zoo name plus any
builder option, the weights to start from, an injected optimizer and scheduler. Subclasses implement
``configure_models`` (and build metrics there) and the step methods.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.loggers import WandbLogger
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from backbones import build_backbone, check_backbone_name, load_weights
from backbones.resnet import ResNet
from backbones.weights import read_state_dict

log = logging.getLogger(__name__)

#: Task arguments that change how a run executes, not what the model is; kept out of checkpoint hparams.
RUNTIME_OPTIONS: tuple[str, ...] = ("channels_last", "compile", "predictions_file", "log_samples", "nonfinite_loss")

#: torchvision weights trained with ``FrozenBatchNorm2d(eps=0)``: torchvision's builders set eps to 0 when
#: loading them (``overwrite_eps``), and so do we, to reproduce their outputs exactly.
ZERO_EPS_WEIGHTS: frozenset[str] = frozenset({"FasterRCNN_ResNet50_FPN_Weights.COCO_V1"})

_NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)


def read_model_weights(source: str, prefix: str) -> tuple[dict[str, torch.Tensor], dict]:
    """A whole model's state dict from a torchvision name, a file or a checkpoint of the task.

    A task checkpoint's ``prefix`` (``detector.``, ``model.``, ``backbone.``) is removed. The metadata
    holds what is known of the label set: torchvision's ``categories`` or a checkpoint's ``class_names``
    and ``category_ids``.
    """
    state, meta = read_state_dict(source)
    if any(k.startswith(prefix) for k in state):
        state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    return state, meta


def classes_in(state: dict[str, torch.Tensor], key: str, source: str, what: str) -> int:
    """The number of output classes of the layer ``key`` in ``state`` (rows of its weight)."""
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


def set_frozen_bn_eps(module: nn.Module, eps: float) -> None:
    for m in module.modules():
        if isinstance(m, FrozenBatchNorm2d):
            m.eps = eps


def parameter_groups(model: nn.Module, weight_decay_norm_bias: bool) -> list[dict[str, Any]]:
    """Trainable parameters, split so that normalization weights and biases can skip weight decay.

    With ``weight_decay_norm_bias=False`` the second group gets ``weight_decay=0`` (a common ImageNet
    refinement, Goyal et al. 2017 keep it; torchvision's recipes drop it for BN).
    """
    decay, no_decay = [], []
    seen: set[int] = set()
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            if not weight_decay_norm_bias and (isinstance(module, _NORM_TYPES) or name == "bias"):
                no_decay.append(param)
            else:
                decay.append(param)
    groups = [{"params": decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


class BaseTask(pl.LightningModule):
    """Shared machinery of ``ClassificationTask``, ``DetectionTask`` and ``SegmentationTask``.

    Class attributes ``monitor`` and ``mode`` name the metric that picks the best checkpoint.
    """

    monitor: str = "val/loss"
    mode: Literal["min", "max"] = "min"

    def __init__(
        self,
        optimizer: OptimizerCallable | None = None,
        scheduler: LRSchedulerCallable | None = None,
        scheduler_interval: Literal["epoch", "step"] = "epoch",
        weight_decay_norm_bias: bool = True,
        channels_last: bool | None = None,
        compile: bool = False,
        nonfinite_loss: Literal["stop", "skip"] = "stop",
        reference_batch_size: int | None = None,
        scale_lr: bool = False,
    ) -> None:
        super().__init__()
        if scale_lr and not reference_batch_size:
            raise ValueError(
                "model.scale_lr needs model.reference_batch_size: the global batch the learning rate is for"
            )
        self.reference_batch_size = reference_batch_size
        self.scale_lr = scale_lr
        if nonfinite_loss not in ("stop", "skip"):
            raise ValueError(f"model.nonfinite_loss={nonfinite_loss!r} must be 'stop' or 'skip'")
        self.nonfinite_loss = nonfinite_loss
        self.skipped_nonfinite = 0
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.scheduler_interval = scheduler_interval
        self.weight_decay_norm_bias = weight_decay_norm_bias
        self.use_channels_last = channels_last
        self.use_compile = compile
        self._speedups_applied = False

    # -- models ---------------------------------------------------------------------------------
    @staticmethod
    def make_backbone(
        name: str, backbone_args: dict[str, Any] | None, weights_backbone: str | None, **overrides: Any
    ) -> ResNet:
        """``build_backbone(name, **backbone_args, **overrides)`` with ``weights_backbone`` loaded (no classifier)."""
        check_backbone_name(name)
        args = {**(backbone_args or {}), **overrides}
        for key in ("weights",):
            if key in args:
                raise ValueError(f"set model.weights_backbone instead of model.backbone_args.{key}")
        net = build_backbone(name, **args)
        if weights_backbone:
            load_weights(net, weights_backbone, ignore_head=True)
        return net

    def configure_models(self) -> None:
        raise NotImplementedError

    def models_ready(self) -> bool:
        raise NotImplementedError

    def setup(self, stage: str) -> None:
        if not self.models_ready():
            self.configure_models()
        self._apply_speedups()

    def _on_cuda(self) -> bool:
        try:
            return self.trainer.strategy.root_device.type == "cuda"
        except RuntimeError:  # not attached to a trainer
            return next(self.parameters()).is_cuda

    def _apply_speedups(self) -> None:
        if self._speedups_applied:
            return
        self._speedups_applied = True
        if self.channels_last_enabled():
            self.to(memory_format=torch.channels_last)
        if self.use_compile:
            for module in self.compile_targets():
                module.compile()

    def channels_last_enabled(self) -> bool:
        """``channels_last`` as configured; ``None`` means on for CUDA, off on CPU."""
        return self._on_cuda() if self.use_channels_last is None else bool(self.use_channels_last)

    def to_memory_format(self, images: torch.Tensor) -> torch.Tensor:
        """The input batch in the model's memory layout (a no-op when it already is)."""
        if self._speedups_applied and images.ndim == 4 and self.channels_last_enabled():
            return images.contiguous(memory_format=torch.channels_last)
        return images

    def compile_targets(self) -> list[nn.Module]:
        """Modules compiled in place by ``compile=True`` (parameter names stay unchanged)."""
        return [self.backbone]

    # -- optimization ---------------------------------------------------------------------------
    def configure_optimizers(self):
        params = parameter_groups(self, self.weight_decay_norm_bias)
        factory = self.optimizer_factory or (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-4))
        optimizer = self._fused(factory(params))
        self._scale_learning_rate(optimizer)
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        if hasattr(scheduler, "set_total_iters"):
            total = (
                self.trainer.estimated_stepping_batches
                if self.scheduler_interval == "step"
                else self.trainer.max_epochs
            )
            scheduler.set_total_iters(total)
        config = {"scheduler": scheduler, "interval": self.scheduler_interval}
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            config["monitor"] = self.monitor  # "÷10 whenever the error plateaus" (ResNet Sec. 3.4)
        return {"optimizer": optimizer, "lr_scheduler": config}

    def global_batch_size(self) -> int | None:
        """Images per optimizer step over all processes: batch size x processes x accumulation."""
        datamodule = getattr(self.trainer, "datamodule", None)
        per_process = getattr(datamodule, "batch_size", None)
        if per_process is None:
            return None
        return int(per_process) * self.trainer.world_size * self.trainer.accumulate_grad_batches

    def _scale_learning_rate(self, optimizer: torch.optim.Optimizer) -> None:
        """The linear scaling rule (Goyal et al. 2017, arXiv 1706.02677 §2.1): lr x global batch / reference.

        The configs state the global batch their learning rate is for (``reference_batch_size``: 256 on
        ImageNet, 16 for COCO detection); with ``scale_lr`` the rate follows the actual global batch.
        Large factors want a warm-up (the configs' ``WarmupMultiStepLR`` ``warmup_iters``), as Goyal et al. use.
        """
        if not self.scale_lr:
            return
        actual = self.global_batch_size()
        if actual is None:
            raise ValueError("model.scale_lr: the datamodule does not tell its batch_size")
        factor = actual / self.reference_batch_size
        for group in optimizer.param_groups:
            group["lr"] *= factor
            group["initial_lr"] = group["lr"]
        log.info(
            "learning rate scaled by %d / %d = %.4g (linear scaling rule)", actual, self.reference_batch_size, factor
        )

    def _fused(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """The same optimizer with its fused CUDA kernel (one launch for all parameters) when one exists.

        SGD, Adam and AdamW have one; it is used on CUDA unless the config sets ``fused`` or ``foreach``.
        """
        fusable = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW)
        defaults = optimizer.defaults
        if not (
            type(optimizer) in fusable
            and self._on_cuda()
            and defaults.get("fused") is None
            and defaults.get("foreach") is None
            and not defaults.get("differentiable")
        ):
            return optimizer
        groups = [{**group, "fused": True, "foreach": None} for group in optimizer.param_groups]
        if not all(p.is_cuda and p.is_floating_point() for g in groups for p in g["params"]):
            return optimizer
        return type(optimizer)(
            groups, fused=True, **{k: v for k, v in defaults.items() if k not in ("fused", "foreach")}
        )

    def guard_loss(self, loss: torch.Tensor, batch: dict) -> torch.Tensor:
        """Stop (or skip the batch) when the loss is NaN or infinite, naming the step and the batch.

        ``stop`` raises :class:`~tasks.reliability.NonFiniteLossError` with the global step, the batch's
        image paths or ids and the last checkpoint to resume from, before any weight is touched.
        ``skip`` replaces the loss by a zero that still reaches every parameter (so DDP's gradient
        all-reduce stays in step across ranks), counts it and logs ``train/skipped_nonfinite``.
        """
        if torch.isfinite(loss).all():
            return loss
        where = batch.get("path") or batch.get("paths") or batch.get("image_id") or batch.get("image_ids") or []
        where = [str(w) for w in (where.tolist() if isinstance(where, torch.Tensor) else where)]
        if self.nonfinite_loss == "skip":
            self.skipped_nonfinite += 1
            self.log("train/skipped_nonfinite", float(self.skipped_nonfinite), on_step=True, reduce_fx="max")
            log.warning("non-finite loss at step %d, batch skipped: %s", self.global_step, ", ".join(where[:8]))
            return sum(p.sum() * 0.0 for p in self.parameters() if p.requires_grad)
        from .reliability import NonFiniteLossError

        callback = self.trainer.checkpoint_callback if self._trainer is not None else None
        last = (callback.last_model_path or callback.best_model_path) if callback is not None else ""
        shown = ", ".join(where[:16]) + (f" ... ({len(where)} in all)" if len(where) > 16 else "")
        raise NonFiniteLossError(
            f"the training loss is {loss.item()} at step {self.global_step} (epoch {self.current_epoch}); "
            f"batch: {shown or 'unknown'}. Last good checkpoint: {last or 'none written yet'}. Lower the "
            f"learning rate or check these images, then resume with --ckpt_path {last or '<checkpoint>'}; "
            f"model.nonfinite_loss=skip skips such batches instead."
        )

    # -- random states in checkpoints: a resumed run draws what an uninterrupted one would -------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        from .reliability import rng_state

        checkpoint["rng_state"] = rng_state()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        from .reliability import restore_rng_state

        if "rng_state" in checkpoint:
            restore_rng_state(checkpoint["rng_state"])

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

    def log_learning_rate(self) -> None:
        """``train/lr`` on the steps the loggers write (``trainer.log_every_n_steps``) only: handing it to
        Lightning at every step costs about a millisecond of Python per step for a value nobody reads."""
        connector = getattr(self.trainer, "_logger_connector", None)
        if connector is not None and not connector.should_update_logs:
            return
        optimizer = self.optimizers()
        optimizer = getattr(optimizer, "optimizer", optimizer)
        self.log("train/lr", optimizer.param_groups[0]["lr"], on_step=True, on_epoch=False)

    # -- logging helpers --------------------------------------------------------------------------
    def wandb_loggers(self) -> list[WandbLogger]:
        if self._trainer is None:
            return []
        return [lg for lg in self.trainer.loggers if isinstance(lg, WandbLogger)]
