"""Plain modules for whole-model export (``tasks.export``): a network's outputs as plain tensors, a detector
on one image, and the patches that make torchvision's Faster R-CNN and Mask R-CNN traceable by
``torch.export``.

``torch.export`` of a detector runs under :func:`traceable_detector`: the RPN's and box head's per-class NMS
without data-dependent branches, the input resize without a branch on the image's shape and the padding in
integers -- the same boxes and pixels (tested against torchvision's), with the numbers of proposals and
detections free in the program. The RoI pooler (``tasks.heads.faster_rcnn.RoIAlignPooler``) is traceable as
it is.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from unittest import mock

import torch
from torch import nn
from torch.nn import functional as F
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection import roi_heads as rcnn_roi_heads
from torchvision.models.detection import transform as rcnn_transform
from torchvision.ops import boxes as box_ops
from torchvision.ops import nms


class Logits(nn.Module):
    """A network whose output (a tensor, or a dict with ``out``) becomes plain tensors for export."""

    def __init__(self, network: nn.Module, keys: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.network, self.keys = network, keys

    def forward(self, image: torch.Tensor):
        out = self.network(image)
        if self.keys:
            return tuple(out[k] for k in self.keys) if len(self.keys) > 1 else out[self.keys[0]]
        return out


class OneImageDetector(nn.Module):
    """torchvision's Faster R-CNN (or Mask R-CNN) on one image: pre-processing, network and post-processing,
    its outputs ``keys`` as plain tensors."""

    def __init__(self, detector: nn.Module, keys: tuple[str, ...] = ("boxes", "labels", "scores")) -> None:
        super().__init__()
        self.detector, self.keys = detector, keys

    def forward(self, image: torch.Tensor):
        found = self.detector([image])[0]
        return tuple(found[k] for k in self.keys)


def _one_nms_for_all_classes(boxes: torch.Tensor, scores: torch.Tensor, classes: torch.Tensor, iou: float):
    """``torchvision.ops.batched_nms`` without its two branches on the number of boxes (none left; over 4,000
    on CPU), which ``torch.export`` cannot trace: always its own offset strategy (each class's boxes moved
    past every other class's, then one NMS), which keeps the same boxes; a zero joins the maximum so that
    an empty set needs no branch."""
    top = torch.cat([boxes.flatten(), boxes.new_zeros(1)]).max()
    return nms(boxes + (classes.to(boxes) * (top + 1))[:, None], scores, iou)


# the function the patch below stands in for, private in torchvision (bounded in pyproject): kept for training-time
# calls with targets
_resize_with_targets = rcnn_transform._resize_image_and_masks


def _resize_by_symbolic_scale(image: torch.Tensor, min_size: float, max_size: float, target=None, fixed_size=None):
    """``GeneralizedRCNNTransform``'s resize (shorter side to ``min_size`` unless the longer would pass
    ``max_size``) with the smaller of the two scales taken by ``torch.sym_min``, so that an input whose height
    and width vary is not tied to the case the example image fell in; the same numbers in eager mode."""
    if target is not None or fixed_size is not None:
        return _resize_with_targets(image, min_size, max_size, target, fixed_size)
    height, width = image.shape[-2:]
    scale = torch.sym_min(min_size / torch.sym_min(height, width), max_size / torch.sym_max(height, width))
    if isinstance(height, int) and isinstance(width, int):  # a fixed size: interpolate's own arithmetic
        new_h, new_w = math.floor(height * scale), math.floor(width * scale)
    else:  # the same double-precision product as data, so the graph carries two plain symbols, not formulas
        shape = torch.tensor([height, width], dtype=torch.float64)
        new_h, new_w = (shape * torch.tensor(scale, dtype=torch.float64)).floor().long().tolist()
        torch._check(new_h >= 1)
        torch._check(new_w >= 1)
    resized = F.interpolate(image[None], size=(new_h, new_w), mode="bilinear")
    return resized[0], None


def _pad_one_image(transform: rcnn_transform.GeneralizedRCNNTransform, images: list[torch.Tensor],
                   size_divisible: int = 32) -> torch.Tensor:  # fmt: skip
    """``GeneralizedRCNNTransform.batch_images`` for the one image the exported graph takes: zeros on the right
    and bottom up to the next multiple of ``size_divisible``, computed in integers (no float ``ceil``, which
    would fix the traced size)."""
    (image,) = images
    height, width = image.shape[-2:]
    pad_h, pad_w = (-height) % size_divisible, (-width) % size_divisible
    return F.pad(image, (0, pad_w, 0, pad_h))[None]


def _interpolation_rows(start: torch.Tensor, length: torch.Tensor, size: int, source: int) -> torch.Tensor:
    """For each of ``K`` boxes, the ``size x source`` matrix that samples a ``source``-long row of mask values
    bilinearly onto the image's ``size`` pixels: pixel ``start + j`` (``0 <= j < length``) takes
    ``F.interpolate(..., size=length, mode="bilinear", align_corners=False)``'s value ``j`` (source index
    ``(j + 0.5) * source / length - 0.5``, clamped to the row); other pixels take nothing."""
    pixel = torch.arange(size, device=start.device)[None, :] - start[:, None]  # K x size: j
    inside = (pixel >= 0) & (pixel < length[:, None])
    where = ((pixel.to(torch.float32) + 0.5) * (source / length.to(torch.float32))[:, None] - 0.5).clamp_min(0)
    lower = where.floor().clamp_max(source - 1)
    weight = where - lower
    lower = lower.long()
    upper = (lower + 1).clamp_max(source - 1)
    grid = torch.arange(source, device=start.device)
    rows = (1 - weight)[..., None] * (lower[..., None] == grid) + weight[..., None] * (upper[..., None] == grid)
    return rows * inside[..., None]


def paste_masks_in_image(masks: torch.Tensor, boxes: torch.Tensor, img_shape, padding: int = 1) -> torch.Tensor:
    """torchvision's ``paste_masks_in_image`` without its loop over the masks (a data-dependent count that
    ``torch.export`` cannot unroll): the same padding and box expansion, and each mask's bilinear resize to
    its box as two matrix products (rows, then columns) placed at the box, clipped to the image. Equal to
    torchvision's up to float rounding (a pixel at exactly 0.5 may fall either side)."""
    source = masks.shape[-1] + 2 * padding
    padded = F.pad(masks[:, 0], (padding,) * 4)
    scale = source / masks.shape[-1]
    half_w, half_h = (boxes[:, 2] - boxes[:, 0]) * 0.5 * scale, (boxes[:, 3] - boxes[:, 1]) * 0.5 * scale
    center_x, center_y = (boxes[:, 2] + boxes[:, 0]) * 0.5, (boxes[:, 3] + boxes[:, 1]) * 0.5
    x0, x1 = (center_x - half_w).long(), (center_x + half_w).long()
    y0, y1 = (center_y - half_h).long(), (center_y + half_h).long()
    height, width = img_shape
    rows = _interpolation_rows(y0, (y1 - y0 + 1).clamp_min(1), height, source)  # K x H x S
    columns = _interpolation_rows(x0, (x1 - x0 + 1).clamp_min(1), width, source)  # K x W x S
    # bmm, not matmul: no broadcasting, so torch.export needs no guard relating the two counts of masks
    return torch.bmm(torch.bmm(rows.to(padded), padded), columns.to(padded).transpose(1, 2))[:, None]


def _mask_probabilities(x: torch.Tensor, labels: list[torch.Tensor]) -> list[torch.Tensor]:
    """torchvision's ``maskrcnn_inference`` (each detection's mask of its own class, as a probability) with a
    ``gather`` instead of indexing by two index tensors, whose broadcasting ``torch.export`` can only trace
    under a guard that no fewer than two masks come out (an image with one detection, or none, would fail)."""
    probabilities = x.sigmoid()
    index = torch.cat(labels)[:, None, None, None].expand(-1, 1, *x.shape[-2:])
    chosen = probabilities.gather(1, index)
    return list(chosen.split([label.shape[0] for label in labels], dim=0))


def _decode_without_branches(coder: det_utils.BoxCoder, rel_codes: torch.Tensor, boxes: list[torch.Tensor]):
    """``BoxCoder.decode`` (regression deltas applied to each image's boxes) without its two branches on the
    number of boxes, which ``torch.export`` cannot take when that number comes from NMS: the deltas are
    already one row per box (``N x 4k``: the RPN's and the box head's), so they are reshaped with the
    column count they have; the same numbers."""
    concat = torch.cat(boxes, dim=0)
    rows = rel_codes.reshape(concat.shape[0], rel_codes.shape[-1])
    return coder.decode_single(rows, concat).reshape(concat.shape[0], rel_codes.shape[-1] // 4, 4)


def _nms_shape(dets: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """The shape of ``torchvision::nms``'s output for tracing: torchvision's own fake kernel, except that the
    number of boxes kept may be any size from 0 -- torchvision's asks for ``create_unbacked_symint()``, whose
    default lower bound is 2, so a traced program refused an image with one detection or none."""
    torch._check(dets.dim() == 2 and dets.size(1) == 4 and scores.dim() == 1 and dets.size(0) == scores.size(0))
    kept = torch.library.get_ctx().new_dynamic_size()
    return dets.new_empty(kept, dtype=torch.long)


_nms_shape_registered = False


def _register_nms_shape() -> None:
    """Put :func:`_nms_shape` in place of torchvision's fake ``nms`` (once per process; it only shapes traces)."""
    global _nms_shape_registered
    if not _nms_shape_registered:
        torch.library.register_fake("torchvision::nms", _nms_shape, allow_override=True)
        _nms_shape_registered = True


@contextlib.contextmanager
def traceable_detector() -> Iterator[None]:
    """While exporting a Faster R-CNN or Mask R-CNN with ``torch.export``: the RPN's and box head's per-class
    NMS (both call ``torchvision.ops.boxes.batched_nms``) without data-dependent branches, the input resize
    without a branch on the image's shape, and Mask R-CNN's masks chosen by class and pasted without a loop or a
    guard on their number (:func:`paste_masks_in_image`); and the traced NMS may keep any number of boxes,
    none included (:func:`_nms_shape`). (The RoI pooler, ``tasks.heads.faster_rcnn.RoIAlignPooler``, is
    traceable as it is.)"""
    _register_nms_shape()
    with (
        mock.patch.object(box_ops, "batched_nms", _one_nms_for_all_classes),
        mock.patch.object(rcnn_transform, "_resize_image_and_masks", _resize_by_symbolic_scale),
        mock.patch.object(rcnn_transform.GeneralizedRCNNTransform, "batch_images", _pad_one_image),
        mock.patch.object(rcnn_transform, "paste_masks_in_image", paste_masks_in_image),
        mock.patch.object(rcnn_roi_heads, "maskrcnn_inference", _mask_probabilities),
        mock.patch.object(det_utils.BoxCoder, "decode", _decode_without_branches),
    ):
        yield
