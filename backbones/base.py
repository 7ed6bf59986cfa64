"""The Backbone contract shared by every network in the zoo.

A backbone is an ``nn.Module`` that

* reports, for each stage (``stem``, ``res2`` ... ``res5``; CIFAR nets stop at ``res4``), the channels
  and stride of the map it produces in :attr:`Backbone.feature_info` -- computed where the blocks are
  built, never hard-coded by the heads that read them;
* returns the requested stages' maps from :meth:`Backbone.forward_features`;
* returns logits from ``forward`` when built with ``num_classes > 0``;
* can freeze its first stages with :meth:`Backbone.freeze` (detectron2's ``freeze_at`` semantics) and
  hand its last stages to a head with :meth:`Backbone.truncate` (the C4 detector runs ``res5`` per region);
* lets a head choose the maps it reads with :meth:`Backbone.select_outputs`, and tells its native
  stride (:attr:`Backbone.native_stride`, the deepest stage's stride without dilation) and the builder
  options that define its weights (:attr:`Backbone.architecture`).

Heads use only these public members (detectron2's FPN reads ``output_shape()`` the same way).

Subclasses describe their stages through two hooks, ``_stage_attrs`` and ``_run_stage``; everything
else lives here once.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn
from torchvision.ops import FrozenBatchNorm2d

NormKind = Literal["bn", "frozen_bn", "sync_bn", "gn"]
NORM_KINDS: tuple[str, ...] = ("bn", "frozen_bn", "sync_bn", "gn")


@dataclass(frozen=True)
class FeatureInfo:
    """What one stage produces: its number of channels and its stride relative to the input."""

    channels: int
    stride: int


def gn_groups(channels: int) -> int:
    """Groups for GroupNorm: 32 as in Wu & He (2018), fewer when the channels do not divide (CIFAR's 16)."""
    return math.gcd(32, channels)


def norm_layer(kind: NormKind, channels: int) -> nn.Module:
    """Build the normalization layer named by ``kind`` for ``channels`` channels.

    Args:
        kind: ``bn`` (BatchNorm2d), ``frozen_bn`` (fixed affine map, as the ResNet paper's detectors use,
            Appendix A), ``sync_bn`` (statistics over all DDP ranks, :class:`SyncBatchNorm`) or ``gn``
            (GroupNorm, 32 groups).
        channels: number of channels normalized.
    """
    if kind == "bn":
        return nn.BatchNorm2d(channels)
    if kind == "frozen_bn":
        return FrozenBatchNorm2d(channels)
    if kind == "sync_bn":
        return SyncBatchNorm(channels)
    if kind == "gn":
        return nn.GroupNorm(gn_groups(channels), channels)
    raise ValueError(f"norm={kind!r} is not one of {', '.join(NORM_KINDS)}")


class SyncBatchNorm(nn.SyncBatchNorm):
    """``torch.nn.SyncBatchNorm`` that also synchronizes on the CPU (DDP over gloo), where torch's raises.

    (torch's ``DistributedDataParallel`` refuses to wrap a CPU module holding one: convert after wrapping,
    with :func:`to_sync_batchnorm`, as ``tasks.segment`` does.)

    Training under DDP, the batch statistics are those of all ranks' batches together: each rank's
    per-channel sums of ``x`` and ``x**2`` and its pixel count go through one differentiable all-reduce
    (``torch.distributed.nn.functional.all_reduce``), so gradients flow to every rank's inputs as with
    torch's CUDA kernels. Elsewhere (CUDA, evaluation, one process) it is torch's module unchanged.
    """

    def forward(self, x: Tensor) -> Tensor:
        import torch.distributed as dist

        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if x.device.type != "cpu" or not (self.training and distributed):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        dims = [d for d in range(x.dim()) if d != 1]
        channels = x.shape[1]
        count = x.new_full((1,), x.numel() / channels)
        totals = all_reduce(torch.cat([x.sum(dims), (x * x).sum(dims), count]))
        n = totals[-1]
        mean = totals[:channels] / n
        var = totals[channels : 2 * channels] / n - mean * mean
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - momentum).add_(mean.detach(), alpha=momentum)
                unbiased = var.detach() * n / (n - 1).clamp_min(1)
                self.running_var.mul_(1 - momentum).add_(unbiased, alpha=momentum)
        shape = [1, channels] + [1] * (x.dim() - 2)
        y = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        return y * self.weight.view(shape) + self.bias.view(shape) if self.affine else y


def to_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Every ``BatchNorm`` in ``module`` (or ``module`` itself) as a :class:`SyncBatchNorm` sharing its
    parameters and buffers -- the same tensor objects, so an optimizer or a DDP wrapper built before the
    conversion still holds them (torch's ``convert_sync_batchnorm`` copies them into new ones)."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, nn.SyncBatchNorm):
        sync = SyncBatchNorm(
            module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats
        )
        for name, param in module.named_parameters(recurse=False):
            setattr(sync, name, param)
        for name, buffer in module.named_buffers(recurse=False):
            sync._buffers[name] = buffer
        sync.train(module.training)
        return sync
    for name, child in module.named_children():
        converted = to_sync_batchnorm(child)
        if converted is not child:
            setattr(module, name, converted)
    return module


def freeze_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm in ``module`` (or ``module`` itself) by a ``FrozenBatchNorm2d``.

    The frozen layer keeps the running statistics and affine parameters as buffers, so it is a fixed
    affine map in training and evaluation alike. Returns the converted module; containers are converted
    in place.
    """
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        frozen = FrozenBatchNorm2d(module.num_features, eps=module.eps)
        if module.affine:
            frozen.weight.copy_(module.weight.detach())
            frozen.bias.copy_(module.bias.detach())
        if module.track_running_stats:
            frozen.running_mean.copy_(module.running_mean)
            frozen.running_var.copy_(module.running_var)
        return frozen.to(module.running_mean.device if module.running_mean is not None else "cpu")
    for name, child in module.named_children():
        converted = freeze_batchnorm(child)
        if converted is not child:
            setattr(module, name, converted)
    return module


class Backbone(nn.Module):
    """Base class of every backbone; see the module docstring for the contract.

    Subclasses fill :attr:`feature_info` (ordered from the stem to the deepest stage) and implement
    ``_stage_attrs`` (which attributes make up each stage) and ``_run_stage`` (one stage's forward).
    """

    #: the zoo name, recorded so that weight files can be checked against it
    name: str
    feature_info: dict[str, FeatureInfo]
    out_features: tuple[str, ...]
    #: the stride of the deepest stage when no stage is dilated (32 on ImageNet nets, 4 on CIFAR nets)
    native_stride: int
    #: builder options that define the network's parameters and function (see ``ResNet.architecture``)
    architecture: dict
    #: attributes :meth:`truncate` handed to a head, in the order of the module it returned
    detached: tuple[str, ...] = ()
    #: Attributes applied after the deepest stage (e.g. the final BN+ReLU of pre-activation nets).
    _tail_attrs: tuple[str, ...] = ()

    # -- hooks for subclasses -------------------------------------------------------------------
    def _stage_attrs(self) -> dict[str, tuple[str, ...]]:
        raise NotImplementedError

    def _run_stage(self, name: str, x: Tensor) -> Tensor:
        raise NotImplementedError

    # -- the contract ---------------------------------------------------------------------------
    def select_outputs(self, out_features: Sequence[str] | str | None) -> Backbone:
        """Choose the stages :meth:`forward_features` returns (``None``: the deepest); returns ``self``."""
        stages = list(self.feature_info)
        if out_features is None:
            out_features = (stages[-1],)
        if isinstance(out_features, str):
            out_features = (out_features,)
        unknown = [name for name in out_features if name not in self.feature_info]
        if unknown or not out_features:
            raise ValueError(
                f"out_features={tuple(out_features)!r}: {', '.join(unknown) or 'empty'} not among this "
                f"backbone's stages ({', '.join(stages)})"
            )
        self.out_features = tuple(name for name in stages if name in out_features)
        return self

    @property
    def stage_names(self) -> tuple[str, ...]:
        return tuple(self.feature_info)

    def _apply_tail(self, x: Tensor) -> Tensor:
        for attr in self._tail_attrs:
            module = getattr(self, attr, None)
            if module is not None:
                x = module(x)
        return x

    def forward_features(self, x: Tensor) -> dict[str, Tensor]:
        """Maps of the stages named in ``out_features``, keyed by stage name."""
        feats: dict[str, Tensor] = {}
        last = self.out_features[-1]
        deepest = self.stage_names[-1]
        for name in self.stage_names:
            x = self._run_stage(name, x)
            if name == deepest:
                x = self._apply_tail(x)
            if name in self.out_features:
                feats[name] = x
            if name == last:
                break
        return feats

    def forward_all(self, x: Tensor) -> Tensor:
        """The deepest stage's map (after any final normalization), whatever ``out_features`` says."""
        for name in self.stage_names:
            x = self._run_stage(name, x)
        return self._apply_tail(x)

    def freeze(self, at: int) -> Backbone:
        """Freeze the first ``at`` stages: 0 freezes nothing, 1 the stem, 2 the stem and ``res2``, ...

        Frozen stages stop receiving gradients and their BatchNorm layers become ``FrozenBatchNorm2d``
        (detectron2's ``ResNet.freeze(freeze_at)``), so ``train()`` does not update their statistics.
        """
        names = self.stage_names
        if not 0 <= at <= len(names):
            raise ValueError(f"freeze(at={at}): at must be between 0 and {len(names)} ({', '.join(names)})")
        attrs = self._stage_attrs()
        for name in names[:at]:
            for attr in attrs[name]:
                module = getattr(self, attr)
                module.requires_grad_(False)
                setattr(self, attr, freeze_batchnorm(module))
        self.frozen_at = at
        return self

    def truncate(self, after: str) -> nn.Sequential:
        """Remove the stages deeper than ``after`` and return them (with any final norm) as one module.

        The returned module maps the ``after`` stage's output to what the deepest stage produced; the
        C4 detector applies it per region as its box head (ResNet paper, Appendix A). The backbone keeps
        the shallower stages, its ``feature_info`` shrinks accordingly, and its classifier is dropped;
        :attr:`detached` names the attributes the returned module's parts came from, in order, so that
        their weights can be put back where they belong (``python -m backbones.export``).
        """
        names = self.stage_names
        if after not in names or after == names[-1]:
            raise ValueError(f"truncate(after={after!r}): must be one of {', '.join(names[:-1])}")
        attrs = self._stage_attrs()
        removed = names[names.index(after) + 1 :]
        parts: list[nn.Module] = []
        detached: list[str] = []
        for name in removed:
            for attr in attrs[name]:
                parts.append(getattr(self, attr))
                detached.append(attr)
                delattr(self, attr)
            del self.feature_info[name]
        for attr in self._tail_attrs:
            module = getattr(self, attr, None)
            if module is not None:
                parts.append(module)
                detached.append(attr)
                setattr(self, attr, None)
        self.detached = tuple(detached)
        self._drop_classifier()
        self.out_features = tuple(name for name in self.out_features if name in self.feature_info) or (after,)
        return nn.Sequential(*parts)

    def _drop_classifier(self) -> None:
        """Remove the classifier head (subclasses that have one override this)."""

    @torch.no_grad()
    def zero_init_residual(self) -> None:
        """Make every residual unit start as an identity map (Goyal et al. 2017, arXiv 1706.02677 §5.1)."""
        for module in self.modules():
            if module is not self and hasattr(module, "zero_init_last"):
                module.zero_init_last()
