"""Residual units: basic and bottleneck, every activation placement and skip connection the papers study.

One class, :class:`ResidualUnit`, covers

* the **basic** unit ``[3x3, w; 3x3, w]`` and the **bottleneck** ``[1x1, w; 3x3, w; 1x1, 4w]``
  (ResNet paper Fig. 5), with ResNeXt's grouped 3x3 (``groups``/``width_per_group``, Xie et al. Table 1)
  and the stride in the first 1x1 (``stride_in_1x1=True``, the original v1) or in the 3x3 (torchvision's
  "v1.5");
* the **shortcut options** of the ResNet paper, Sec. 3.3: ``A`` identity with zero-padded extra channels
  (parameter free), ``B`` projection only where dimensions change, ``C`` projection everywhere, and
  ``none`` for the plain nets of the degradation experiment (Sec. 4.1);
* the **skip connections** of Identity Mappings, Fig. 2 / Table 1 (``skip=``);
* the **activation placements** of Identity Mappings, Fig. 4 / Table 2 (``unit=``).

Parameter names follow torchvision (``conv1, bn1, ..., downsample.0``), so torchvision's ResNet and
ResNeXt weights load without conversion. ``bn<i>`` is always the normalization paired with ``conv<i>``:
after it in post-activation units, before it in full pre-activation units.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import NormKind, norm_layer
from .forms import Form, transform_convs

ShortcutKind = Literal["A", "B", "C", "none"]
SHORTCUTS: tuple[str, ...] = ("A", "B", "C", "none")

SkipKind = Literal["identity", "scale", "scale_both", "exclusive_gate", "shortcut_gate", "conv", "dropout"]
SKIPS: tuple[str, ...] = ("identity", "scale", "scale_both", "exclusive_gate", "shortcut_gate", "conv", "dropout")
#: Default ``skip_param`` per skip kind: lambda = 0.5 for scaling, gate bias init b_g = -6 (the best of
#: Table 1's search), dropout ratio 0.5.
SKIP_DEFAULTS: dict[str, float] = {
    "scale": 0.5,
    "scale_both": 0.5,
    "exclusive_gate": -6.0,
    "shortcut_gate": -6.0,
    "dropout": 0.5,
}

UnitKind = Literal["original", "bn_after_add", "relu_before_add", "relu_preact", "full_preact"]
UNITS: tuple[str, ...] = ("original", "bn_after_add", "relu_before_add", "relu_preact", "full_preact")
#: Units whose residual function starts with an activation shared with a projection shortcut.
PREACT_UNITS: tuple[str, ...] = ("relu_preact", "full_preact")


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not one of {', '.join(map(repr, allowed))}")


class ZeroPadShortcut(nn.Module):
    """Option A (ResNet Sec. 3.3): identity, subsampled by ``stride``, with zero channels appended.

    Parameter free; used by the CIFAR nets (Sec. 4.2), where plain and residual twins therefore have the
    same number of parameters.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        if out_channels < in_channels:
            raise ValueError(f"option A cannot reduce channels ({in_channels} -> {out_channels})")
        self.extra = out_channels - in_channels
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, 0, self.extra)) if self.extra else x

    def extra_repr(self) -> str:
        return f"extra_channels={self.extra}, stride={self.stride}"


class ShortcutDropout(nn.Module):
    """Dropout on the shortcut (Identity Mappings Fig. 2f): ``h(x) = m * x``, ``m ~ Bernoulli(1 - p)``.

    As in the paper's analysis the mask is *not* rescaled, so the shortcut carries a scale with
    expectation ``1 - p`` (0.5); in evaluation the expectation is used.
    """

    def __init__(self, p: float) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout shortcut ratio must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        keep = 1.0 - self.p
        if self.training:
            return x * torch.bernoulli(torch.full_like(x, keep))
        return x * keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


class ResidualUnit(nn.Module):
    """One residual unit ``x_{l+1} = f(h(x_l) + F(x_l))`` in any of the papers' variants.

    Args:
        in_channels: channels of the unit's input.
        planes: the stage's base width ``w`` (64/128/256/512 on ImageNet, 16/32/64 on CIFAR); the unit
            outputs ``w`` channels (basic) or ``4w`` (bottleneck).
        bottleneck: three-layer bottleneck instead of the two-layer basic unit.
        stride: spatial stride of the unit (2 in the first unit of ``res3``..``res5``).
        dilation: dilation of the 3x3 convolutions (``output_stride`` < 32).
        first_dilation: dilation of the first 3x3 when it replaces a stride (torchvision's convention:
            the first unit of a dilated stage keeps the previous dilation). Defaults to ``dilation``.
        groups: ResNeXt cardinality ``C`` (bottleneck only).
        width_per_group: ResNeXt bottleneck width ``d`` per group at ``planes=64``.
        stride_in_1x1: put the stride in the first 1x1 (original ResNet, Caffe models) instead of the 3x3.
        shortcut: ``A``, ``B``, ``C`` or ``none`` (plain unit).
        skip: skip connection of Identity Mappings Table 1, see ``SKIPS``.
        skip_param: lambda for ``scale``/``scale_both``, the gate bias init ``b_g`` for the gates, the
            ratio for ``dropout``; ``None`` uses the paper's values (``SKIP_DEFAULTS``).
        unit: activation placement of Identity Mappings Fig. 4, see ``UNITS``.
        form: ResNeXt block form (Fig. 3): ``grouped``, ``split`` or ``concat``.
        norm: normalization layer kind.
        follows_stem: the net's first unit, right after the stand-alone conv1: in pre-activation units
            its shortcut reads the pre-activated input even when it is an identity (Identity Mappings,
            Appendix).
    """

    def __init__(
        self,
        *,
        in_channels: int,
        planes: int,
        bottleneck: bool,
        stride: int = 1,
        dilation: int = 1,
        first_dilation: int | None = None,
        groups: int = 1,
        width_per_group: int = 64,
        stride_in_1x1: bool = False,
        shortcut: ShortcutKind = "B",
        skip: SkipKind = "identity",
        skip_param: float | None = None,
        unit: UnitKind = "original",
        form: Form = "grouped",
        norm: NormKind = "bn",
        follows_stem: bool = False,
    ) -> None:
        super().__init__()
        _choice("shortcut", shortcut, SHORTCUTS)
        _choice("skip", skip, SKIPS)
        _choice("unit", unit, UNITS)
        if shortcut == "none" and skip != "identity":
            raise ValueError(f"skip={skip!r} needs a shortcut; a plain unit (shortcut='none') has none")
        first_dilation = dilation if first_dilation is None else first_dilation
        self.unit = unit
        self.skip = skip
        self.bottleneck = bottleneck
        self.out_channels = planes * (4 if bottleneck else 1)
        out_channels = self.out_channels

        if bottleneck:
            width = int(planes * (width_per_group / 64.0)) * groups
            self.conv1, self.conv2, self.conv3 = transform_convs(
                form=form,
                in_channels=in_channels,
                width=width,
                out_channels=out_channels,
                groups=groups,
                stride1=stride if stride_in_1x1 else 1,
                stride3=1 if stride_in_1x1 else stride,
                dilation=first_dilation,
            )
            conv_channels = [(in_channels, width), (width, width), (width, out_channels)]
        else:
            if groups != 1 or width_per_group != 64:
                raise ValueError("the basic unit has no groups: use a bottleneck net for ResNeXt")
            self.conv1 = nn.Conv2d(
                in_channels, planes, 3, stride=stride, padding=first_dilation, dilation=first_dilation, bias=False
            )
            self.conv2 = nn.Conv2d(planes, planes, 3, padding=dilation, dilation=dilation, bias=False)
            conv_channels = [(in_channels, planes), (planes, planes)]
        # bn<i> normalizes conv<i>'s input in full pre-activation units, its output otherwise.
        for i, (c_in, c_out) in enumerate(conv_channels, start=1):
            setattr(self, f"bn{i}", norm_layer(norm, c_in if unit == "full_preact" else c_out))
        self.relu = nn.ReLU(inplace=True)

        # The shortcut h(x). It is named `downsample` as in torchvision.
        self.has_shortcut = shortcut != "none"
        dims_change = stride != 1 or in_channels != out_channels
        project = self.has_shortcut and (shortcut == "C" or skip == "conv" or (shortcut == "B" and dims_change))
        self.downsample: nn.Module | None = None
        if project:
            layers: list[nn.Module] = [nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)]
            if unit != "full_preact":  # a pre-activated projection is followed by the next unit's BN
                layers.append(norm_layer(norm, out_channels))
            self.downsample = nn.Sequential(*layers)
        elif self.has_shortcut and shortcut == "A" and dims_change:
            self.downsample = ZeroPadShortcut(in_channels, out_channels, stride)
        # Identity Mappings, Appendix: the first unit, after the stand-alone conv1, adopts "the first
        # activation right after conv1 and before splitting into two paths", and projection shortcuts
        # are "also with pre-activation". The authors' resnet-pre-act.lua applies one common BN-ReLU to
        # both paths of every unit that increases dimensions, so a zero-padded (option A) shortcut reads
        # the pre-activated input there too (the paper names only projections).
        self.shortcut_reads_preact = (
            self.has_shortcut and unit in PREACT_UNITS and (project or dims_change or follows_stem)
        )

        self.skip_param = SKIP_DEFAULTS.get(skip) if skip_param is None else float(skip_param)
        if skip in ("exclusive_gate", "shortcut_gate"):
            # g(x) = sigmoid(W_g x + b_g), a 1x1 convolution (Identity Mappings Sec. 3.1).
            self.gate = nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=True)
            nn.init.constant_(self.gate.bias, self.skip_param)  # b_g: -6 was best in Table 1
        if skip == "dropout":
            self.skip_dropout = ShortcutDropout(self.skip_param)

    # -- helpers --------------------------------------------------------------------------------
    def _layers(self) -> list[tuple[nn.Module, nn.Module]]:
        if self.bottleneck:
            return [(self.conv1, self.bn1), (self.conv2, self.bn2), (self.conv3, self.bn3)]
        return [(self.conv1, self.bn1), (self.conv2, self.bn2)]

    def _shortcut(self, x: Tensor) -> Tensor:
        return x if self.downsample is None else self.downsample(x)

    #: set by diagnostics (``studies.gradient_flow``): called with (unit, shortcut, residual) before merging
    probe = None

    def _merge(self, h: Tensor, f: Tensor, x: Tensor, inplace: bool = True) -> Tensor:
        """Combine shortcut ``h`` and residual ``f`` as the skip variant says (Identity Mappings Table 1)."""
        if self.probe is not None:
            self.probe(self, h, f)
        skip = self.skip
        if skip in ("identity", "conv"):
            if inplace:
                f += h
                return f
            return f + h
        if skip == "scale":  # lambda * h(x) + F(x)
            return self.skip_param * h + f
        if skip == "scale_both":  # lambda * h(x) + (1 - lambda) F(x), "frozen gating"
            return self.skip_param * h + (1.0 - self.skip_param) * f
        if skip == "dropout":
            return self.skip_dropout(h) + f
        g = torch.sigmoid(self.gate(x))
        if skip == "exclusive_gate":  # (1 - g) h(x) + g F(x)
            return (1.0 - g) * h + g * f
        return (1.0 - g) * h + f  # shortcut_gate

    # -- forward, one equation per placement (Identity Mappings Fig. 4) -------------------------
    def forward(self, x: Tensor) -> Tensor:
        layers = self._layers()
        last = len(layers) - 1
        unit = self.unit

        if unit == "original":  # (a) x_{l+1} = ReLU(h(x) + BN(conv(... ReLU(BN(conv(x))))))
            f = x
            for i, (conv, bn) in enumerate(layers):
                f = bn(conv(f))
                if i < last:
                    f = self.relu(f)
            if self.has_shortcut:
                f = self._merge(self._shortcut(x), f, x)
            return self.relu(f)

        if unit == "bn_after_add":  # (b) x_{l+1} = ReLU(BN(h(x) + conv(... ReLU(BN(conv(x))))))
            f = x
            for i, (conv, bn) in enumerate(layers):
                f = conv(f)
                if i < last:
                    f = self.relu(bn(f))
            if self.has_shortcut:
                f = self._merge(self._shortcut(x), f, x)
            return self.relu(layers[last][1](f))

        if unit == "relu_before_add":  # (c) x_{l+1} = h(x) + ReLU(BN(conv(... ReLU(BN(conv(x))))))
            f = x
            for conv, bn in layers:
                f = self.relu(bn(conv(f)))
            # F ends with a ReLU, whose output autograd keeps: add out of place.
            return self._merge(self._shortcut(x), f, x, inplace=False) if self.has_shortcut else f

        if unit == "relu_preact":  # (d) x_{l+1} = h(x) + BN(conv(ReLU(... BN(conv(ReLU(x))))))
            a = F.relu(x)
            f = a
            for i, (conv, bn) in enumerate(layers):
                f = bn(conv(f))
                if i < last:
                    f = self.relu(f)
        else:  # (e) full pre-activation: x_{l+1} = h(x) + conv(ReLU(BN(... conv(ReLU(BN(x))))))
            a = self.relu(self.bn1(x))
            f = a
            for i, (conv, bn) in enumerate(layers):
                if i > 0:
                    f = self.relu(bn(f))
                f = conv(f)
        if not self.has_shortcut:
            return f
        h = self._shortcut(a if self.shortcut_reads_preact else x)
        return self._merge(h, f, x)

    @torch.no_grad()
    def zero_init_last(self) -> None:
        """Start the residual branch at zero so the unit is an identity map (arXiv 1706.02677 §5.1).

        Zeroes the last BN's scale; in full pre-activation units, which end with a convolution, that
        convolution's weight (as timm does). A ``bn_after_add`` unit's last BN sits after the addition,
        where zeroing it would cut the shortcut too, so it is left as it is.
        """
        if self.unit == "bn_after_add":
            return
        if self.unit == "full_preact":
            last_conv = self.conv3 if self.bottleneck else self.conv2
            last_conv.weight.zero_()
            return
        last_bn = self.bn3 if self.bottleneck else self.bn2
        if getattr(last_bn, "weight", None) is not None:
            last_bn.weight.zero_()

    def extra_repr(self) -> str:
        return f"unit={self.unit}, skip={self.skip}, shortcut={'yes' if self.has_shortcut else 'none'}"
