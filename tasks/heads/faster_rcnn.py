"""Faster R-CNN over any zoo backbone, assembled from torchvision's detection components.

Two ways to attach a backbone (``head``):

* ``fpn`` -- every stage after the stem feeds torchvision's ``FeaturePyramidNetwork`` (with the extra
  max-pooled level); RPN and ``MultiScaleRoIAlign`` (7x7) on all levels; the two-layer MLP box head.
  With ``resnet50`` this is torchvision's ``fasterrcnn_resnet50_fpn`` module for module, so its
  weights load unchanged.
* ``c4`` -- the ResNet paper's COCO detector (Appendix A, Table 8): the shared trunk ends at the
  penultimate stage (``res4``, stride 16); RPN and RoIAlign (14x14) run on it; the last stage (``res5``,
  plus the final BN+ReLU of pre-activation nets) runs *per region* as the box head, followed by average
  pooling and the two sibling layers.

Channels and strides come from the backbone's ``feature_info``; nothing is hard-coded for ResNet-50.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.models.detection.rpn import RPNHead
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign, roi_align
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

# MultiScaleRoIAlign's own level setup, private in torchvision (bounded in pyproject): reused so that the scales
# and levels are exactly torchvision's
from torchvision.ops.poolers import _setup_scales

from backbones import Backbone
from datamodules.transforms import IMAGENET_MEAN, IMAGENET_STD

HeadKind = Literal["c4", "fpn"]


def check_pyramid(strides: Sequence[int]) -> None:
    """Levels must be consecutive powers of two (as detectron2's FPN asserts)."""
    for lower, upper in zip(strides, strides[1:]):
        if upper != 2 * lower:
            raise ValueError(
                f"FPN needs stage strides that double from level to level, got {list(strides)}; "
                f"build the backbone without output_stride"
            )


class FPNBackbone(nn.Module):
    """``body`` (a zoo backbone) plus a feature pyramid on all its stages after the stem.

    The attribute names (``body``, ``fpn``) are torchvision's ``BackboneWithFPN``'s.
    """

    def __init__(self, body: Backbone, out_channels: int = 256) -> None:
        super().__init__()
        stages = [name for name in body.stage_names if name != "stem"]
        body.select_outputs(stages)
        check_pyramid([body.feature_info[s].stride for s in stages])
        self.body = body
        self.fpn = FeaturePyramidNetwork(
            [body.feature_info[s].channels for s in stages], out_channels, extra_blocks=LastLevelMaxPool()
        )
        self.out_channels = out_channels
        #: strides of the pyramid levels "0", "1", ... and "pool"
        self.strides = [body.feature_info[s].stride for s in stages] + [2 * body.feature_info[stages[-1]].stride]

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        feats = self.body.forward_features(x)
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(feats.values())))


class C4Backbone(nn.Module):
    """The shared trunk of the C4 detector: the backbone up to its penultimate stage."""

    def __init__(self, body: Backbone) -> None:
        super().__init__()
        self.body = body
        self.stage = body.out_features[-1]
        self.out_channels = body.feature_info[self.stage].channels
        self.stride = body.feature_info[self.stage].stride

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        return OrderedDict([("0", self.body.forward_features(x)[self.stage])])


class RoIAlignPooler(MultiScaleRoIAlign):
    """torchvision's ``MultiScaleRoIAlign`` (its level assignment, Eq. 1 of the FPN paper) with RoIAlign's
    ``aligned`` choice: ``True`` samples at pixel centers (the half-pixel offset detectron2 uses), ``False``
    is torchvision's original RoIAlign (what its published detectors were trained with)."""

    def __init__(self, featmap_names: list[str], output_size: int, sampling_ratio: int, aligned: bool) -> None:
        super().__init__(featmap_names, output_size=output_size, sampling_ratio=sampling_ratio)
        self.aligned = aligned

    def forward(self, x: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]) -> Tensor:
        # torchvision's steps, with sizes read as ``shape[0]`` (not ``len``) so that torch.export can trace
        # the data-dependent number of proposals
        features = [v for k, v in x.items() if k in self.featmap_names]
        if self.scales is None or self.map_levels is None:  # torchvision's own setup: same scales and levels
            self.scales, self.map_levels = _setup_scales(
                features, image_shapes, self.canonical_scale, self.canonical_level
            )
        rois = torch.cat([torch.cat([b.new_full((b.shape[0], 1), i), b], dim=1) for i, b in enumerate(boxes)])
        if len(features) == 1:
            return roi_align(features[0], rois, self.output_size, self.scales[0], self.sampling_ratio, self.aligned)
        levels = self.map_levels(boxes)
        out = features[0].new_zeros((rois.shape[0], features[0].shape[1], *self.output_size))
        for level, (feature, scale) in enumerate(zip(features, self.scales)):
            index = torch.where(levels == level)[0]
            pooled = roi_align(feature, rois[index], self.output_size, scale, self.sampling_ratio, self.aligned)
            out = out.index_put((index,), pooled.to(out.dtype))
        return out


class StageBoxHead(nn.Module):
    """The C4 box head: the backbone's last stage applied to each region, then global average pooling."""

    def __init__(self, stage: nn.Module, out_channels: int) -> None:
        super().__init__()
        self.res5 = stage
        self.out_channels = out_channels

    def forward(self, regions: Tensor) -> Tensor:
        return torch.flatten(F.adaptive_avg_pool2d(per_region(self.res5, regions), 1), 1)


class ContextLayout:
    """What the global-context pooler tells the box head: how many regions each image has (the images'
    whole-image RoIs follow all the regions, one per image)."""

    def __init__(self) -> None:
        self.counts: list[int] = []


class ContextRoIPool(RoIAlignPooler):
    """The C4 pooler with global context (the ResNet paper's COCO entry, Appendix A): after the regions, each
    image's whole (resized) extent as one more RoI -- the paper's single-level spatial pyramid pooling of the
    full feature map, i.e. RoI pooling with the image as the RoI."""

    def __init__(self, layout: ContextLayout, **kwargs) -> None:
        super().__init__(**kwargs)
        self.layout = layout

    def forward(self, x: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]) -> Tensor:
        self.layout.counts = [b.shape[0] for b in boxes]
        whole = [b.new_tensor([[0.0, 0.0, w, h]]) for b, (h, w) in zip(boxes, image_shapes)]
        return torch.cat([super().forward(x, boxes, image_shapes), super().forward(x, whole, image_shapes)])


class ContextBoxHead(StageBoxHead):
    """The C4 box head with global context: res5 and average pooling on the regions and the whole-image RoIs
    alike (the same layers), each region's feature concatenated with its image's global feature before the
    class and box layers (``2 x`` res5's channels), trained end to end (Appendix A)."""

    def __init__(self, stage: nn.Module, out_channels: int, layout: ContextLayout) -> None:
        super().__init__(stage, out_channels)
        self.layout = layout

    def forward(self, regions: Tensor) -> Tensor:
        pooled = super().forward(regions)
        counts = self.layout.counts
        n = sum(counts)
        context = pooled[n:].repeat_interleave(torch.tensor(counts, device=pooled.device), dim=0)
        return torch.cat([pooled[:n], context], dim=1)


def per_region(stage: nn.Module, regions: Tensor) -> Tensor:
    """``stage(regions)``; while ``torch.export`` traces, with one zero region appended and its output dropped,
    so that the batch is never empty: a convolution on a batch of regions whose number may be 0 needs a guard
    the tracer cannot take (the numbers are the same; eager mode, and so training's BN statistics, never see
    the extra region)."""
    if not torch.compiler.is_exporting():
        return stage(regions)
    padded = torch.cat([regions, regions.new_zeros((1, *regions.shape[1:]))])
    return stage(padded)[:-1]


def rcnn_parts(
    body: Backbone,
    *,
    head: HeadKind,
    num_classes: int,
    anchor_sizes: Sequence[int] | None = None,
    fpn_channels: int = 256,
    aligned: bool = False,
    global_context: bool = False,
) -> tuple[nn.Module, dict]:
    """What Faster R-CNN and Mask R-CNN share: ``body`` attached through ``head`` (the detector's ``backbone``)
    and the keyword arguments of torchvision's ``FasterRCNN``/``MaskRCNN`` that build its RPN and box head
    (``num_classes`` or the C4 head's own ``box_head`` and ``box_predictor``, and the C4 head's proposal
    counts). Arguments as :func:`build_faster_rcnn`'s."""
    ratios = (0.5, 1.0, 2.0)
    if global_context and head != "c4":
        raise ValueError(
            f"global_context is the C4 head's (the whole image as one more RoI through res5, Appendix A); "
            f"head={head!r} has no per-region res5 to share: use --model.head c4, or drop --model.global_context"
        )
    if head == "fpn":
        backbone: nn.Module = FPNBackbone(body, fpn_channels)
        sizes = list(anchor_sizes) if anchor_sizes else [8 * s for s in backbone.strides]
        if len(sizes) != len(backbone.strides):
            raise ValueError(
                f"anchor_sizes: the FPN head needs one size per level ({len(backbone.strides)}), got {sizes}"
            )
        return backbone, {
            "num_classes": num_classes,
            "rpn_anchor_generator": AnchorGenerator(tuple((s,) for s in sizes), (ratios,) * len(sizes)),
            "rpn_head": RPNHead(backbone.out_channels, len(ratios)),
            "box_roi_pool": RoIAlignPooler(["0", "1", "2", "3"], output_size=7, sampling_ratio=2, aligned=aligned),
        }
    if head != "c4":
        raise ValueError(f"head={head!r} is not one of 'c4', 'fpn'")
    stages = [name for name in body.stage_names if name != "stem"]
    if len(stages) < 2:
        raise ValueError(f"the C4 head needs at least two stages, {body.name} has {stages}")
    trunk_stage, head_stage = stages[-2], stages[-1]
    head_channels = body.feature_info[head_stage].channels
    if body.feature_info[trunk_stage].stride < 16:  # a CIFAR net: its stages are for 32-px images
        warnings.warn(
            f"the C4 head on {body.name}: the shared trunk ends at {trunk_stage} (stride "
            f"{body.feature_info[trunk_stage].stride}, {body.feature_info[trunk_stage].channels} channels) and "
            f"{head_stage} runs per region; the ResNet paper's C4 detector has a stride-16 trunk (an ImageNet net)",
            stacklevel=3,
        )
    body.select_outputs([trunk_stage])
    res5 = body.truncate(after=trunk_stage)
    backbone = C4Backbone(body)
    sizes = list(anchor_sizes) if anchor_sizes else [backbone.stride * k for k in (2, 4, 8, 16, 32)]
    pool = {"featmap_names": ["0"], "output_size": 14, "sampling_ratio": 0, "aligned": aligned}
    if global_context:
        layout = ContextLayout()
        box_pool, box_head = ContextRoIPool(layout, **pool), ContextBoxHead(res5, head_channels, layout)
    else:
        box_pool, box_head = RoIAlignPooler(**pool), StageBoxHead(res5, head_channels)
    return backbone, {
        "rpn_anchor_generator": AnchorGenerator((tuple(sizes),), (ratios,)),
        "rpn_head": RPNHead(backbone.out_channels, len(sizes) * len(ratios)),
        "box_roi_pool": box_pool,
        "box_head": box_head,
        "box_predictor": FastRCNNPredictor(head_channels * (2 if global_context else 1), num_classes),
        **C4_PROPOSALS,
    }


#: the C4 head's region proposals: detectron2's C4 configs (see :func:`build_faster_rcnn`)
C4_PROPOSALS = {
    "rpn_pre_nms_top_n_train": 12000, "rpn_pre_nms_top_n_test": 6000,
    "rpn_post_nms_top_n_train": 2000, "rpn_post_nms_top_n_test": 1000,
}  # fmt: skip


def build_faster_rcnn(
    body: Backbone,
    *,
    head: HeadKind,
    num_classes: int,
    min_size: int | Sequence[int] = 800,
    max_size: int = 1333,
    anchor_sizes: Sequence[int] | None = None,
    fpn_channels: int = 256,
    image_mean: Sequence[float] = IMAGENET_MEAN,
    image_std: Sequence[float] = IMAGENET_STD,
    aligned: bool = False,
    global_context: bool = False,
    **detector_kwargs,
) -> FasterRCNN:
    """torchvision's ``FasterRCNN`` with ``body`` attached through ``head``.

    Args:
        body: a zoo backbone with its weights loaded and frozen stages frozen (the C4 head takes its
            last stage away).
        head: ``fpn`` or ``c4`` (see the module docstring).
        num_classes: classes including the background (foreground + 1).
        min_size: shorter side after resizing (a list draws one per image during training).
        max_size: cap of the longer side.
        anchor_sizes: anchor sizes in pixels; FPN: one per level (default 8 x the level's stride:
            32 ... 512 on ImageNet nets), C4: all on the one level (default 2, 4, 8, 16, 32 x stride).
        fpn_channels: FPN width.
        image_mean, image_std: normalization applied by the detector's transform to [0, 1] images.
        aligned: RoIAlign with the half-pixel offset (detectron2's ``ROIAlignV2``) instead of torchvision's
            original RoIAlign (its published weights need ``False``).
        global_context: the C4 head with global context (:class:`ContextBoxHead`); refused with FPN.
        detector_kwargs: any other ``FasterRCNN`` argument (``rpn_post_nms_top_n_test``,
            ``box_detections_per_img``, ...). The C4 head's region proposals default to detectron2's C4
            configs: the 12,000 (training) / 6,000 (testing) best-scoring anchors go into NMS, the best
            2,000 / 1,000 after it come out (torchvision's 2,000 / 1,000 before NMS are meant per FPN
            level); the ResNet paper's detector kept 300 at test time (``rpn_post_nms_top_n_test: 300``).
    """
    backbone, parts = rcnn_parts(
        body, head=head, num_classes=num_classes, anchor_sizes=anchor_sizes, fpn_channels=fpn_channels,
        aligned=aligned, global_context=global_context,
    )  # fmt: skip
    return FasterRCNN(
        backbone, min_size=min_size, max_size=max_size, image_mean=list(image_mean), image_std=list(image_std),
        **{**parts, **detector_kwargs},
    )  # fmt: skip
