"""Plain modules for whole-model export (``tasks.export``): a network's outputs as plain tensors, a detector
on one image, and the patches that make torchvision's Faster R-CNN traceable by ``torch.export``.

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


@contextlib.contextmanager
def traceable_detector() -> Iterator[None]:
    """While exporting a Faster R-CNN with ``torch.export``: the RPN's and box head's per-class NMS (both call
    ``torchvision.ops.boxes.batched_nms``) without data-dependent branches, and the input resize without a
    branch on the image's shape. (The RoI pooler, ``tasks.heads.faster_rcnn.RoIAlignPooler``, is traceable as
    it is.)"""
    with (
        mock.patch.object(box_ops, "batched_nms", _one_nms_for_all_classes),
        mock.patch.object(rcnn_transform, "_resize_image_and_masks", _resize_by_symbolic_scale),
        mock.patch.object(rcnn_transform.GeneralizedRCNNTransform, "batch_images", _pad_one_image),
    ):
        yield
