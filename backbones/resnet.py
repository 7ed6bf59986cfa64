"""ResNet (He et al. 2015, arXiv 1512.03385): the network, the v1 and plain ImageNet nets, the CIFAR nets.

:class:`ResNet` is the one network class of the zoo: pre-activation ResNets (``preact.py``) and ResNeXt
(``resnext.py``) are the same class with other arguments, as torchvision builds ResNeXt from its
``ResNet``. The builders below are one line each on top of :func:`build_resnet`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from .base import Backbone, FeatureInfo, NormKind, norm_layer
from .blocks import ResidualUnit, ShortcutKind, SkipKind, UnitKind
from .forms import Form

StemKind = Literal["imagenet", "cifar"]


def _power_of_two(value: int) -> bool:
    return value > 0 and value & (value - 1) == 0


class ResNet(Backbone):
    """A residual (or plain) network built from :class:`~backbones.blocks.ResidualUnit` stages.

    Args:
        layers: units per stage, e.g. ``(3, 4, 6, 3)`` for ResNet-50 (ResNet Table 1) or ``(n, n, n)``
            for the 6n+2-layer CIFAR nets (Sec. 4.2).
        bottleneck: bottleneck units (ResNet-50 and deeper, ResNeXt) instead of basic units.
        stem: ``imagenet`` -- 7x7/2 convolution and 3x3/2 max pool (stride 4); ``cifar`` -- one 3x3
            convolution (stride 1).
        stem_width: channels of the stem (64 on ImageNet and ResNeXt-29, 16 for CIFAR ResNets).
        planes: base width ``w`` of each stage; defaults to 64/128/256/512 (ImageNet) or 16/32/64 (CIFAR).
        num_classes: size of the linear classifier; 0 builds a feature extractor with no classifier.
        in_channels: image channels.
        out_features: stages returned by ``forward_features``; defaults to the deepest stage.
        groups: ResNeXt cardinality ``C``.
        width_per_group: ResNeXt bottleneck width ``d`` (64 for ResNet).
        stride_in_1x1: stride in the bottleneck's first 1x1 (original v1) instead of its 3x3 (v1.5).
        shortcut: ``A``/``B``/``C`` (ResNet Sec. 3.3) or ``none`` for a plain net.
        skip: skip connection of Identity Mappings Table 1 used in every unit.
        skip_param: the skip variant's constant (see ``blocks.SKIP_DEFAULTS``).
        unit: activation placement of Identity Mappings Fig. 4 used in every unit.
        form: ResNeXt block form (Xie et al. Fig. 3).
        shared_first_activation: in pre-activation nets, the first unit's BN+ReLU (right after the
            stand-alone conv1) feeds both of its paths, as Identity Mappings' Appendix says ("we adopt the
            first activation right after conv1 and before splitting into two paths"; fb.resnet.torch's
            ``preresnet.lua`` likewise). ``False``: only its residual path, the identity shortcut carrying
            the raw stem output -- timm's ``resnetv2_*``, for its weights (detected and required when they
            load). Bottleneck nets are the same either way (their first unit projects).
        norm: ``bn``, ``frozen_bn``, ``sync_bn`` or ``gn``.
        output_stride: the largest stride of the deepest map; below the native stride (32 on ImageNet)
            the last stages are dilated instead of strided (16: ``res5``; 8: ``res4`` and ``res5``); a
            power of two at or above it leaves the net as it is (a CIFAR net, native 4, at 8).
        zero_init_residual: start every residual branch at zero (arXiv 1706.02677).
        name: the zoo name, recorded so that weight files can be checked against it.
    """

    _tail_attrs = ("norm_final", "relu_final")

    def __init__(
        self,
        *,
        layers: Sequence[int],
        bottleneck: bool,
        stem: StemKind = "imagenet",
        stem_width: int | None = None,
        planes: Sequence[int] | None = None,
        num_classes: int = 0,
        in_channels: int = 3,
        out_features: Sequence[str] | None = None,
        groups: int = 1,
        width_per_group: int = 64,
        stride_in_1x1: bool = False,
        shortcut: ShortcutKind = "B",
        skip: SkipKind = "identity",
        skip_param: float | None = None,
        unit: UnitKind = "original",
        form: Form = "grouped",
        shared_first_activation: bool = True,
        norm: NormKind = "bn",
        output_stride: int | None = None,
        zero_init_residual: bool = False,
        name: str = "resnet",
    ) -> None:
        super().__init__()
        if stem not in ("imagenet", "cifar"):
            raise ValueError(f"stem={stem!r} is not one of 'imagenet', 'cifar'")
        if num_classes < 0:
            raise ValueError(f"num_classes={num_classes} must be >= 0 (0 builds no classifier)")
        if not layers or any(n < 1 for n in layers):
            raise ValueError(f"layers={tuple(layers)} must list at least one unit per stage")
        imagenet = stem == "imagenet"
        if planes is None:
            planes = (64, 128, 256, 512) if imagenet else (16, 32, 64)
        if len(planes) != len(layers):
            raise ValueError(f"planes={tuple(planes)} and layers={tuple(layers)} must have the same length")
        stem_width = stem_width or (64 if imagenet else 16)
        expansion = 4 if bottleneck else 1

        self.name = name
        self.unit = unit
        self.default_input_size = 224 if imagenet else 32
        stem_stride = 4 if imagenet else 1
        native_stride = stem_stride * 2 ** (len(layers) - 1)
        self.native_stride = native_stride
        # What a weight file must agree with besides the names and shapes of its tensors: two networks
        # of the same name but other options here (stride_in_1x1, above all) compute different functions.
        self.architecture = {
            "layers": list(layers), "bottleneck": bottleneck, "stem": stem, "stem_width": stem_width,
            "planes": list(planes), "in_channels": in_channels, "groups": groups, "width_per_group": width_per_group,
            "stride_in_1x1": stride_in_1x1, "shortcut": shortcut, "skip": skip, "skip_param": skip_param,
            "unit": unit, "form": form, "shared_first_activation": shared_first_activation,
        }  # fmt: skip
        if output_stride is None or (_power_of_two(output_stride) and output_stride >= native_stride):
            output_stride = native_stride  # an upper bound the net already meets: nothing to dilate
        allowed = [stem_stride * 2**i for i in range(len(layers))]
        if output_stride not in allowed or not _power_of_two(output_stride):
            raise ValueError(
                f"output_stride={output_stride} is not possible for {name}: choose one of "
                f"{', '.join(map(str, allowed))} (native {native_stride})"
            )

        # Stem (ResNet Table 1 "conv1"; Sec. 4.2 for CIFAR). Full pre-activation nets leave the stem's
        # BN+ReLU to the first unit, which applies it before splitting (Identity Mappings Appendix).
        if imagenet:
            self.conv1 = nn.Conv2d(in_channels, stem_width, 7, stride=2, padding=3, bias=False)
        else:
            self.conv1 = nn.Conv2d(in_channels, stem_width, 3, stride=1, padding=1, bias=False)
        self.bn1 = norm_layer(norm, stem_width) if unit != "full_preact" else None
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1) if imagenet else None
        self.feature_info = {"stem": FeatureInfo(stem_width, stem_stride)}
        self._stage_layer: dict[str, str] = {}

        channels, stride, dilation = stem_width, stem_stride, 1
        for index, (depth, width) in enumerate(zip(layers, planes)):
            unit_stride = 1 if index == 0 else 2
            previous_dilation = dilation
            if stride * unit_stride > output_stride:  # dilate instead of striding (torchvision convention)
                dilation *= unit_stride
                unit_stride = 1
            units = []
            for i in range(depth):
                units.append(
                    ResidualUnit(
                        in_channels=channels,
                        planes=width,
                        bottleneck=bottleneck,
                        stride=unit_stride if i == 0 else 1,
                        dilation=dilation,
                        first_dilation=previous_dilation if i == 0 else dilation,
                        groups=groups,
                        width_per_group=width_per_group,
                        stride_in_1x1=stride_in_1x1,
                        shortcut=shortcut,
                        skip=skip,
                        skip_param=skip_param,
                        unit=unit,
                        form=form,
                        norm=norm,
                        follows_stem=index == 0 and i == 0 and shared_first_activation,
                    )
                )
                channels = width * expansion
            stride *= unit_stride
            stage = f"res{index + 2}"
            setattr(self, f"layer{index + 1}", nn.Sequential(*units))
            self._stage_layer[stage] = f"layer{index + 1}"
            self.feature_info[stage] = FeatureInfo(channels, stride)

        # Identity Mappings Appendix: the last unit is followed by one extra activation, before pooling.
        self.norm_final = norm_layer(norm, channels) if unit == "full_preact" else None
        self.relu_final = nn.ReLU(inplace=True) if unit in ("full_preact", "relu_preact") else None
        self.num_features = channels
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(channels, num_classes) if num_classes > 0 else None
        self.num_classes = num_classes
        self.select_outputs(out_features)
        self._init_weights()
        if zero_init_residual:
            self.zero_init_residual()

    @torch.no_grad()
    def _init_weights(self) -> None:
        # He et al. 2015 (PReLU paper) initialization, as ResNet Sec. 3.4 and torchvision. Biases (the
        # gates' b_g) keep the values their units gave them.
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, (nn.BatchNorm2d, nn.SyncBatchNorm, nn.GroupNorm)):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    # -- Backbone hooks -------------------------------------------------------------------------
    def _stage_attrs(self) -> dict[str, tuple[str, ...]]:
        stem = ("conv1",) if self.bn1 is None else ("conv1", "bn1")
        return {"stem": stem, **{stage: (layer,) for stage, layer in self._stage_layer.items()}}

    def _run_stage(self, name: str, x: Tensor) -> Tensor:
        if name == "stem":
            x = self.conv1(x)
            if self.bn1 is not None:
                x = self.relu(self.bn1(x))
            return x if self.maxpool is None else self.maxpool(x)
        return getattr(self, self._stage_layer[name])(x)

    def _drop_classifier(self) -> None:
        self.fc = None
        self.num_classes = 0

    def forward(self, x: Tensor) -> Tensor:
        """Logits (``num_classes > 0``) or pooled features of the deepest stage."""
        x = torch.flatten(self.avgpool(self.forward_all(x)), 1)
        return x if self.fc is None else self.fc(x)


def build_resnet(name: str, *, weights: str | None = None, **kwargs) -> ResNet:
    """Build a :class:`ResNet` named ``name`` and load ``weights`` (see :func:`backbones.weights.load_weights`)."""
    model = ResNet(name=name, **kwargs)
    if weights is not None:
        from .weights import load_weights

        load_weights(model, weights)
    return model


# -- ResNet v1 on ImageNet (ResNet Table 1). Defaults: shortcut B (Sec. 3.3), stride in the 3x3 ("v1.5"). --
def resnet18(**kwargs) -> ResNet:
    """ResNet-18, basic units (2, 2, 2, 2); 1.8 GMACs (Table 1). Table 2's 27.88% top-1 (10-crop) is with
    option-A shortcuts (``shortcut="A"``); the paper gives no number for this default, option B."""
    return build_resnet("resnet18", layers=(2, 2, 2, 2), bottleneck=False, **kwargs)


def resnet34(**kwargs) -> ResNet:
    """ResNet-34, basic units (3, 4, 6, 3); 3.6 GMACs (Table 1), 24.52% top-1 with option B (Table 3)."""
    return build_resnet("resnet34", layers=(3, 4, 6, 3), bottleneck=False, **kwargs)


def resnet50(**kwargs) -> ResNet:
    """ResNet-50, bottlenecks (3, 4, 6, 3); 3.8 GMACs with the stride in the 1x1 (Table 1), 22.85% (Table 3)."""
    return build_resnet("resnet50", layers=(3, 4, 6, 3), bottleneck=True, **kwargs)


def resnet101(**kwargs) -> ResNet:
    """ResNet-101, bottlenecks (3, 4, 23, 3); 21.75% top-1 10-crop (Table 3). Table 1's 7.6 GMACs are with
    the stride in the first 1x1 (``stride_in_1x1=True``, the paper's v1); the default v1.5 costs 7.8."""
    return build_resnet("resnet101", layers=(3, 4, 23, 3), bottleneck=True, **kwargs)


def resnet152(**kwargs) -> ResNet:
    """ResNet-152, bottlenecks (3, 8, 36, 3); 21.43% top-1 10-crop (Table 3). Table 1's 11.3 GMACs are with
    the stride in the first 1x1 (``stride_in_1x1=True``); the default v1.5 costs 11.5."""
    return build_resnet("resnet152", layers=(3, 8, 36, 3), bottleneck=True, **kwargs)


def resnet200(**kwargs) -> ResNet:
    """ResNet-200, bottlenecks (3, 24, 36, 3): ResNet-152 plus 16 units at 28x28 (Identity Mappings Table 5)."""
    return build_resnet("resnet200", layers=(3, 24, 36, 3), bottleneck=True, **kwargs)


# -- Plain nets of the degradation experiment (ResNet Sec. 4.1, Fig. 4, Table 2) --------------------
def _plain(kwargs: dict) -> dict:
    if kwargs.setdefault("shortcut", "none") != "none":
        raise ValueError("plain nets have no shortcuts (shortcut='none'); use the resnet builders instead")
    return kwargs


def plain18(**kwargs) -> ResNet:
    """Plain-18: ResNet-18's layers without shortcuts; 27.94% top-1 (Table 2)."""
    return build_resnet("plain18", layers=(2, 2, 2, 2), bottleneck=False, **_plain(kwargs))


def plain34(**kwargs) -> ResNet:
    """Plain-34: ResNet-34's layers without shortcuts; 28.54% top-1, worse than plain-18 (Table 2)."""
    return build_resnet("plain34", layers=(3, 4, 6, 3), bottleneck=False, **_plain(kwargs))


# -- CIFAR nets (ResNet Sec. 4.2, Table 6): 6n+2 layers, 16/32/64 filters, option A shortcuts ------------
def cifar_resnet(depth: int, *, name: str | None = None, **kwargs) -> ResNet:
    """The 6n+2-layer CIFAR ResNet of Sec. 4.2: a 3x3 conv, 3 stages of n basic units, pooling, fc."""
    n, rest = divmod(depth - 2, 6)
    if rest or n < 1:
        raise ValueError(f"CIFAR ResNets have 6n+2 layers (20, 32, 44, 56, 110, 1202, ...), not {depth}")
    kwargs.setdefault("shortcut", "A")
    return build_resnet(name or f"cifar_resnet{depth}", layers=(n, n, n), bottleneck=False, stem="cifar", **kwargs)


def cifar_bottleneck_resnet(depth: int, *, name: str | None = None, **kwargs) -> ResNet:
    """The 9n+2-layer bottleneck CIFAR ResNet of Identity Mappings Sec. 4 (ResNet-164: n=18; 1001: n=111).

    Units ``[1x1, 16; 3x3, 16; 1x1, 64]`` at the first map size, widths doubling; projection shortcuts
    where dimensions grow (Appendix). A unit that downsamples strides its first 1x1, as the authors'
    resnet-pre-act.lua (KaimingHe/resnet-1k-layers) and ResNet's Caffe bottlenecks do (the paper does not
    say); ``stride_in_1x1=False`` moves it to the 3x3.
    """
    n, rest = divmod(depth - 2, 9)
    if rest or n < 1:
        raise ValueError(f"bottleneck CIFAR ResNets have 9n+2 layers (164, 1001, ...), not {depth}")
    kwargs.setdefault("stride_in_1x1", True)
    return build_resnet(name or f"cifar_resnet{depth}", layers=(n, n, n), bottleneck=True, stem="cifar", **kwargs)


def cifar_resnet20(**kwargs) -> ResNet:
    """ResNet-20 (n=3): 0.27M parameters, 8.75% CIFAR-10 error (Table 6)."""
    return cifar_resnet(20, **kwargs)


def cifar_resnet32(**kwargs) -> ResNet:
    """ResNet-32 (n=5): 0.46M parameters, 7.51% (Table 6)."""
    return cifar_resnet(32, **kwargs)


def cifar_resnet44(**kwargs) -> ResNet:
    """ResNet-44 (n=7): 0.66M parameters, 7.17% (Table 6)."""
    return cifar_resnet(44, **kwargs)


def cifar_resnet56(**kwargs) -> ResNet:
    """ResNet-56 (n=9): 0.85M parameters, 6.97% (Table 6)."""
    return cifar_resnet(56, **kwargs)


def cifar_resnet110(**kwargs) -> ResNet:
    """ResNet-110 (n=18): 1.7M parameters, 6.43% best / 6.61% mean (Table 6)."""
    return cifar_resnet(110, **kwargs)


def cifar_resnet1202(**kwargs) -> ResNet:
    """ResNet-1202 (n=200): 19.4M parameters, 7.93%, overfits (Table 6)."""
    return cifar_resnet(1202, **kwargs)


def cifar_resnet164(**kwargs) -> ResNet:
    """ResNet-164 with original units: 1.7M parameters, 5.93% CIFAR-10 (Identity Mappings Table 3)."""
    return cifar_bottleneck_resnet(164, **kwargs)


def cifar_resnet1001(**kwargs) -> ResNet:
    """ResNet-1001 with original units: 10.2M parameters, 7.61% CIFAR-10 (Identity Mappings Table 3)."""
    return cifar_bottleneck_resnet(1001, **kwargs)


def _cifar_plain(depth: int, kwargs: dict) -> ResNet:
    return cifar_resnet(depth, name=f"cifar_plain{depth}", **_plain(kwargs))


def cifar_plain20(**kwargs) -> ResNet:
    """Plain-20: ResNet-20 without shortcuts (Fig. 6 left)."""
    return _cifar_plain(20, kwargs)


def cifar_plain32(**kwargs) -> ResNet:
    """Plain-32 (Fig. 6 left)."""
    return _cifar_plain(32, kwargs)


def cifar_plain44(**kwargs) -> ResNet:
    """Plain-44 (Fig. 6 left)."""
    return _cifar_plain(44, kwargs)


def cifar_plain56(**kwargs) -> ResNet:
    """Plain-56: higher training error than plain-20, the degradation problem (Fig. 6 left)."""
    return _cifar_plain(56, kwargs)


def cifar_plain110(**kwargs) -> ResNet:
    """Plain-110: stays above 60% error (Sec. 4.2, not plotted)."""
    return _cifar_plain(110, kwargs)
