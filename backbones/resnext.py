"""ResNeXt (Xie et al. 2017, "Aggregated Residual Transformations", arXiv 1611.05431).

A ResNeXt is a ResNet whose bottlenecks aggregate ``C`` (cardinality) transformations of width ``d``:
the same :class:`~backbones.resnet.ResNet` with ``groups=C, width_per_group=d`` (as torchvision builds
it). The block's three equivalent forms (Fig. 3) are the ``form=`` option, implemented in ``forms.py``;
they share parameter layouts, so weights move between forms unchanged. As in the paper (Sec. 4):
type-B shortcuts, the stride in the 3x3 of each stage's first block, BN after each convolution and ReLU
after the addition.
"""

from __future__ import annotations

from .forms import FORMS, Form, PathwiseConv2d  # noqa: F401  (the forms belong to ResNeXt's API)
from .resnet import ResNet, build_resnet

_DEPTHS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}


def resnext(depth: int, cardinality: int, width: int, *, name: str | None = None, **kwargs) -> ResNet:
    """ImageNet ResNeXt-{depth} ({cardinality}x{width}d), any cardinality/width pair (Table 2).

    ``cardinality=1, width=64`` is ResNet-{depth}; ``2x40d``, ``4x24d``, ``8x14d`` and ``32x4d`` keep
    ResNet-50's complexity (Table 2).
    """
    if depth not in _DEPTHS:
        raise ValueError(f"ResNeXt depth must be one of {', '.join(map(str, _DEPTHS))}, not {depth}")
    name = name or f"resnext{depth}_{cardinality}x{width}d"
    return build_resnet(
        name, layers=_DEPTHS[depth], bottleneck=True, groups=cardinality, width_per_group=width, **kwargs
    )


def resnext50_32x4d(**kwargs) -> ResNet:
    """ResNeXt-50 (32x4d): 25.0M parameters, 4.2 GFLOPs (Table 1), 22.2% top-1 (Table 3)."""
    return resnext(50, 32, 4, **kwargs)


def resnext101_32x4d(**kwargs) -> ResNet:
    """ResNeXt-101 (32x4d): 21.2% top-1 (Table 3); 30.0 COCO AP with Faster R-CNN (Table 8)."""
    return resnext(101, 32, 4, **kwargs)


def resnext101_32x8d(**kwargs) -> ResNet:
    """ResNeXt-101 (32x8d): torchvision's ``resnext101_32x8d`` (88.8M parameters)."""
    return resnext(101, 32, 8, **kwargs)


def resnext101_64x4d(**kwargs) -> ResNet:
    """ResNeXt-101 (64x4d): 20.4% / 5.3% top-1 / top-5 at 2x complexity (Table 4)."""
    return resnext(101, 64, 4, **kwargs)


def cifar_resnext29(cardinality: int, width: int, *, name: str | None = None, **kwargs) -> ResNet:
    """ResNeXt-29 for CIFAR (Appendix B): a 3x3 conv with 64 filters, 3 stages of 3 bottlenecks.

    The template is ``[1x1, 64; 3x3, 64; 1x1, 256]`` at 32x32 with the group width ``C * d`` scaled
    by ``width / 64``, widths doubling per stage.
    """
    return build_resnet(
        name or f"cifar_resnext29_{cardinality}x{width}d",
        layers=(3, 3, 3),
        bottleneck=True,
        stem="cifar",
        stem_width=64,
        planes=(64, 128, 256),
        groups=cardinality,
        width_per_group=width,
        **kwargs,
    )


def cifar_resnext29_8x64d(**kwargs) -> ResNet:
    """ResNeXt-29 (8x64d): 34.4M parameters, 3.65% / 17.77% CIFAR-10/100 error (Table 7)."""
    return cifar_resnext29(8, 64, **kwargs)


def cifar_resnext29_16x64d(**kwargs) -> ResNet:
    """ResNeXt-29 (16x64d): 68.1M parameters, 3.58% / 17.31% CIFAR-10/100 error (Table 7)."""
    return cifar_resnext29(16, 64, **kwargs)
