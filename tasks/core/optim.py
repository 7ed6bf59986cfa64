"""The optimizer side every task shares: parameter groups, fused kernels, the linear scaling rule, and
each task's default recipe -- what trains when a config names no optimizer or schedule.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import nn

from datamodules.contract import BatchedData

log = logging.getLogger(__name__)

_NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)


def parameter_groups(
    model: nn.Module, weight_decay_norm_bias: bool, lr_scales: dict[nn.Module, float] | None = None
) -> list[dict[str, Any]]:
    """Trainable parameters, split so that normalization weights and biases can skip weight decay and
    parts of the model can train at a multiple of the rate.

    With ``weight_decay_norm_bias=False`` normalization weights and biases get ``weight_decay=0`` (a
    common ImageNet refinement, Goyal et al. 2017 keep it; torchvision's recipes drop it for BN). The
    parameters of each module in ``lr_scales`` go to groups with that ``lr_scale`` (the task multiplies
    the group's rate by it: torchvision's FCN trains its auxiliary head at 10x). Groups come in order:
    decayed, not decayed, then the scaled ones.
    """
    scale_of: dict[int, float] = {}
    for module, scale in (lr_scales or {}).items():
        scale_of.update({id(p): scale for p in module.parameters()})
    groups: dict[tuple[bool, float], list] = {(False, 1.0): [], (True, 1.0): []}
    seen: set[int] = set()
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            no_decay = not weight_decay_norm_bias and (isinstance(module, _NORM_TYPES) or name == "bias")
            groups.setdefault((no_decay, scale_of.get(id(param), 1.0)), []).append(param)
    out = []
    for (no_decay, scale), params in groups.items():
        if not params and (no_decay or scale != 1.0):
            continue
        group: dict[str, Any] = {"params": params, "name": _group_name(no_decay, scale)}
        if no_decay:
            group["weight_decay"] = 0.0
        if scale != 1.0:
            group["lr_scale"] = scale
        out.append(group)
    return out


def _group_name(no_decay: bool, scale: float) -> str:
    """A parameter group's name, which ``LearningRateMonitor`` appends to the scheduler's (``train``): the
    main group's rate is ``train/lr``, the others ``train/lr_no_decay``, ``train/lr_x10``, ..."""
    return "lr" + ("_no_decay" if no_decay else "") + (f"_x{scale:g}" if scale != 1.0 else "")


def apply_lr_scales(optimizer: torch.optim.Optimizer) -> None:
    """Multiply each group's rate by its ``lr_scale`` (:func:`parameter_groups`), once, before scheduling."""
    for group in optimizer.param_groups:
        group["lr"] *= group.get("lr_scale", 1.0)


def fused(optimizer: torch.optim.Optimizer, on_cuda: bool) -> torch.optim.Optimizer:
    """The same optimizer with its fused CUDA kernel (one launch for all parameters) when one exists.

    SGD, Adam and AdamW have one; it is used on CUDA unless the config sets ``fused`` or ``foreach``.
    """
    fusable = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW)
    defaults = optimizer.defaults
    if not (
        type(optimizer) in fusable
        and on_cuda
        and defaults.get("fused") is None
        and defaults.get("foreach") is None
        and not defaults.get("differentiable")
    ):
        return optimizer
    groups = [{**group, "fused": True, "foreach": None} for group in optimizer.param_groups]
    if not all(p.is_cuda and p.is_floating_point() for g in groups for p in g["params"]):
        return optimizer
    return type(optimizer)(groups, fused=True, **{k: v for k, v in defaults.items() if k not in ("fused", "foreach")})


def scale_learning_rate(optimizer: torch.optim.Optimizer, actual: int, reference: int) -> float:
    """The linear scaling rule (Goyal et al. 2017, arXiv 1706.02677 §2.1): every group's rate times
    ``actual / reference`` global images per step; returns the factor."""
    factor = actual / reference
    for group in optimizer.param_groups:
        group["lr"] *= factor
        group["initial_lr"] = group["lr"]
    log.info("learning rate scaled by %d / %d = %.4g (linear scaling rule)", actual, reference, factor)
    return factor


@dataclass(frozen=True)
class Recipe:
    """A task's default training recipe: SGD with momentum (or AdamW) at ``lr`` per ``images`` images per
    step, scaled linearly to the run's global batch (Goyal et al. 2017), a linear warm-up from
    ``warmup_factor x lr``, then the task's decay over the rest of the run.

    The warm-up lasts ``warmup_steps`` (or ``warmup_epochs``) but at most ``warmup_fraction`` of the run,
    so that a short run on a small dataset is not all warm-up.

    Args:
        source: whose recipe it is, for the log line.
        lr, images: the learning rate and the global batch it is for.
        max_lr: a ceiling on the scaled rate (linear scaling below ``images``, this rate above).
        optimizer: ``sgd`` (with ``momentum``) or ``adamw`` (Loshchilov & Hutter 2019, default betas).
        momentum, weight_decay: the optimizer's.
        decay: ``steps`` (÷10 at ``milestones``, fractions of the run), ``poly`` (``(1 - t/T) ** power``)
            or ``cosine`` (to zero).
    """

    source: str
    lr: float
    images: int
    decay: Literal["steps", "poly", "cosine"]
    optimizer_name: Literal["sgd", "adamw"] = "sgd"
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_steps: int | None = None
    warmup_epochs: float | None = None
    warmup_fraction: float = 0.1
    warmup_factor: float = 0.001
    milestones: tuple[float, ...] = ()
    power: float = 0.9
    max_lr: float | None = None

    def learning_rate(self, global_batch: int) -> float:
        lr = self.lr * global_batch / self.images
        return lr if self.max_lr is None else min(lr, self.max_lr)

    def warmup(self, total_steps: int, steps_per_epoch: int) -> int:
        """Warm-up steps for a run of ``total_steps``."""
        length = self.warmup_steps if self.warmup_steps is not None else 0
        if self.warmup_epochs is not None:
            length = max(length, math.ceil(self.warmup_epochs * steps_per_epoch))
        return max(0, min(length, int(self.warmup_fraction * total_steps)))

    def optimizer(self, params, global_batch: int) -> torch.optim.Optimizer:
        lr = self.learning_rate(global_batch)
        if self.optimizer_name == "adamw":
            return torch.optim.AdamW(params, lr=lr, weight_decay=self.weight_decay)
        return torch.optim.SGD(params, lr=lr, momentum=self.momentum, weight_decay=self.weight_decay)

    def scheduler(self, optimizer: torch.optim.Optimizer, total_steps: int, steps_per_epoch: int):
        """The schedule, stepped every optimizer step."""
        from .schedulers import WarmupCosineLR, WarmupMultiStepLR, WarmupPolyLR

        warm = {"warmup_iters": self.warmup(total_steps, steps_per_epoch), "warmup_factor": self.warmup_factor}
        if self.decay == "steps":
            milestones = [round(f * total_steps) for f in self.milestones]
            return WarmupMultiStepLR(optimizer, milestones=milestones, **warm)
        if self.decay == "poly":
            return WarmupPolyLR(optimizer, total_iters=total_steps, power=self.power, **warm)
        return WarmupCosineLR(optimizer, total_iters=total_steps, **warm)

    def describe(self, global_batch: int, total_steps: int, steps_per_epoch: int, parts: tuple[str, ...]) -> str:
        """One line: what the run uses and why (``parts``: which of optimizer and schedule are defaults)."""
        text = []
        if "optimizer" in parts:
            momentum = f", momentum {self.momentum}" if self.optimizer_name == "sgd" else ""
            text.append(
                f"{'AdamW' if self.optimizer_name == 'adamw' else 'SGD'} lr {self.learning_rate(global_batch):.4g} "
                f"({self.lr} per {self.images} images x {global_batch} images per step"
                f"{'' if self.max_lr is None else f', at most {self.max_lr}'}){momentum}, "
                f"weight decay {self.weight_decay}"
            )
        if "scheduler" in parts:
            warm = self.warmup(total_steps, steps_per_epoch)
            decay = {
                "steps": "lr / 10 at steps "
                + ", ".join(str(round(f * total_steps)) for f in self.milestones)
                + f" of {total_steps}",
                "poly": f"poly decay (1 - t/{total_steps}) ** {self.power}",
                "cosine": f"cosine decay to 0 over {total_steps} steps",
            }[self.decay]
            text.append(f"linear warm-up {warm} steps from {self.warmup_factor} x lr, then {decay}")
        return f"default recipe ({self.source}; no {' or '.join(parts)} in the config): " + "; ".join(text)


class TaskOptimization:
    """The optimizer and schedule of a task (mixed into ``tasks.core.base.BaseTask``): the configured ones, or
    the task's ``recipe`` scaled to the run, and its account of itself (the rate is logged by
    ``LearningRateMonitor``, added in ``tasks.core.base.BaseTask.configure_callbacks``)."""

    def starts_from_weights(self) -> bool:
        """Whether the network starts from trained weights (``weights`` or ``weights_backbone``): the tasks
        whose default recipe differs from scratch choose by it."""
        return bool(self.hparams.get("weights") or self.hparams.get("weights_backbone"))

    def lr_scales(self) -> dict[nn.Module, float]:
        """Parts of the model trained at a multiple of the rate (segmentation's auxiliary head at 10x)."""
        return {}

    def configure_optimizers(self):
        """The configured optimizer and schedule; where the config names none, the task's ``recipe``
        (``tasks.core.optim.Recipe``), scaled to this run's global batch and length and stated in one log line."""
        params = parameter_groups(self, self.hparams.weight_decay_norm_bias, self.lr_scales())
        defaults = tuple(
            k for k, f in (("optimizer", self.optimizer_factory), ("scheduler", self.scheduler_factory)) if f is None
        )
        batch = self.global_batch_size() or self.recipe.images
        if self.optimizer_factory is None:
            optimizer = self.recipe.optimizer(params, batch)
        else:
            optimizer = self.optimizer_factory(params)
            if self.hparams.scale_lr:
                scale_learning_rate(optimizer, batch, self.hparams.reference_batch_size)
        apply_lr_scales(optimizer)
        optimizer = fused(optimizer, self._on_cuda())
        total = int(self.trainer.estimated_stepping_batches)
        # Counting the steps made Lightning build the training loader before a resumed checkpoint's loops
        # (and the loader's position in its epoch) are restored; it would then skip restoring that position
        # and replay the epoch from its start. Let the fit loop build the loader again, after the restore.
        # (a private attribute: Lightning has no public way to drop the loader it built; its minor version is
        # bounded in pyproject, and tests/test_reliability.py's mid-epoch resume fails if this stops working)
        self.trainer.fit_loop._combined_loader = None
        if self.scheduler_factory is None:
            epochs = self.trainer.max_epochs if self.trainer.max_steps == -1 else None
            per_epoch = math.ceil(total / epochs) if epochs and epochs > 0 else total  # for warm-ups in epochs
            scheduler, interval = self.recipe.scheduler(optimizer, total, per_epoch), "step"
            rank_zero_info(self.recipe.describe(batch, total, per_epoch, defaults))
        else:
            if defaults:
                rank_zero_info(self.recipe.describe(batch, total, 1, defaults))
            scheduler, interval = self.scheduler_factory(optimizer), self.scheduler_interval
            if hasattr(scheduler, "set_total_iters"):
                scheduler.set_total_iters(total if interval == "step" else self.trainer.max_epochs)
        # "train" + the groups' names (parameter_groups): LearningRateMonitor logs the main rate as train/lr
        config = {"scheduler": scheduler, "interval": interval, "name": "train"}
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            config["monitor"] = self.monitor  # "÷10 whenever the error plateaus" (ResNet Sec. 3.4)
        self.lr_warmup = getattr(scheduler, "warmup_iters", 0)  # named by the non-finite loss message
        return {"optimizer": optimizer, "lr_scheduler": config}

    def global_batch_size(self) -> int | None:
        """Images per optimizer step over all processes: batch size x processes x accumulation."""
        datamodule = self.trainer.datamodule
        if not isinstance(datamodule, BatchedData):
            return None
        return int(datamodule.batch_size) * self.trainer.world_size * self.trainer.accumulate_grad_batches

    def _rate_in_effect(self) -> str:
        """The learning rate and warm-up at this step, and how to lower them (for a diverging loss)."""
        try:
            optimizer = self.optimizers()
        except RuntimeError:  # no trainer, or no optimizer yet
            return ""
        lr = getattr(optimizer, "optimizer", optimizer).param_groups[0]["lr"]
        warmup = getattr(self, "lr_warmup", 0)
        text = f"The learning rate at this step is {lr:.4g}"
        text += f", {warmup} steps of warm-up" if warmup else ", with no warm-up"
        if self.optimizer_factory is None:
            text += (
                f" (the task's default recipe: {self.recipe.lr} per {self.recipe.images} images). Set a lower one "
                f"with --model.optimizer SGD --model.optimizer.lr <rate> --model.optimizer.momentum 0.9"
            )
        else:
            text += ". Lower --model.optimizer.lr"
        if self.scheduler_factory is not None:
            text += " or lengthen the warm-up (--model.scheduler.warmup_iters)"
        return text + ". "
