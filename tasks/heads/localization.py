"""Localization networks over any zoo backbone: a classifier plus a box for every class (ResNet, Appendix C).

The backbone keeps its own classifier (global average pooling and ``fc``: a ``tasks.classify``
checkpoint loads into it whole). The box heads are "per-class regression" (PCR): a box for each class,
so the box of whichever class is predicted can be read out.

* ``rpn`` -- the paper's: "an RPN designed in a per-class form", a 3x3 convolution on the last stage's
  map, then two sibling 1x1 convolutions, one scoring each of ``k`` anchors per position for each class
  (binary logistic regression) and one regressing each anchor's box for each class. The box of class
  ``c`` is the regressed box of the anchor class ``c`` scores highest.
* ``regression`` -- the simpler per-class regression from pooled features (as VGG's localization did):
  one linear layer giving each class's box (center and size relative to the input, through a sigmoid).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# torchvision keeps its RPN's box coder, matcher and sampler in a private module, with no public alias (its minor
# version is bounded in pyproject)
from torchvision.models.detection._utils import BalancedPositiveNegativeSampler, BoxCoder, Matcher
from torchvision.ops import box_iou

from backbones import Backbone

LocHead = Literal["rpn", "regression", "rpn_rcnn"]


def grid_anchors(
    height: int, width: int, stride: int, sizes: tuple[int, ...], ratios: tuple[float, ...], device
) -> Tensor:
    """``(height * width * k) x 4`` anchors centered on each position of a ``height x width`` map."""
    base = []
    for size in sizes:
        for ratio in ratios:
            w, h = size / ratio**0.5, size * ratio**0.5
            base.append([-w / 2, -h / 2, w / 2, h / 2])
    base = torch.tensor(base, device=device)
    ys = (torch.arange(height, device=device) + 0.5) * stride
    xs = (torch.arange(width, device=device) + 0.5) * stride
    cy, cx = torch.meshgrid(ys, xs, indexing="ij")
    centers = torch.stack([cx, cy, cx, cy], dim=-1).reshape(-1, 1, 4)
    return (centers + base[None]).reshape(-1, 4)


class Localizer(nn.Module):
    """A zoo backbone with its classifier and a per-class box head (see the module docstring).

    Args:
        backbone: built with ``num_classes`` (its ``fc`` is the classifier).
        head: ``rpn`` or ``regression``.
        anchor_sizes, anchor_ratios: the RPN head's ``k`` anchors per position, in input pixels; ``None``
            (the default) sizes them to the input: a quarter, a half and the whole of its shorter side
            (56, 112 and 224 pixels on ImageNet's 224-pixel crops), so any image size has anchors that fit.
        rpn_channels: width of the RPN head's 3x3 convolution.
    """

    #: anchor sizes as fractions of the input's shorter side, when none are given
    RELATIVE_SIZES = (0.25, 0.5, 1.0)

    def __init__(
        self,
        backbone: Backbone,
        head: LocHead = "rpn",
        anchor_sizes: tuple[int, ...] | None = None,
        anchor_ratios: tuple[float, ...] = (0.5, 1.0, 2.0),
        rpn_channels: int = 512,
    ) -> None:
        super().__init__()
        if head not in ("rpn", "regression"):
            raise ValueError(f"model.head={head!r} is not one of 'rpn', 'regression'")
        self.backbone = backbone
        self.head = head
        self.num_classes = backbone.num_classes
        channels = backbone.num_features
        self.stride = backbone.feature_info[backbone.stage_names[-1]].stride
        if head == "rpn":
            self.anchor_sizes = tuple(anchor_sizes) if anchor_sizes else None
            self.anchor_ratios = tuple(anchor_ratios)
            k = len(self.anchor_sizes or self.RELATIVE_SIZES) * len(self.anchor_ratios)
            self.conv = nn.Conv2d(channels, rpn_channels, 3, padding=1)
            self.cls = nn.Conv2d(rpn_channels, k * self.num_classes, 1)
            self.reg = nn.Conv2d(rpn_channels, k * self.num_classes * 4, 1)
            for layer in (self.conv, self.cls, self.reg):
                nn.init.normal_(layer.weight, std=0.01)
                nn.init.zeros_(layer.bias)
        else:
            self.box = nn.Linear(channels, 4 * self.num_classes)
            nn.init.normal_(self.box.weight, std=0.01)
            nn.init.zeros_(self.box.bias)
        self.coder = BoxCoder((1.0, 1.0, 1.0, 1.0))

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        """``logits`` (``B x C``) and the head's raw outputs: ``scores`` (``B x A x C``) and ``deltas``
        (``B x A x C x 4``) over ``anchors`` (``A x 4``) for ``rpn``; ``boxes`` (``B x C x 4``) otherwise."""
        fmap = self.backbone.forward_all(images)
        pooled = torch.flatten(F.adaptive_avg_pool2d(fmap, 1), 1)
        out = {"logits": self.backbone.fc(pooled)}
        size = images.shape[-2:]
        if self.head == "regression":
            rel = torch.sigmoid(self.box(pooled)).view(len(images), self.num_classes, 4)  # cx, cy, w, h in [0, 1]
            scale = rel.new_tensor([size[1], size[0], size[1], size[0]])
            cx, cy, w, h = (rel * scale).unbind(-1)
            out["boxes"] = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)
            return out
        hidden = F.relu(self.conv(fmap))
        b, _, height, width = hidden.shape
        sizes = self.anchor_sizes or tuple(f * min(size) for f in self.RELATIVE_SIZES)
        k = len(sizes) * len(self.anchor_ratios)
        c = self.num_classes
        out["scores"] = self.cls(hidden).view(b, k, c, height, width).permute(0, 3, 4, 1, 2).reshape(b, -1, c)
        deltas = self.reg(hidden).view(b, k, c, 4, height, width).permute(0, 4, 5, 1, 2, 3)
        out["deltas"] = deltas.reshape(b, -1, c, 4)
        out["anchors"] = grid_anchors(height, width, self.stride, sizes, self.anchor_ratios, images.device)
        return out

    def boxes_for(self, out: dict[str, Tensor], classes: Tensor, size: tuple[int, int]) -> Tensor:
        """The box (``x1, y1, x2, y2`` input pixels, clipped) of class ``classes[b, j]`` for each image:
        ``B x J x 4`` for ``classes`` of shape ``B x J``."""
        if self.head == "regression":
            boxes = torch.gather(out["boxes"], 1, classes[..., None].expand(-1, -1, 4))
        else:
            scores = torch.gather(out["scores"], 2, classes[:, None, :].expand(-1, out["scores"].shape[1], -1))
            best = scores.argmax(1)  # B x J: the anchor each class scores highest
            rows = torch.arange(classes.shape[0], device=classes.device)[:, None]  # (shape, not len: traceable)
            deltas = out["deltas"][rows, best, classes]  # B x J x 4
            boxes = self.coder.decode_single(deltas.reshape(-1, 4), out["anchors"][best].reshape(-1, 4))
            boxes = boxes.view(*classes.shape, 4)
        height, width = size
        return torch.stack([boxes[..., 0].clamp(0, width), boxes[..., 1].clamp(0, height),
                            boxes[..., 2].clamp(0, width), boxes[..., 3].clamp(0, height)], dim=-1)  # fmt: skip

    def box_loss(self, out: dict[str, Tensor], labels: Tensor, targets: list[Tensor], size: tuple[int, int]) -> Tensor:
        """The box head's loss for images with boxes of their class (``targets[b]``: ``K x 4``, input pixels).

        ``rpn``: each image's anchors are labeled for its class (IoU >= 0.5, and each box's best anchor:
        positive; < 0.3: negative), 64 sampled at most half positive; binary cross-entropy on the class's
        anchor scores plus smooth-L1 on its box deltas of the positives (Faster R-CNN's RPN). ``regression``:
        smooth-L1 on the class's box against the image's largest box, in units of the input size.
        """
        total = out["logits"].new_zeros(())
        with_boxes = [b for b, t in enumerate(targets) if len(t)]
        if not with_boxes:
            return total
        if self.head == "regression":
            unit = float(max(size))
            losses = []
            for b in with_boxes:
                areas = (targets[b][:, 2] - targets[b][:, 0]) * (targets[b][:, 3] - targets[b][:, 1])
                goal = targets[b][areas.argmax()]
                losses.append(F.smooth_l1_loss(out["boxes"][b, labels[b]] / unit, goal / unit, beta=1 / 9))
            return torch.stack(losses).mean()
        matcher = Matcher(0.5, 0.3, allow_low_quality_matches=True)
        sampler = BalancedPositiveNegativeSampler(64, 0.5)
        anchors = out["anchors"]
        cls_losses, reg_losses = [], []
        for b in with_boxes:
            matches = matcher(box_iou(targets[b], anchors))
            label = (matches >= 0).float()
            label[matches == Matcher.BETWEEN_THRESHOLDS] = -1
            positive, negative = sampler([label])
            chosen = (positive[0] | negative[0]).bool()
            scores = out["scores"][b, :, labels[b]]
            cls_losses.append(F.binary_cross_entropy_with_logits(scores[chosen], label[chosen].clamp_min(0)))
            pos = positive[0].bool()
            if pos.any():
                goal = self.coder.encode_single(targets[b][matches[pos].clamp_min(0)], anchors[pos])
                reg_losses.append(F.smooth_l1_loss(out["deltas"][b, pos, labels[b]], goal, beta=1 / 9, reduction="sum")
                                  / max(1, int(chosen.sum())))  # fmt: skip
        loss = torch.stack(cls_losses).mean()
        return loss + (torch.stack(reg_losses).mean() if reg_losses else 0.0)


class TopGuesses(nn.Module):
    """A localizer's five best guesses per image, as plain tensors (what ``tasks.export`` traces): ``logits``
    (``N x C``), the ``k`` best ``classes`` and their softmax ``scores`` (``N x k``), and each one's box
    (``N x k x 4``, x1 y1 x2 y2 in the input's pixels)."""

    def __init__(self, localizer: Localizer, k: int = 5) -> None:
        super().__init__()
        self.localizer, self.k = localizer, k

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        out = self.localizer(images)
        probs = out["logits"].float().softmax(1)
        scores, classes = probs.topk(min(self.k, probs.shape[1]), dim=1)
        boxes = self.localizer.boxes_for(out, classes, (images.shape[-2], images.shape[-1]))
        return out["logits"], classes, scores, boxes
