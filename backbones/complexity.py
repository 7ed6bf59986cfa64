"""Parameters and multiply-accumulates of a backbone, as the papers count them.

MACs are counted by PyTorch's own ``FlopCounterMode`` (convolutions and matrix products, 2 FLOPs per
multiply-add) on the meta device, so even ResNet-1202 is counted without allocating memory. The papers'
"FLOPs" are multiply-adds (ResNet Table 1: ResNet-50 3.8 x 10^9), i.e. our MACs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_parameters(model: nn.Module) -> int:
    """All parameters (trainable or not), as torchvision and the papers count them."""
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, input_size: int, in_channels: int = 3) -> int:
    """Multiply-accumulates of one forward pass on a ``1 x in_channels x input_size x input_size`` image."""
    device = next(model.parameters()).device
    x = torch.zeros(1, in_channels, input_size, input_size, device=device)
    was_training = model.training
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    model.train(was_training)
    return counter.get_total_flops() // 2


def profile(builder: Callable[..., nn.Module], *, macs: bool = True, **kwargs) -> dict:
    """Build ``builder(**kwargs)`` on the meta device and return its size, complexity and stages.

    The classifier has 1000 classes for ImageNet nets and 10 for CIFAR nets, as in the papers' tables.
    ``macs=False`` skips counting the multiply-accumulates (``None``): a forward pass through every layer,
    seconds for the 1000-layer nets.
    """
    with torch.device("meta"):
        probe = builder(**kwargs)
        kwargs = {"num_classes": 1000 if probe.default_input_size == 224 else 10, **kwargs}
        model = builder(**kwargs)
    return {
        "params": count_parameters(model),
        "macs": count_macs(model, model.default_input_size) if macs else None,
        "input_size": model.default_input_size,
        "stages": {name: (info.channels, info.stride) for name, info in model.feature_info.items()},
    }
