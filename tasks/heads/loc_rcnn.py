"""Localization's RPN+R-CNN stage, as the ResNet paper's ILSVRC 2015 localization entry added it (Appendix C,
Table 13: top-5 localization error 14.4 % with the per-class RPN, 10.6 % with RPN+R-CNN, dense testing).

The stage, in short: for each class the classifier predicts, the RPN's 200 best proposals for that class
are cut out, each warped to 224 x 224, and a second network (a ResNet ending in two per-class layers, one
score and one box each, fine-tuned on regions rather than images, 256 per mini-batch) rescores and moves
every proposal. Here the regions are cut from the network's input (the 224 crop) rather than the image.

* :func:`class_proposals` -- a trained per-class RPN (``tasks.heads.localization.Localizer``)'s ``top``
  best-scoring anchors for a class, regressed to boxes.
* :class:`RegionScorer` -- the R-CNN: each region cropped and warped from the input (RoIAlign to ``crop x
  crop``), a zoo backbone's pooled features, and the two sibling layers (Fast R-CNN's: ``C + 1`` scores with
  the background, ``4 (C + 1)`` box deltas); trained with Fast R-CNN's loss (torchvision's ``fastrcnn_loss``)
  on proposals of the image's class, a region a positive at IoU >= 0.5 with one of its boxes (the boxes
  themselves among the candidates), a quarter positives.
* :class:`TwoStageLocalizer` -- the trained RPN localizer (frozen: its classifier still predicts the classes)
  and the R-CNN, with the localizer's interface: a class's box is the R-CNN-regressed box of the proposal the
  R-CNN scores highest for that class. ``tasks.localize`` with ``--model.head rpn_rcnn`` trains it from an
  RPN localizer checkpoint (``--model.rpn_weights``) and logs both stages' errors in the same run.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# torchvision keeps its samplers and box coder in a private module, with no public alias (bounded in pyproject)
from torchvision.models.detection._utils import BalancedPositiveNegativeSampler, BoxCoder, Matcher
from torchvision.models.detection.roi_heads import fastrcnn_loss
from torchvision.ops import box_iou, clip_boxes_to_image, roi_align

from backbones import Backbone

from .localization import Localizer

#: the most regions the R-CNN scores in one forward pass at inference (memory, not results: BatchNorm is in
#: eval mode there, so the chunks give the one pass's numbers)
CHUNK = 256


def class_proposals(localizer: Localizer, out: dict[str, Tensor], classes: Tensor, size: tuple[int, int],
                    top: int) -> tuple[Tensor, Tensor]:  # fmt: skip
    """For class ``classes[b, j]`` of each image, the RPN's ``top`` best-scoring anchors for it, regressed:
    boxes ``B x J x top x 4`` (input pixels, clipped) and their RPN scores ``B x J x top``, best first."""
    anchors = out["anchors"]
    scores = torch.gather(out["scores"], 2, classes[:, None, :].expand(-1, anchors.shape[0], -1))  # B x A x J
    best_scores, best = scores.topk(min(top, anchors.shape[0]), dim=1)  # B x top x J
    best, best_scores = best.permute(0, 2, 1), best_scores.permute(0, 2, 1)  # B x J x top
    rows = torch.arange(classes.shape[0], device=classes.device)[:, None, None]
    deltas = out["deltas"][rows, best, classes[:, :, None]]  # B x J x top x 4
    boxes = localizer.coder.decode_single(deltas.reshape(-1, 4), anchors[best].reshape(-1, 4))
    return clip_boxes_to_image(boxes, size).view(*best.shape, 4), best_scores


class RegionScorer(nn.Module):
    """The R-CNN network of the localization entry (see the module docstring)."""

    def __init__(self, backbone: Backbone, num_classes: int, crop: int = 224, regions: int = 256) -> None:
        super().__init__()
        self.backbone, self.num_classes, self.crop, self.regions = backbone, num_classes, crop, regions
        self.cls_score = nn.Linear(backbone.num_features, num_classes + 1)
        self.bbox_pred = nn.Linear(backbone.num_features, 4 * (num_classes + 1))
        nn.init.normal_(self.cls_score.weight, std=0.01)
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        for layer in (self.cls_score, self.bbox_pred):
            nn.init.zeros_(layer.bias)
        self.coder = BoxCoder((10.0, 10.0, 5.0, 5.0))

    @staticmethod
    def rois(boxes: list[Tensor] | Tensor) -> Tensor:
        """RoIAlign's ``K x 5`` rows (image index, box) for each image's ``boxes``: a list, or ``B x M x 4`` (no
        loop over the batch, so that an exported graph keeps it free)."""
        if isinstance(boxes, Tensor):
            index = torch.arange(boxes.shape[0], device=boxes.device, dtype=boxes.dtype)
            return torch.cat([index[:, None, None].expand(-1, boxes.shape[1], 1), boxes], dim=2).reshape(-1, 5)
        return torch.cat([torch.cat([b.new_full((len(b), 1), i), b], dim=1) for i, b in enumerate(boxes)])

    def warp(self, images: Tensor, boxes: list[Tensor] | Tensor) -> Tensor:
        """Each image's ``boxes`` cropped from it and warped to ``crop x crop`` (bilinear, RoIAlign)."""
        return self._align(images, self.rois(boxes))

    def _align(self, images: Tensor, rois: Tensor) -> Tensor:
        return roi_align(images, rois, (self.crop, self.crop), 1.0, sampling_ratio=2, aligned=True)

    def score(self, images: Tensor, boxes: Tensor) -> tuple[Tensor, Tensor]:
        """The two sibling layers' outputs for every region of ``boxes`` (``B x M x 4``), at most :data:`CHUNK`
        regions per forward pass (a validation batch at the paper's settings asks for 32 x 6 x 200 crops of
        224 px); in one pass when exported (the graph keeps the number free)."""
        rois = self.rois(boxes)
        if torch.compiler.is_exporting() or rois.shape[0] <= CHUNK:
            return self(self._align(images, rois))
        parts = [self(self._align(images, part)) for part in rois.split(CHUNK)]
        return torch.cat([logits for logits, _ in parts]), torch.cat([deltas for _, deltas in parts])

    def forward(self, crops: Tensor) -> tuple[Tensor, Tensor]:
        pooled = torch.flatten(F.adaptive_avg_pool2d(self.backbone.forward_all(crops), 1), 1)
        return self.cls_score(pooled), self.bbox_pred(pooled)

    def rescore(self, images: Tensor, proposals: Tensor, classes: Tensor) -> tuple[Tensor, Tensor]:
        """For proposals ``B x J x N x 4`` of classes ``B x J``: each (image, class)'s box -- the R-CNN-regressed
        box of the proposal it scores highest for the class -- ``B x J x 4``, and that score ``B x J``."""
        b, j, n, _ = proposals.shape
        logits, deltas = self.score(images, proposals.reshape(b, j * n, 4))
        label = (classes + 1).reshape(b, j, 1).expand(-1, -1, n).reshape(-1, 1)  # gathers: traceable batch
        scores = logits.float().softmax(-1).gather(1, label).view(b, j, n)
        chosen = deltas.view(label.shape[0], -1, 4).gather(1, label[:, :, None].expand(-1, 1, 4))[:, 0]
        boxes = self.coder.decode_single(chosen.float(), proposals.reshape(-1, 4).float()).view(b, j, n, 4)
        best = scores.argmax(-1)  # B x J
        pick = best[..., None, None].expand(-1, -1, 1, 4)
        return torch.gather(boxes, 2, pick)[:, :, 0], torch.gather(scores, 2, best[..., None])[..., 0]

    def loss(self, images: Tensor, proposals: list[Tensor], targets: list[Tensor], labels: Tensor) -> Tensor:
        """Fast R-CNN's loss on ``regions`` sampled over the batch from each image's ``proposals`` (of its class
        ``labels[b]``) and its boxes ``targets[b]``; images without boxes are left out."""
        matcher, per_image = Matcher(0.5, 0.5, allow_low_quality_matches=False), max(1, self.regions // len(images))
        sampler = BalancedPositiveNegativeSampler(per_image, 0.25)
        chosen, classes, goals, kept = [], [], [], []
        for b, (found, truth) in enumerate(zip(proposals, targets)):
            if not len(truth):
                continue
            candidates = torch.cat([found, truth.to(found)])
            matches = matcher(box_iou(truth.to(found), candidates))
            positive = matches >= 0
            target = torch.where(positive, labels[b] + 1, torch.zeros_like(matches))
            pos, neg = sampler([positive.to(torch.int64)])  # 1: positive, 0: background
            take = torch.where(pos[0].bool() | neg[0].bool())[0]
            chosen.append(candidates[take])
            classes.append(target[take])
            goals.append(self.coder.encode_single(truth.to(found)[matches[take].clamp_min(0)], candidates[take]))
            kept.append(b)
        if not kept:  # a zero that reaches every parameter (DDP finds none unused), with no forward pass that
            # would move BatchNorm's statistics
            return sum(p.sum() for p in self.parameters() if p.requires_grad) * 0.0
        logits, deltas = self(self.warp(images[kept], chosen))
        cls_loss, box_loss = fastrcnn_loss(logits, deltas, classes, goals)
        return cls_loss + box_loss


class TwoStageLocalizer(nn.Module):
    """A frozen RPN localizer and the R-CNN on its proposals, with the localizer's interface (``forward``,
    ``boxes_for``, ``box_loss``); ``rpn_boxes_for`` gives the RPN stage's own boxes."""

    head = "rpn_rcnn"

    def __init__(self, rpn: Localizer, rcnn: RegionScorer, proposals: int = 200) -> None:
        super().__init__()
        if rpn.head != "rpn":
            raise ValueError(f"the R-CNN stage reads a per-class RPN's proposals; the localizer's head is {rpn.head!r}")
        # the R-CNN first: the task's backbone (``backbone_module``: freezing, compiling, the checkpoint's
        # backbone record) is the one trained here
        self.rcnn, self.rpn, self.proposals = rcnn, rpn, proposals
        self.num_classes = rpn.num_classes
        self.rpn.requires_grad_(False).eval()

    @property
    def backbone(self) -> Backbone:
        """The RPN localizer's backbone (its classifier predicts the classes)."""
        return self.rpn.backbone

    def train(self, mode: bool = True) -> TwoStageLocalizer:
        super().train(mode)
        self.rpn.eval()  # frozen: its BN statistics too
        return self

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        if self.rpn.training:  # set module by module from outside (Lightning restores each module's mode)
            self.rpn.eval()
        with torch.no_grad():
            out = self.rpn(images)
        return {**out, "images": images}

    def rpn_boxes_for(self, out: dict[str, Tensor], classes: Tensor, size: tuple[int, int]) -> Tensor:
        return self.rpn.boxes_for(out, classes, size)

    def boxes_for(self, out: dict[str, Tensor], classes: Tensor, size: tuple[int, int]) -> Tensor:
        proposals, _ = class_proposals(self.rpn, out, classes, size, self.proposals)
        boxes, _ = self.rcnn.rescore(out["images"], proposals, classes)
        height, width = size
        return torch.stack([boxes[..., 0].clamp(0, width), boxes[..., 1].clamp(0, height),
                            boxes[..., 2].clamp(0, width), boxes[..., 3].clamp(0, height)], dim=-1)  # fmt: skip

    def box_loss(self, out: dict[str, Tensor], labels: Tensor, targets: list[Tensor], size: tuple[int, int]) -> Tensor:
        """The R-CNN's loss on the RPN's proposals for each image's own class (RoI-centric)."""
        with torch.no_grad():
            proposals, _ = class_proposals(self.rpn, out, labels.clamp_min(0)[:, None], size, self.proposals)
        return self.rcnn.loss(out["images"], list(proposals[:, 0]), targets, labels)
