"""The second stage of torchvision's Faster R-CNN / Mask R-CNN taken apart, for what the 2015 entries did
between its steps (box refinement: ``tasks.heads.refinement``; ensembles: ``tasks.heads.ensemble``).

torchvision's ``RoIHeads`` goes from region features to detections in one call. Here the same steps are
separate: :func:`region_predictions` (pool, box head, predictor: class probabilities and per-class boxes,
decoded from the regions they came from), :func:`candidates` (torchvision's post-processing before NMS:
boxes clipped, the background dropped, each class a candidate, the score threshold, empty boxes removed),
:func:`select` (per-class NMS, optionally box voting, the ``detections_per_img`` best) and :func:`add_masks`
(a Mask R-CNN's mask branch on the final boxes); and :func:`merge_detections`, which pools whole detections
(test-time views', an ensemble's members') by NMS and, optionally, box voting.

``select(candidates(...))`` at the head's own NMS threshold is ``RoIHeads.postprocess_detections`` exactly
(tested), so probabilities and boxes averaged or joined between the steps go through the detector's own rules.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.models.detection.roi_heads import maskrcnn_inference
from torchvision.ops import batched_nms, box_iou, clip_boxes_to_image, remove_small_boxes

#: Gidaris & Komodakis's voting overlap (ICCV 2015, Section 5)
VOTE_IOU = 0.5


def region_predictions(heads, features: dict[str, Tensor], regions: list[Tensor],
                       image_sizes: list[tuple[int, int]]) -> tuple[Tensor, Tensor]:  # fmt: skip
    """The box head of ``heads`` (a ``RoIHeads``) on ``regions`` (per image, in the resized image's pixels):
    the class probabilities (``N x C``, softmax) and each class's box (``N x C x 4``, decoded from its region),
    the regions of all images in order."""
    return predictions_from(heads, heads.box_head(heads.box_roi_pool(features, regions, image_sizes)), regions)


def predictions_from(heads, region_features: Tensor, regions: list[Tensor]) -> tuple[Tensor, Tensor]:
    """The class and box layers of ``heads`` on the box head's ``region_features`` of ``regions``: probabilities
    and decoded per-class boxes, as :func:`region_predictions`."""
    logits, regression = heads.box_predictor(region_features)
    return F.softmax(logits, -1), heads.box_coder.decode(regression, regions)


class Stage:
    """A batch through a detector's first stage -- resized (``transform``), its features, the RPN's
    proposals -- and its box head ready for any regions (:meth:`predict`); :meth:`finish` adds a Mask R-CNN's
    masks and maps the detections back to the images' pixels. Multi-scale testing changes where
    :meth:`region_features` reads (``tasks.heads.multiscale``)."""

    def __init__(self, detector, images: list[Tensor]) -> None:
        self.detector, self.heads = detector, detector.roi_heads
        self.original_sizes = [tuple(im.shape[-2:]) for im in images]
        self.batch, _ = detector.transform(images)
        self.sizes = self.batch.image_sizes
        self.features = detector.backbone(self.batch.tensors)
        self.proposals, _ = detector.rpn(self.batch, self.features)
        self.counts = [len(p) for p in self.proposals]

    def region_features(self, regions: list[Tensor]) -> Tensor:
        """The box head's features of ``regions`` (per image, in the resized batch's pixels)."""
        return self.heads.box_head(self.heads.box_roi_pool(self.features, regions, self.sizes))

    def predict(self, regions: list[Tensor]) -> tuple[Tensor, Tensor]:
        """Class probabilities and per-class boxes of ``regions`` (:func:`predictions_from`)."""
        return predictions_from(self.heads, self.region_features(regions), regions)

    def finish(self, detections: list[dict[str, Tensor]]) -> list[dict[str, Tensor]]:
        add_masks(self.heads, self.features, detections, self.sizes)
        return self.detector.transform.postprocess(detections, self.sizes, self.original_sizes)


def candidates(heads, probabilities: Tensor, boxes: Tensor, counts: list[int],
               image_sizes: list[tuple[int, int]]) -> list[tuple[Tensor, Tensor, Tensor]]:  # fmt: skip
    """Per image (``counts`` regions each): the ``(boxes, scores, labels)`` of every foreground class of every
    region scoring above the head's ``score_thresh``, boxes clipped to the image and empty ones removed --
    torchvision's post-processing up to its NMS."""
    found = []
    for p, b, size in zip(probabilities.split(counts), boxes.split(counts), image_sizes):
        b = clip_boxes_to_image(b, size)
        labels = torch.arange(p.shape[-1], device=p.device).view(1, -1).expand_as(p)
        b, p, labels = b[:, 1:].reshape(-1, 4), p[:, 1:].reshape(-1), labels[:, 1:].reshape(-1)
        index = torch.where(p > heads.score_thresh)[0]
        b, p, labels = b[index], p[index], labels[index]
        keep = remove_small_boxes(b, min_size=1e-2)
        found.append((b[keep], p[keep], labels[keep]))
    return found


def box_voting(kept: Tensor, labels: Tensor, pool: Tensor, pool_scores: Tensor, pool_labels: Tensor,
               iou: float = VOTE_IOU) -> Tensor:  # fmt: skip
    """``kept`` boxes (``K x 4``, classes ``labels``) each replaced by the ``pool_scores``-weighted average of
    the ``pool`` boxes of its class that overlap it at IoU >= ``iou`` (itself among them when it is in the pool)."""
    if kept.numel() == 0:
        return kept
    weights = (box_iou(kept, pool) >= iou) & (labels[:, None] == pool_labels[None, :])
    weights = weights.to(pool_scores.dtype) * pool_scores[None, :]
    return (weights @ pool) / weights.sum(1, keepdim=True)


def select(heads, found: list[tuple[Tensor, Tensor, Tensor]], nms_iou: float | None = None,
           vote_iou: float | None = None) -> list[dict[str, Tensor]]:  # fmt: skip
    """Per image, the candidates ``found`` after per-class NMS at ``nms_iou`` (the head's own threshold by
    default), each kept box voted over the candidates at ``vote_iou`` when given, the head's
    ``detections_per_img`` best: ``boxes``, ``scores``, ``labels``."""
    threshold = heads.nms_thresh if nms_iou is None else nms_iou
    results = []
    for boxes, scores, labels in found:
        keep = batched_nms(boxes, scores, labels, threshold)[: heads.detections_per_img]
        kept = boxes[keep]
        if vote_iou is not None:
            kept = box_voting(kept, labels[keep], boxes, scores, labels, vote_iou)
        results.append({"boxes": kept, "scores": scores[keep], "labels": labels[keep]})
    return results


def add_masks(heads, features: dict[str, Tensor], detections: list[dict[str, Tensor]],
              image_sizes: list[tuple[int, int]]) -> None:  # fmt: skip
    """A Mask R-CNN head's masks for ``detections`` (its mask branch on their boxes, the mask of each box's
    class, as ``RoIHeads`` does at test time): ``masks`` added to each, ``K x 1 x M x M`` probabilities."""
    if not heads.has_mask():
        return
    boxes = [d["boxes"] for d in detections]
    logits = heads.mask_predictor(heads.mask_head(heads.mask_roi_pool(features, boxes, image_sizes)))
    for d, probabilities in zip(detections, maskrcnn_inference(logits, [d["labels"] for d in detections])):
        d["masks"] = probabilities


def merge_detections(outputs: list[dict[str, Tensor]], nms_iou: float, limit: int,
                     vote_iou: float | None = None) -> dict[str, Tensor]:  # fmt: skip
    """One image's detections from several sources (``outputs``, each with ``boxes``, ``scores``, ``labels``
    and anything else per detection, such as pasted ``masks``) pooled, per-class NMS at ``nms_iou``, the
    ``limit`` best kept with what they carry; with ``vote_iou``, each kept box voted over the pool."""
    pooled = {key: torch.cat([o[key] for o in outputs]) for key in outputs[0]}
    keep = batched_nms(pooled["boxes"], pooled["scores"], pooled["labels"], nms_iou)[:limit]
    merged = {key: value[keep] for key, value in pooled.items()}
    if vote_iou is not None:
        merged["boxes"] = box_voting(
            merged["boxes"], merged["labels"], pooled["boxes"], pooled["scores"], pooled["labels"], vote_iou
        )
    return merged
