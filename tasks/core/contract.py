"""The task contract: what code outside a task -- ``predict``, the predictor, ``tasks.export``, the W&B
samples, the checkpoint loader -- may ask of it, declared once on the base class with defaults (timm
declares a model's whole API on its class the same way).

Nothing outside a task branches on which task it is: a new task plugs in by implementing these methods
(mixed into ``tasks.core.base.BaseTask``) and adding one line to ``tasks.registry``.

* identity: ``kind`` (its registry kind) and ``network_attr`` (where its network lives, also its prefix in
  the state dict);
* prediction: :meth:`predictions` (each image's result, what ``predict`` writes), :meth:`predictor_result`
  (what ``load_predictor`` returns for it), :meth:`set_prediction_options` (top-k, test-time augmentation);
* W&B samples: :meth:`sample_records`;
* export: :meth:`export_spec` (the module to trace, its input and outputs, the preprocessing outside it),
  :meth:`export_size` (the default input size), :meth:`export_context` (patches that make it traceable);
* speed: :meth:`apply_speedups` (channels-last, ``torch.compile``), :meth:`channels_last_enabled`,
  :meth:`to_memory_format`, :meth:`compile_targets`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn


class NotSupportedError(ValueError):
    """What a task cannot do (export, test-time augmentation, a predictor), with what to do instead."""


@dataclass
class ExportSpec:
    """What ``tasks.export`` traces for a task.

    Attributes:
        module: the module to trace (plain tensors in and out).
        outputs: the names of its outputs, in order.
        batched: whether it takes ``N x 3 x H x W`` (else one ``3 x H x W`` image).
        input: what the input must be, for the file's metadata.
        preprocessing: what to do to an image before the graph (or ``{"in_graph": true, ...}``).
        warm_up: run the module once before ``torch.export`` (a detector's pooler fixes its level scales).
        fixed_size: why the graph can only be traced for one input size (``--dynamic`` is then refused), or
            ``""`` when its height and width may vary.
    """

    module: nn.Module
    outputs: tuple[str, ...]
    batched: bool
    input: str
    preprocessing: dict[str, Any] = field(default_factory=dict)
    warm_up: bool = False
    fixed_size: str = ""


#: the datamodule arguments that say how an image becomes a network's input (recorded in exported files)
PREPROCESSING_KEYS = (
    "image_size", "eval_size", "eval_resize", "eval_crops", "normalize", "mean", "std", "base_size", "crop_size",
)  # fmt: skip


class TaskContract:
    """The methods every task offers (see the module docstring); mixed into ``BaseTask``."""

    #: the task's kind in ``tasks.registry``
    kind: ClassVar[str] = ""
    #: the attribute holding the network; also its prefix in the task's state dict
    network_attr: ClassVar[str] = "model"
    #: whether ``tta`` (test-time augmentation) applies, and what to say where it does not
    supports_tta: ClassVar[bool] = False
    tta_unsupported: ClassVar[str] = "this task has no test-time augmentation"
    #: the task's own arguments that the predictor may set too (``load_predictor(..., name=value)``)
    inference_options: ClassVar[tuple[str, ...]] = ()
    #: the top-k of a classifier's predictions (set by :meth:`set_prediction_options`)
    top_k: int = 5

    # -- prediction -------------------------------------------------------------------------------
    def predictions(self, batch: dict) -> list[dict]:
        """Each image's prediction (with its ``path``): what ``predict`` writes and the predictor returns."""
        raise NotSupportedError(f"{type(self).__name__} makes no per-image predictions")

    def predictor_result(self, row: dict) -> dict:
        """What ``load_predictor`` returns for one image, from its :meth:`predictions` row."""
        return row

    def set_prediction_options(self, top_k: int = 5, tta: tuple[list[float], bool] | None = None,
                               **options: Any) -> None:  # fmt: skip
        """The predictor's options: ``top_k`` classes, test-time augmentation ``(scales, flip)`` or ``None``;
        ``options``: the task's :attr:`inference_options` by name (detection's ``box_refinement``)."""
        unknown = sorted(set(options) - set(self.inference_options))
        if unknown:
            offered = ", ".join(self.inference_options) or "none"
            raise NotSupportedError(f"{', '.join(unknown)}: not an inference option of this task (it has: {offered})")
        for name, value in options.items():
            self.set_inference_option(name, value)
        self.top_k = top_k
        if tta is not None and not self.supports_tta:
            raise NotSupportedError(f"tta: {self.tta_unsupported}")
        if self.supports_tta:
            self.tta = tta

    def set_inference_option(self, name: str, value: Any) -> None:
        """Set one of :attr:`inference_options` (as the task's attribute of that name, by default)."""
        setattr(self, name, value)

    # -- what a command may not start with -----------------------------------------------------------------
    @classmethod
    def refuse_arguments(cls, subcommand: str, model: dict[str, Any], ckpt_path: str | None) -> None:
        """Stop a command (``subcommand``) whose model arguments (``model``: the parsed ``--model.*``) cannot
        run it -- a ``fit`` that cannot train, an option that does not go with the command or with
        ``--ckpt_path`` -- before its run directory or W&B run is made. Nothing is refused by default;
        an override calls ``super()`` first, so the mixins' refusals (ensembles') all apply."""

    # -- W&B samples ----------------------------------------------------------------------------------
    def sample_records(self, batch: dict, outputs: Any) -> list[dict]:
        """Validation images with their predictions, as ``wandb.Image`` keyword arguments (``image`` first)."""
        return []

    # -- export ---------------------------------------------------------------------------------------
    def export_spec(self, data: dict[str, Any]) -> ExportSpec:
        """The module ``tasks.export`` traces; ``data`` is the datamodule's recorded arguments."""
        raise NotSupportedError(f"{type(self).__name__} cannot be exported as a whole model")

    def export_size(self, data: dict[str, Any]) -> tuple[int, int]:
        """The input size a file is traced at by default: the evaluation size the datamodule used."""
        side = data.get("eval_size") or data.get("image_size") or 224
        return int(side), int(side)

    @contextlib.contextmanager
    def export_context(self) -> Iterator[None]:
        """What must be patched while ``torch.export`` traces the module (nothing by default)."""
        yield

    @staticmethod
    def recorded_preprocessing(data: dict[str, Any]) -> dict[str, Any]:
        """The datamodule and its evaluation arguments, as a file's ``preprocessing`` metadata."""
        return {"datamodule": data.get("_class_path"), **{k: data[k] for k in PREPROCESSING_KEYS if k in data}}

    # -- speed switches -------------------------------------------------------------------------------
    use_channels_last: bool | None = None
    use_compile: bool = False
    _speedups_applied: bool = False

    def _on_cuda(self) -> bool:
        try:
            return self.trainer.strategy.root_device.type == "cuda"
        except RuntimeError:  # not attached to a trainer
            return next(self.parameters()).is_cuda

    def apply_speedups(self) -> None:
        """Channels-last and ``torch.compile`` as configured, once (``setup`` and the predictor call it)."""
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
        """Modules compiled in place by ``compile=True`` (parameter names stay unchanged): the backbone."""
        return [self.backbone_module()]
