"""Detector ensembles as the ResNet paper's COCO entry combined them (Appendix A, "Ensemble"; Table 9: test-dev
55.7/34.9 -> 59.0/37.4 mAP@.5 / mAP@[.5:.95]; ImageNet DET 58.8 % -> 62.1 % with 3 models, Table 12).

"An ensemble of RPNs proposes regions (the union of their proposals), processed by an ensemble of per-region
classifiers (scores and boxes averaged)": each member's RPN proposes on its own features, the proposals of all
members are joined per image, *every* member's box head scores and regresses that union, the class
probabilities and the per-class boxes are averaged over the members, and the first member's post-processing
(score threshold, per-class NMS, ``detections_per_img``) turns them into detections. A Mask R-CNN's masks
are each member's mask branch on the final boxes, the probabilities averaged (at the first member's mask
resolution) before pasting.

That needs members that see the same resized image and share the label rows; members that do not (another
``min_size``, normalization or number of classes -- :func:`incompatibility` says which) are combined by
their detections instead: each member's detections in the image's pixels pooled, per-class NMS at the first
member's threshold, box voting at IoU 0.5 (``tasks.heads.region_passes``). An ensemble of one detector is
that detector exactly (tested).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import Tensor

from .region_passes import VOTE_IOU, Stage, add_masks, candidates, merge_detections, select

log = logging.getLogger(__name__)


def _signature(detector) -> dict:
    t, heads = detector.transform, detector.roi_heads
    return {
        "min_size": tuple(t.min_size), "max_size": t.max_size, "image_mean": list(t.image_mean),
        "image_std": list(t.image_std), "size_divisible": t.size_divisible,
        "classes": heads.box_predictor.cls_score.out_features, "box_coder": tuple(heads.box_coder.weights),
        "masks": heads.has_mask(),
    }  # fmt: skip


def incompatibility(detectors: list) -> str | None:
    """Why ``detectors`` cannot share proposals and average their heads (``None`` when they can): the first
    setting in which a member differs from the first member."""
    first = _signature(detectors[0])
    for k, detector in enumerate(detectors[1:], start=1):
        for key, value in _signature(detector).items():
            if value != first[key]:
                return f"member {k} has {key}={value}, member 0 {first[key]}"
    return None


@torch.no_grad()
def detect_ensemble(detectors: list, images: list[Tensor]) -> list[dict[str, Tensor]]:
    """torchvision Faster R-CNN or Mask R-CNN ``detectors`` (in eval mode) on ``images``, combined as the module
    docstring says; outputs as a detector's own, in the images' pixels."""
    reason = incompatibility(detectors)
    if reason is not None:
        log.info("ensemble: combining the members' detections (NMS and box voting): %s", reason)
        outputs = [detector(images) for detector in detectors]
        heads = detectors[0].roi_heads
        return [
            merge_detections(list(found), heads.nms_thresh, heads.detections_per_img, VOTE_IOU)
            for found in zip(*outputs)
        ]
    stages = [Stage(detector, images) for detector in detectors]
    union = [torch.cat(per_image) for per_image in zip(*(stage.proposals for stage in stages))]
    predictions = [stage.predict(union) for stage in stages]
    probabilities = torch.stack([p for p, _ in predictions]).mean(0)
    boxes = torch.stack([b for _, b in predictions]).mean(0)
    first = stages[0]
    detections = select(
        first.heads, candidates(first.heads, probabilities, boxes, [len(u) for u in union], first.sizes)
    )
    if first.heads.has_mask():
        members = []
        for stage in stages:
            found = [dict(d) for d in detections]
            add_masks(stage.heads, stage.features, found, stage.sizes)
            members.append(found)
        for k, d in enumerate(detections):
            masks = [m[k]["masks"] for m in members]
            side = masks[0].shape[-2:]
            masks = [m if m.shape[-2:] == side else F.interpolate(m, size=side, mode="bilinear") for m in masks]
            d["masks"] = torch.stack(masks).mean(0)
    return first.detector.transform.postprocess(detections, first.sizes, first.original_sizes)
