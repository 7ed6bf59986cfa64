"""Test-time augmentation for detection and segmentation: each image is also seen mirrored and at other
scales, and the views' predictions are merged in the image's own coordinates.

- Detection, as detectron2's ``GeneralizedRCNNWithTTA``: the detector runs on each view (its shorter-side
  target ``min_size`` and ``max_size`` times the scale, the image mirrored or not); a mirrored view's boxes
  are mirrored back; all views' boxes are pooled and merged by per-class NMS at the detector's own
  threshold, keeping its ``detections_per_img`` best. A Mask R-CNN's masks (pasted at the image's size by
  each view) are mirrored back with their boxes and kept with them.
- Segmentation, as MMSegmentation's and torchvision's multi-scale evaluation: the class probabilities of
  each view, mirrored back and resized to the input, are averaged; the result is returned as their log
  (argmax and cross-entropy as for logits).

Tasks turn it on with ``--model.tta true`` (views: ``--model.tta_scales``, default ``[1.0]``, and
``--model.tta_flip``, default true), for ``validate``, ``test``, ``predict`` and the validation during
``fit``. One view (no flip, scale 1) gives exactly the plain evaluation's metrics (tested).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .region_passes import merge_detections


def views(scales: Sequence[float], flip: bool) -> list[tuple[float, bool]]:
    """The (scale, mirrored) views: every scale, each also mirrored when ``flip``."""
    if not scales:
        raise ValueError("model.tta_scales is empty: give at least one scale, e.g. [1.0]")
    return [(float(s), f) for s in scales for f in ((False, True) if flip else (False,))]


def mirror_boxes(boxes: Tensor, width: int) -> Tensor:
    """``x1, y1, x2, y2`` boxes of an image ``width`` pixels wide, mirrored left to right."""
    return torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1)


def detect_with_tta(detector, images: list[Tensor], scales: Sequence[float], flip: bool,
                    run: Callable[[list[Tensor]], list[dict]] | None = None) -> list[dict]:  # fmt: skip
    """torchvision's Faster R-CNN or Mask R-CNN ``detector`` (in eval mode) on ``images`` with each view,
    merged. ``run``: how a view's images are detected (the detector itself by default; box refinement's
    ``tasks.heads.refinement.detect_refined`` with the same detector)."""
    transform, heads = detector.transform, detector.roi_heads
    min_size, max_size = transform.min_size, transform.max_size
    found: list[list[dict]] = [[] for _ in images]
    try:
        for scale, mirrored in views(scales, flip):
            transform.min_size = tuple(round(m * scale) for m in min_size)
            transform.max_size = round(max_size * scale)
            outputs = (run or detector)([im.flip(-1) for im in images] if mirrored else images)
            for k, (out, image) in enumerate(zip(outputs, images)):
                view = dict(out)
                if mirrored:
                    view["boxes"] = mirror_boxes(out["boxes"], image.shape[-1])
                    if "masks" in out:  # Mask R-CNN's, pasted at the image's size: mirrored back too
                        view["masks"] = out["masks"].flip(-1)
                found[k].append(view)
    finally:
        transform.min_size, transform.max_size = min_size, max_size
    return [merge_detections(outs, heads.nms_thresh, heads.detections_per_img) for outs in found]


def segment_with_tta(logits_of: Callable[[Tensor], Tensor], images: Tensor, scales: Sequence[float], flip: bool,
                     plain: Tensor | None = None) -> Tensor:  # fmt: skip
    """The log of the class probabilities averaged over the views of ``images`` (``B x 3 x H x W``), at
    their size; ``logits_of`` maps images to ``B x C x h x w`` logits at the images' size. ``plain``:
    the logits of the unmirrored scale-1 view when already computed."""
    size = images.shape[-2:]
    total = None
    for scale, mirrored in views(scales, flip):
        if scale == 1.0 and not mirrored and plain is not None:
            logits = plain
        else:
            view = images if scale == 1.0 else F.interpolate(images, scale_factor=scale, mode="bilinear")
            logits = logits_of(view.flip(-1) if mirrored else view)
            logits = logits.flip(-1) if mirrored else logits
            if logits.shape[-2:] != size:
                logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        probs = logits.float().softmax(1)
        total = probs if total is None else total + probs
    return (total / len(views(scales, flip))).log()
