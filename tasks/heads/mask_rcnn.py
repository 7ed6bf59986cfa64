"""Mask R-CNN over any zoo backbone (He et al. 2017), assembled from torchvision's components on the same
backbone attachments as Faster R-CNN (``tasks.heads.faster_rcnn.rcnn_parts``).

The mask branch, per head (Mask R-CNN, Section 3 and Figure 4):

* ``fpn`` -- torchvision's: ``MultiScaleRoIAlign`` to 14x14 on the pyramid, four 3x3 convolutions of 256
  channels (``MaskRCNNHeads``), a 2x2 deconvolution and a 1x1 convolution per class
  (``MaskRCNNPredictor``): 28x28 masks. With ``resnet50`` this is ``maskrcnn_resnet50_fpn`` module for
  module, so its weights load unchanged.
* ``c4`` -- the paper's ResNet-C4 head (Figure 4, left): the RoIs pooled 14x14 from res4 go through res5 --
  the *same* stage (the same weights) as the box head's -- to 7x7, then a 2x2 deconvolution to 14x14 with 256
  channels, ReLU, and a 1x1 convolution per class (torchvision's ``MaskRCNNPredictor`` on res5's channels):
  14x14 masks. (torchvision's ``RoIHeads`` pools the mask
  branch's regions itself: during training the positive proposals, as the paper's head reads them from the
  box branch's res5; at test time the detected boxes, as the paper does.)

The mask loss is torchvision's ``maskrcnn_loss`` (per-pixel sigmoid cross-entropy on the ground-truth class's
mask, the paper's L_mask); masks are pasted into the image at its size by torchvision's post-processing.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor

from backbones import Backbone
from datamodules.transforms import IMAGENET_MEAN, IMAGENET_STD

from .faster_rcnn import HeadKind, RoIAlignPooler, per_region, rcnn_parts


class StageMaskHead(nn.Module):
    """The C4 mask head's trunk: the box head's last stage (shared, not a copy) on the mask branch's RoIs."""

    def __init__(self, stage: nn.Module) -> None:
        super().__init__()
        self.res5 = stage

    def forward(self, regions: Tensor) -> Tensor:
        return per_region(self.res5, regions)


def build_mask_rcnn(
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
    mask_channels: int = 256,
    global_context: bool = False,
    **detector_kwargs,
) -> MaskRCNN:
    """torchvision's ``MaskRCNN`` with ``body`` attached through ``head`` and the head's mask branch (see the
    module docstring). Arguments as ``tasks.heads.faster_rcnn.build_faster_rcnn``'s, and ``mask_channels``:
    the width of the mask branch's convolutions and deconvolution (the paper's 256; a narrower one trains
    small images on a CPU much faster); ``global_context``: the C4 box head's (the mask branch reads the
    regions only). ``detector_kwargs`` are any other ``MaskRCNN`` argument."""
    backbone, parts = rcnn_parts(
        body, head=head, num_classes=num_classes, anchor_sizes=anchor_sizes, fpn_channels=fpn_channels,
        aligned=aligned, global_context=global_context,
    )  # fmt: skip
    if head == "fpn":  # what MaskRCNN builds itself: MaskRCNNHeads(256, (256,) * 4, 1), MaskRCNNPredictor(256, 256, K)
        levels = ["0", "1", "2", "3"]
        parts["mask_roi_pool"] = RoIAlignPooler(levels, output_size=14, sampling_ratio=2, aligned=aligned)
        if mask_channels != 256:  # then MaskRCNN takes its predictors given, the box head's as FasterRCNN builds it
            parts["box_predictor"] = FastRCNNPredictor(1024, parts.pop("num_classes"))
            parts["mask_head"] = MaskRCNNHeads(backbone.out_channels, [mask_channels] * 4, 1)
            parts["mask_predictor"] = MaskRCNNPredictor(mask_channels, mask_channels, num_classes)
    else:
        res5 = parts["box_head"].res5
        parts["mask_roi_pool"] = RoIAlignPooler(["0"], output_size=14, sampling_ratio=0, aligned=aligned)
        parts["mask_head"] = StageMaskHead(res5)
        parts["mask_predictor"] = MaskRCNNPredictor(parts["box_head"].out_channels, mask_channels, num_classes)
    return MaskRCNN(
        backbone, min_size=min_size, max_size=max_size, image_mean=list(image_mean), image_std=list(image_std),
        **{**parts, **detector_kwargs},
    )  # fmt: skip
