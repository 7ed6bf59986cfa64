"""Pre-activation ResNet v2 (He et al. 2016, "Identity Mappings in Deep Residual Networks", arXiv 1603.05027).

Every unit is ``x_{l+1} = x_l + F(x_l)`` with ``F = conv(ReLU(BN(... conv(ReLU(BN(x_l))))))`` (Fig. 4e),
so the shortcut path from any unit to any deeper one is a pure identity (Eq. 4). Following the paper's
Appendix and its authors' code:

* the stem is a bare convolution (plus the max pool on ImageNet); every unit applies its BN+ReLU
  first, and the shortcut reads that pre-activated input in the net's first unit ("the first activation
  right after conv1 and before splitting into two paths", even where the shortcut is an identity) and
  in every unit that increases dimensions (the authors' resnet-pre-act.lua: one BN-ReLU for both paths);
* the last unit is followed by one extra BN+ReLU, before pooling and the classifier;
* projection shortcuts where dimensions grow (type B), none of them followed by BN, except on CIFAR's
  2-layer ResNet-110 (option A, the ResNet paper's CIFAR recipe);
* the CIFAR bottleneck nets (164, 1001) stride the first 1x1, as resnet-pre-act.lua does; the ImageNet
  nets stride the 3x3, as fb.resnet.torch's preresnet.lua (and timm's resnetv2, whose weights load) do.

The ImageNet nets match timm's ``resnetv2_*`` (non-BiT) layout, so their weights load through
:func:`backbones.weights.load_weights`. Other activation placements of Fig. 4 are the ``unit=`` option of
any builder (``resnet.py``).
"""

from __future__ import annotations

from .resnet import ResNet, build_resnet, cifar_bottleneck_resnet, cifar_resnet


def _preact(kwargs: dict) -> dict:
    kwargs.setdefault("unit", "full_preact")
    return kwargs


def preact_resnet18(**kwargs) -> ResNet:
    """Pre-activation ResNet-18, basic units (2, 2, 2, 2)."""
    return build_resnet("preact_resnet18", layers=(2, 2, 2, 2), bottleneck=False, **_preact(kwargs))


def preact_resnet34(**kwargs) -> ResNet:
    """Pre-activation ResNet-34, basic units (3, 4, 6, 3)."""
    return build_resnet("preact_resnet34", layers=(3, 4, 6, 3), bottleneck=False, **_preact(kwargs))


def preact_resnet50(**kwargs) -> ResNet:
    """Pre-activation ResNet-50, bottlenecks (3, 4, 6, 3); timm ``resnetv2_50``."""
    return build_resnet("preact_resnet50", layers=(3, 4, 6, 3), bottleneck=True, **_preact(kwargs))


def preact_resnet101(**kwargs) -> ResNet:
    """Pre-activation ResNet-101, bottlenecks (3, 4, 23, 3); timm ``resnetv2_101``."""
    return build_resnet("preact_resnet101", layers=(3, 4, 23, 3), bottleneck=True, **_preact(kwargs))


def preact_resnet152(**kwargs) -> ResNet:
    """Pre-activation ResNet-152: 21.1% top-1 at a 320 crop (Table 5)."""
    return build_resnet("preact_resnet152", layers=(3, 8, 36, 3), bottleneck=True, **_preact(kwargs))


def preact_resnet200(**kwargs) -> ResNet:
    """Pre-activation ResNet-200, bottlenecks (3, 24, 36, 3): 20.7% top-1 at a 320 crop (Table 5)."""
    return build_resnet("preact_resnet200", layers=(3, 24, 36, 3), bottleneck=True, **_preact(kwargs))


def cifar_preact_resnet110(**kwargs) -> ResNet:
    """Pre-activation ResNet-110 (2-layer units): 6.37% CIFAR-10 error (Table 2).

    Option-A shortcuts, as every CIFAR net of the ResNet paper (Sec. 4.2), whose recipe Identity
    Mappings' 110-layer experiments follow (it names projections only for its bottleneck nets): the
    same parameters as ``cifar_resnet110``. ``shortcut="B"`` builds the projection variant.
    """
    return cifar_resnet(110, name="cifar_preact_resnet110", **_preact(kwargs))


def cifar_preact_resnet164(**kwargs) -> ResNet:
    """Pre-activation ResNet-164 (bottlenecks, stride in the first 1x1): 1.7M parameters, 5.46% / 24.33%
    CIFAR-10/100 (Table 3)."""
    return cifar_bottleneck_resnet(164, name="cifar_preact_resnet164", **_preact(kwargs))


def cifar_preact_resnet1001(**kwargs) -> ResNet:
    """Pre-activation ResNet-1001 (333 bottlenecks, stride in the first 1x1): 10.2M parameters, 4.92% /
    22.71% (Table 3)."""
    return cifar_bottleneck_resnet(1001, name="cifar_preact_resnet1001", **_preact(kwargs))
