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
plain detector's. The steps are torchvision's, taken apart in ``tasks.heads.region_passes``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torchvision.ops import clip_boxes_to_image

from .multiscale import TARGET, PyramidStage
from .region_passes import VOTE_IOU, Stage, candidates, select

#: the paper's NMS threshold over the two passes' union
NMS_IOU = 0.3


def regressed_boxes(probabilities: Tensor, boxes: Tensor, counts: list[int],
                    image_sizes: list[tuple[int, int]]) -> list[Tensor]:  # fmt: skip
    """Each region's box of its best-scoring foreground class, clipped to its image (``N_i x 4`` per image)."""
    best = probabilities[:, 1:].argmax(1) + 1
    chosen = boxes[torch.arange(boxes.shape[0], device=boxes.device), best]
    return [clip_boxes_to_image(b, size) for b, size in zip(chosen.split(counts), image_sizes)]


@torch.no_grad()
def detect_refined(detector, images: list[Tensor], nms_iou: float = NMS_IOU, vote_iou: float = VOTE_IOU,
                   pyramid: Sequence[int] | None = None,
                   target: float = TARGET) -> list[dict[str, Tensor]]:  # fmt: skip
    """torchvision's Faster R-CNN or Mask R-CNN ``detector`` (in eval mode) on ``images`` with box refinement
    and box voting (the module docstring); outputs as the detector's own, in the images' pixels. ``pyramid``:
    both passes' region features by multi-scale testing on those shorter sides, around ``target`` px
    (``tasks.heads.multiscale``)."""
    stage = PyramidStage(detector, images, pyramid, target) if pyramid else Stage(detector, images)
    heads, sizes, counts = stage.heads, stage.sizes, stage.counts
    first = stage.predict(stage.proposals)
    moved = regressed_boxes(*first, counts, sizes)
    second = stage.predict(moved)
    # the union, per image: the first pass's predictions then the second's, each decoded from its own boxes
    joined = [
        candidates(heads, torch.cat([p1, p2]), torch.cat([b1, b2]), [2 * n], [size])[0]
        for p1, b1, p2, b2, n, size in zip(*(x.split(counts) for x in (*first, *second)), counts, sizes)
    ]
    return stage.finish(select(heads, joined, nms_iou, vote_iou))
