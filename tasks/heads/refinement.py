"""Box refinement and box voting, as the ResNet paper's COCO entry added them (Appendix A, "Box refinement";
Table 9: ResNet-101 Faster R-CNN 48.4/27.2 -> 49.9/29.9 mAP@.5 / mAP@[.5:.95] on COCO val), on torchvision's
Faster R-CNN and Mask R-CNN (both heads, C4 and FPN).

At inference the box head runs twice:

1. on the RPN's proposals, as the plain detector does: per-class scores (softmax) and per-class regressed boxes;
2. on each proposal's *regressed* box -- the box of its best-scoring foreground class, clipped to the image --
   pooling a new feature there, which gives a new score and a new regressed box.

The two passes' predictions are joined (each pass's boxes decoded from its own input boxes), the detector's
score threshold and small-box removal apply as usual, per-class NMS runs over the union at IoU 0.3
(``nms_iou``), then **box voting** (Gidaris & Komodakis, ICCV 2015, Section 5): each kept box is replaced by
the score-weighted average of the union's boxes *of its class* that overlap it at IoU >= 0.5 (``vote_iou``;
itself included), its score unchanged; the ``detections_per_img`` best are kept. A Mask R-CNN's masks are then
predicted on the final boxes, as its plain inference does.

Tasks turn it on with ``--model.box_refinement true`` (``detect``, ``instance_segment``) for ``validate``,
``test``, ``predict``, the predictor and the validation during ``fit``; it composes with ``--model.tta`` (each
view refined, then the views merged). Training is unchanged. The exported graph (``tasks.export``) is the
plain detector's.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.models.detection.roi_heads import maskrcnn_inference
from torchvision.ops import batched_nms, box_iou, clip_boxes_to_image

#: the paper's NMS threshold over the two passes' union
NMS_IOU = 0.3
#: Gidaris & Komodakis's voting overlap
VOTE_IOU = 0.5


def head_pass(heads, features: dict[str, Tensor], boxes: list[Tensor], image_sizes: list[tuple[int, int]]):
    """The box head on ``boxes`` (per image, in the resized image's pixels): class logits and the box
    regression, both ``sum(N_i) x ...``, as torchvision's ``RoIHeads`` computes them."""
    pooled = heads.box_roi_pool(features, boxes, image_sizes)
    return heads.box_predictor(heads.box_head(pooled))


def regressed_boxes(heads, logits: Tensor, regression: Tensor, boxes: list[Tensor],
                    image_sizes: list[tuple[int, int]]) -> list[Tensor]:  # fmt: skip
    """Each box regressed to its best-scoring foreground class, clipped to its image (``N_i x 4`` per image)."""
    decoded = heads.box_coder.decode(regression, boxes)  # N x C x 4
    best = logits[:, 1:].argmax(1) + 1
    chosen = decoded[torch.arange(decoded.shape[0], device=decoded.device), best]
    return [clip_boxes_to_image(b, size) for b, size in zip(chosen.split([len(b) for b in boxes]), image_sizes)]


def box_voting(kept: Tensor, labels: Tensor, pool: Tensor, pool_scores: Tensor, pool_labels: Tensor,
               iou: float = VOTE_IOU) -> Tensor:  # fmt: skip
    """``kept`` boxes (``K x 4``, classes ``labels``) each replaced by the ``pool_scores``-weighted average of
    the ``pool`` boxes of its class that overlap it at IoU >= ``iou``."""
    if kept.numel() == 0:
        return kept
    weights = (box_iou(kept, pool) >= iou) & (labels[:, None] == pool_labels[None, :])
    weights = weights.to(pool_scores.dtype) * pool_scores[None, :]
    return (weights @ pool) / weights.sum(1, keepdim=True)


def merge_passes(heads, logits: Tensor, regression: Tensor, boxes: list[Tensor], image_sizes: list[tuple[int, int]],
                 nms_iou: float = NMS_IOU, vote_iou: float = VOTE_IOU) -> list[dict[str, Tensor]]:  # fmt: skip
    """Per image: the candidates of all input ``boxes`` (torchvision's post-processing -- decoding, clipping,
    the score threshold, small-box removal -- with nothing suppressed), NMS at ``nms_iou`` per class, box
    voting at ``vote_iou``, the ``detections_per_img`` best."""
    nms_thresh, per_img = heads.nms_thresh, heads.detections_per_img
    try:  # every candidate: IoU never exceeds 1, and no cap on their number
        heads.nms_thresh, heads.detections_per_img = 1.0, logits.shape[0] * logits.shape[1]
        pools, pool_scores, pool_labels = heads.postprocess_detections(logits, regression, boxes, image_sizes)
    finally:
        heads.nms_thresh, heads.detections_per_img = nms_thresh, per_img
    results = []
    for pool, scores, labels in zip(pools, pool_scores, pool_labels):
        keep = batched_nms(pool, scores, labels, nms_iou)[:per_img]
        voted = box_voting(pool[keep], labels[keep], pool, scores, labels, vote_iou)
        results.append({"boxes": voted, "labels": labels[keep], "scores": scores[keep]})
    return results


@torch.no_grad()
def detect_refined(detector, images: list[Tensor], nms_iou: float = NMS_IOU,
                   vote_iou: float = VOTE_IOU) -> list[dict[str, Tensor]]:  # fmt: skip
    """torchvision's Faster R-CNN or Mask R-CNN ``detector`` (in eval mode) on ``images`` with box refinement
    and box voting (the module docstring); outputs as the detector's own, in the images' pixels."""
    original_sizes = [tuple(im.shape[-2:]) for im in images]
    batch, _ = detector.transform(images)
    features = detector.backbone(batch.tensors)
    proposals, _ = detector.rpn(batch, features)
    heads, sizes = detector.roi_heads, batch.image_sizes
    first_logits, first_regression = head_pass(heads, features, proposals, sizes)
    moved = regressed_boxes(heads, first_logits, first_regression, proposals, sizes)
    second_logits, second_regression = head_pass(heads, features, moved, sizes)
    # the union, per image: the first pass's predictions then the second's, each decoded from its own boxes
    n = [len(p) for p in proposals]
    logits = torch.cat([x for pair in zip(first_logits.split(n), second_logits.split(n)) for x in pair])
    regression = torch.cat([x for pair in zip(first_regression.split(n), second_regression.split(n)) for x in pair])
    boxes = [torch.cat(pair) for pair in zip(proposals, moved)]
    detections = merge_passes(heads, logits, regression, boxes, sizes, nms_iou, vote_iou)
    if heads.has_mask():
        found = [d["boxes"] for d in detections]
        mask_logits = heads.mask_predictor(heads.mask_head(heads.mask_roi_pool(features, found, sizes)))
        for d, probabilities in zip(detections, maskrcnn_inference(mask_logits, [d["labels"] for d in detections])):
            d["masks"] = probabilities
    return detector.transform.postprocess(detections, sizes, original_sizes)
