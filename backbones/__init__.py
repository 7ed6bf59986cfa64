"""The residual backbone zoo: ResNet v1 and plain nets, pre-activation ResNet v2, ResNeXt.

    >>> from backbones import build_backbone, list_backbones
    >>> net = build_backbone("resnext101_32x8d", num_classes=1000)
    >>> feats = build_backbone("preact_resnet50", out_features=("res3", "res4", "res5"),
    ...                        norm="frozen_bn", output_stride=16).forward_features(x)

``BACKBONES`` is a plain dict from zoo name to builder; every builder takes the options of
:class:`backbones.resnet.ResNet` as keyword arguments (``num_classes``, ``norm``, ``output_stride``,
``shortcut``, ``skip``, ``unit``, ``form``, ``weights``, ...).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Literal

from . import preact, resnet, resnext
from .base import Backbone, FeatureInfo
from .resnet import ResNet
from .weights import WeightsError, load_weights

BACKBONES: dict[str, Callable[..., ResNet]] = {
    # ResNet v1, ImageNet (ResNet Table 1) and its plain twins (Sec. 4.1)
    "resnet18": resnet.resnet18,
    "resnet34": resnet.resnet34,
    "resnet50": resnet.resnet50,
    "resnet101": resnet.resnet101,
    "resnet152": resnet.resnet152,
    "resnet200": resnet.resnet200,
    "plain18": resnet.plain18,
    "plain34": resnet.plain34,
    # CIFAR (ResNet Sec. 4.2; Identity Mappings Table 3)
    "cifar_resnet20": resnet.cifar_resnet20,
    "cifar_resnet32": resnet.cifar_resnet32,
    "cifar_resnet44": resnet.cifar_resnet44,
    "cifar_resnet56": resnet.cifar_resnet56,
    "cifar_resnet110": resnet.cifar_resnet110,
    "cifar_resnet164": resnet.cifar_resnet164,
    "cifar_resnet1001": resnet.cifar_resnet1001,
    "cifar_resnet1202": resnet.cifar_resnet1202,
    "cifar_plain20": resnet.cifar_plain20,
    "cifar_plain32": resnet.cifar_plain32,
    "cifar_plain44": resnet.cifar_plain44,
    "cifar_plain56": resnet.cifar_plain56,
    "cifar_plain110": resnet.cifar_plain110,
    # Pre-activation ResNet v2 (Identity Mappings)
    "preact_resnet18": preact.preact_resnet18,
    "preact_resnet34": preact.preact_resnet34,
    "preact_resnet50": preact.preact_resnet50,
    "preact_resnet101": preact.preact_resnet101,
    "preact_resnet152": preact.preact_resnet152,
    "preact_resnet200": preact.preact_resnet200,
    "cifar_preact_resnet110": preact.cifar_preact_resnet110,
    "cifar_preact_resnet164": preact.cifar_preact_resnet164,
    "cifar_preact_resnet1001": preact.cifar_preact_resnet1001,
    # ResNeXt (Aggregated Residual Transformations)
    "resnext50_32x4d": resnext.resnext50_32x4d,
    "resnext101_32x4d": resnext.resnext101_32x4d,
    "resnext101_32x8d": resnext.resnext101_32x8d,
    "resnext101_64x4d": resnext.resnext101_64x4d,
    "cifar_resnext29_8x64d": resnext.cifar_resnext29_8x64d,
    "cifar_resnext29_16x64d": resnext.cifar_resnext29_16x64d,
}


#: The zoo names as a type: task arguments typed with it are checked by LightningCLI when parsing, and
#: ``--help`` lists the valid names.
BackboneName = Literal[tuple(BACKBONES)]  # type: ignore[valid-type]


def list_backbones() -> list[str]:
    """Every registered zoo name, in the order of ``BACKBONES``."""
    return list(BACKBONES)


def check_backbone_name(name: str) -> None:
    """Raise ``ValueError`` naming the closest valid names when ``name`` is not in the zoo."""
    if name in BACKBONES:
        return
    close = difflib.get_close_matches(name, BACKBONES, n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise ValueError(f"unknown backbone {name!r}.{hint} Valid names: {', '.join(BACKBONES)}")


def build_backbone(name: str, **kwargs) -> ResNet:
    """Build the zoo network ``name`` with the given options (see :class:`backbones.resnet.ResNet`)."""
    check_backbone_name(name)
    return BACKBONES[name](**kwargs)


__all__ = [
    "BACKBONES",
    "Backbone",
    "BackboneName",
    "FeatureInfo",
    "ResNet",
    "WeightsError",
    "build_backbone",
    "check_backbone_name",
    "list_backbones",
    "load_weights",
]
