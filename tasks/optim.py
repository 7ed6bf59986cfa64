"""The optimizer side every task shares: parameter groups, fused kernels, the linear scaling rule."""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

_NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)


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
