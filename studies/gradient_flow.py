"""``GradientFlow``: how signal moves through the residual units of any task's backbone.

Identity Mappings (Sec. 3, Eq. 4-5) explains residual learning by what reaches unit ``l``: forward,
``x_L = x_l + sum_i F(x_i)``; backward, ``dE/dx_l = dE/dx_L (1 + d/dx_l sum_i F(x_i))`` -- the gradient of
the deepest unit arrives at every shallower unit through the identity, unscaled. The callback measures,
every ``every_n_steps`` training steps, per residual unit (named ``res<stage>.<index>``):

* ``input_grad``: the norm of the gradient of the loss with respect to the unit's input ``x_l``;
* ``residual_to_shortcut``: ``||F(x_l)|| / ||h(x_l)||``, the residual branch's signal relative to the
  shortcut's (plain units have no shortcut and report none);

and per stage the norm of its output activations and of its weights. Values go to every logger as
``gradflow/...`` (W&B draws them as charts). :class:`UnitProbe` does the measuring for one step and can
be used directly.
"""

from __future__ import annotations

import re
from collections import OrderedDict

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from backbones.blocks import ResidualUnit


def unit_label(qualified_name: str) -> str:
    """``backbone.layer2.3`` -> ``res3.3`` (torchvision's layerN is the papers' stage N + 1)."""
    match = re.search(r"layer(\d+)\.(\d+)$", qualified_name)
    return f"res{int(match[1]) + 1}.{match[2]}" if match else qualified_name


class UnitProbe:
    """Hooks on every residual unit (and stage) of ``module`` for one forward/backward pass."""

    def __init__(self, module: nn.Module) -> None:
        self.units: OrderedDict[str, ResidualUnit] = OrderedDict(
            (unit_label(name), m) for name, m in module.named_modules() if isinstance(m, ResidualUnit)
        )
        self.stages: OrderedDict[str, nn.Module] = OrderedDict(
            (f"res{int(m[1]) + 1}", sub)
            for name, sub in module.named_modules()
            if (m := re.search(r"(?:^|\.)layer(\d+)$", name)) and isinstance(sub, nn.Sequential)
        )
        self.input_grad: dict[str, float] = {}
        self.ratio: dict[str, float] = {}
        self.activation: dict[str, float] = {}
        self._handles: list = []
        self._label = {id(u): label for label, u in self.units.items()}
        for label, unit in self.units.items():
            self._handles.append(unit.register_forward_pre_hook(self._capture_input(label)))
            unit.probe = self._record_ratio
        for label, stage in self.stages.items():
            self._handles.append(stage.register_forward_hook(self._capture_activation(label)))

    def _capture_input(self, label: str):
        def hook(_module: nn.Module, inputs: tuple[Tensor, ...]) -> None:
            x = inputs[0]
            if x.requires_grad:
                x.register_hook(lambda grad: self.input_grad.__setitem__(label, float(grad.detach().float().norm())))

        return hook

    def _record_ratio(self, unit: ResidualUnit, h: Tensor, f: Tensor) -> None:
        with torch.no_grad():
            self.ratio[self._label[id(unit)]] = float(
                f.detach().float().norm() / h.detach().float().norm().clamp_min(1e-12)
            )

    def _capture_activation(self, label: str):
        def hook(_module: nn.Module, _inputs, output: Tensor) -> None:
            self.activation[label] = float(output.detach().float().norm() / max(1, output.shape[0]) ** 0.5)

        return hook

    def weight_norms(self) -> dict[str, float]:
        return {
            label: float(torch.sqrt(sum(p.detach().float().square().sum() for p in stage.parameters())))
            for label, stage in self.stages.items()
        }

    def metrics(self) -> dict[str, float]:
        out = {f"gradflow/{label}/input_grad": v for label, v in self.input_grad.items()}
        out.update({f"gradflow/{label}/residual_to_shortcut": v for label, v in self.ratio.items()})
        out.update({f"gradflow/{label}/activation_norm": v for label, v in self.activation.items()})
        out.update({f"gradflow/{label}/weight_norm": v for label, v in self.weight_norms().items()})
        return out

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        for unit in self.units.values():
            unit.probe = None


class GradientFlow(pl.Callback):
    """Log per-unit gradient and signal norms every ``every_n_steps`` training steps (see the module docstring).

    Args:
        every_n_steps: measure on steps 0, n, 2n, ...
    """

    def __init__(self, every_n_steps: int = 100) -> None:
        if every_n_steps < 1:
            raise ValueError("every_n_steps must be at least 1")
        self.every_n_steps = every_n_steps
        self._probe: UnitProbe | None = None
        self.last: dict[str, float] = {}

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        if trainer.global_step % self.every_n_steps == 0:
            self._probe = UnitProbe(pl_module)

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._probe is None:
            return
        self.last = self._probe.metrics()
        self._probe.remove()
        self._probe = None
        for logger in trainer.loggers:
            logger.log_metrics(self.last, step=trainer.global_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._probe is not None:  # the step was skipped (no backward): drop the hooks
            self._probe.remove()
            self._probe = None
