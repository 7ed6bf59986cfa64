"""Fully convolutional segmentation heads over any zoo backbone (Long, Shelhamer & Darrell 2015).

* ``dilated`` -- the backbone runs at output stride 8 (``res4`` and ``res5`` dilated instead of
  strided), an FCN head (3x3 conv to C/4 channels, BN, ReLU, dropout 0.1, 1x1 classifier) on the last
  stage, bilinear upsampling to the input size, and an auxiliary head on the penultimate stage (loss
  weight 0.5 in the task). With ``resnet50``/``resnet101`` this is torchvision's ``fcn_resnet50/101``
  module for module (``backbone``, ``classifier``, ``aux_classifier``), so its weights load unchanged.
* ``skip`` -- FCN-8s's idea on a stride-32 backbone: class scores from the last three stages fused
  coarse to fine by upsample-and-add (the finer scores start at zero, so training starts as FCN-32s,
  as in the paper), then upsampled to the input; cheaper in memory than dilation.

Channels come from ``feature_info``: no width is hard-coded, so ResNet-18/34 and CIFAR nets work too.
"""

from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.segmentation.fcn import FCNHead

from backbones import Backbone

SegHeadKind = Literal["dilated", "skip"]


def fcn_head(in_channels: int, num_classes: int, dropout: float = 0.1) -> nn.Sequential:
    """torchvision's ``FCNHead`` (3x3 conv to ``in_channels // 4``, BN, ReLU, dropout, 1x1 classifier; its
    layer names, so torchvision's FCN weights load), with the dropout probability ``dropout`` (torchvision's is
    0.1)."""
    head = FCNHead(in_channels, num_classes)
    head[3].p = dropout
    return head


class DilatedFCN(nn.Module):
    """FCN on a dilated backbone with an auxiliary head; returns ``{"out", "aux"}`` logits at input size."""

    def __init__(self, backbone: Backbone, num_classes: int, aux: bool = True, dropout: float = 0.1) -> None:
        super().__init__()
        stages = [s for s in backbone.stage_names if s != "stem"]
        self.out_stage, self.aux_stage = stages[-1], stages[-2]
        backbone.select_outputs([self.aux_stage, self.out_stage] if aux else [self.out_stage])
        self.backbone = backbone
        self.classifier = fcn_head(backbone.feature_info[self.out_stage].channels, num_classes, dropout)
        self.aux_classifier = (
            fcn_head(backbone.feature_info[self.aux_stage].channels, num_classes, dropout) if aux else None
        )

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        size = x.shape[-2:]
        feats = self.backbone.forward_features(x)
        out = {
            "out": F.interpolate(
                self.classifier(feats[self.out_stage]), size=size, mode="bilinear", align_corners=False
            )
        }
        if self.aux_classifier is not None:
            aux = self.aux_classifier(feats[self.aux_stage])
            out["aux"] = F.interpolate(aux, size=size, mode="bilinear", align_corners=False)
        return out


class SkipFCN(nn.Module):
    """FCN-8s-style fusion of the last three stages' class scores (FCN paper, Sec. 4.2)."""

    def __init__(self, backbone: Backbone, num_classes: int, dropout: float = 0.1) -> None:
        super().__init__()
        stages = [s for s in backbone.stage_names if s != "stem"][-3:]
        if len(stages) < 3:
            raise ValueError(f"the skip head fuses three stages; {backbone.name} has {stages}")
        backbone.select_outputs(stages)
        self.stages = stages
        self.backbone = backbone
        fine, mid, coarse = (backbone.feature_info[s].channels for s in stages)
        self.classifier = fcn_head(coarse, num_classes, dropout)
        self.score_mid = nn.Conv2d(mid, num_classes, 1)
        self.score_fine = nn.Conv2d(fine, num_classes, 1)
        for layer in (self.score_mid, self.score_fine):  # start as FCN-32s
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        size = x.shape[-2:]
        feats = self.backbone.forward_features(x)
        fine, mid, coarse = (feats[s] for s in self.stages)
        score = self.classifier(coarse)
        score = F.interpolate(score, size=mid.shape[-2:], mode="bilinear", align_corners=False) + self.score_mid(mid)
        score = F.interpolate(score, size=fine.shape[-2:], mode="bilinear", align_corners=False) + self.score_fine(fine)
        return {"out": F.interpolate(score, size=size, mode="bilinear", align_corners=False)}
