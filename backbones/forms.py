"""The three equivalent forms of a ResNeXt block (Xie et al. 2017, Fig. 3).

A ResNeXt bottleneck aggregates ``C`` transformations ``T_i`` of the same topology (Eq. 3):
``y = x + sum_i T_i(x)``, each ``T_i`` being ``1x1, d -> 3x3, d -> 1x1, 256``. The paper shows three
implementations compute the same function:

* ``split`` (Fig. 3a): ``C`` explicit paths, every layer computed per path, outputs summed;
* ``concat`` (Fig. 3b): the first two layers per path, their outputs concatenated, one 1x1 layer;
* ``grouped`` (Fig. 3c): one 1x1, one grouped 3x3 (``groups=C``), one 1x1 -- the fast default.

:class:`PathwiseConv2d` computes a layer path by path. It stores its kernel in exactly the layout of the
grouped form's layer, so weights move between the three forms (and torchvision's ResNeXt weights load
into any of them) without conversion; only the computation differs. BatchNorm and ReLU between layers
act per channel, so applying them to the paths' outputs side by side is applying them per path.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Form = Literal["grouped", "split", "concat"]
FORMS: tuple[str, ...] = ("grouped", "split", "concat")
PathMode = Literal["broadcast", "split", "sum"]


class PathwiseConv2d(nn.Conv2d):
    """A convolution evaluated separately for each of ``paths`` paths.

    Args:
        in_channels: input channels (all paths together).
        out_channels: output channels (all paths together, or of the sum for ``mode="sum"``).
        kernel_size: kernel size.
        paths: the cardinality ``C``.
        mode: ``broadcast`` -- every path reads the whole input and writes its own slice of the output
            (a block's first layer); ``split`` -- path ``i`` reads input slice ``i`` and writes output
            slice ``i`` (the 3x3 layer); ``sum`` -- path ``i`` reads input slice ``i`` and the paths'
            outputs are summed (the last layer of Fig. 3a, the aggregation of Eq. 2).
        stride, padding, dilation: as for ``nn.Conv2d``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        *,
        paths: int,
        mode: PathMode,
        stride: int = 1,
        padding: int = 0,
        dilation: int = 1,
    ) -> None:
        super().__init__(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=paths if mode == "split" else 1,
            bias=False,
        )
        split_dim_size = out_channels if mode != "sum" else in_channels
        if split_dim_size % paths:
            raise ValueError(f"{split_dim_size} channels cannot be split into {paths} paths")
        self.paths = paths
        self.mode = mode

    def _conv(self, x: Tensor, weight: Tensor) -> Tensor:
        return F.conv2d(x, weight, None, self.stride, self.padding, self.dilation)

    def forward(self, x: Tensor) -> Tensor:
        if self.mode == "broadcast":
            # out = [T_1 layer(x), ..., T_C layer(x)]: each path's kernel rows, applied to all of x.
            return torch.cat([self._conv(x, w) for w in self.weight.chunk(self.paths, dim=0)], dim=1)
        inputs = x.chunk(self.paths, dim=1)
        if self.mode == "split":
            weights = self.weight.chunk(self.paths, dim=0)
            return torch.cat([self._conv(xi, wi) for xi, wi in zip(inputs, weights)], dim=1)
        # mode == "sum": the aggregation sum_i T_i(x) of Eq. (2), each T_i's last layer on its own path.
        weights = self.weight.chunk(self.paths, dim=1)
        out = self._conv(inputs[0], weights[0])
        for xi, wi in zip(inputs[1:], weights[1:]):
            out = out + self._conv(xi, wi)
        return out

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, paths={self.paths}, mode={self.mode}"


def transform_convs(
    *,
    form: Form,
    in_channels: int,
    width: int,
    out_channels: int,
    groups: int,
    stride1: int,
    stride3: int,
    dilation: int,
) -> tuple[nn.Conv2d, nn.Conv2d, nn.Conv2d]:
    """The three convolutions of a bottleneck (1x1, 3x3, 1x1) in the requested form.

    ``width`` is the total bottleneck width ``C * d``; ``stride1``/``stride3`` place the stride in the
    first 1x1 (original ResNet) or in the 3x3 ("v1.5", ResNeXt).
    """
    if form not in FORMS:
        raise ValueError(f"form={form!r} is not one of {', '.join(FORMS)}")
    if form == "grouped":
        conv1 = nn.Conv2d(in_channels, width, 1, stride=stride1, bias=False)
        conv2 = nn.Conv2d(
            width, width, 3, stride=stride3, padding=dilation, dilation=dilation, groups=groups, bias=False
        )
        conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        return conv1, conv2, conv3
    conv1 = PathwiseConv2d(in_channels, width, 1, paths=groups, mode="broadcast", stride=stride1)
    conv2 = PathwiseConv2d(
        width, width, 3, paths=groups, mode="split", stride=stride3, padding=dilation, dilation=dilation
    )
    if form == "split":
        conv3: nn.Conv2d = PathwiseConv2d(width, out_channels, 1, paths=groups, mode="sum")
    else:  # concat: the paths' outputs are concatenated and one 1x1 layer reads them all
        conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
    return conv1, conv2, conv3
