"""Multi-scale testing as the ResNet paper's COCO entry did it (Appendix A, "Multi-scale testing"; Table 9:
51.1/30.0 -> 53.8/32.5 mAP@.5 / mAP@[.5:.95] on COCO val), on torchvision's Faster R-CNN / Mask R-CNN.

The backbone's feature maps are computed on an image pyramid -- shorter sides 200, 400, 600, 800, 1000 by
default (:data:`PAPER_SIDES`; the longer side capped in proportion to the detector's ``max_size``). The RPN
runs once, at the detector's own (training) scale. For each region the two *adjacent* scales are chosen
whose scaled region brackets the pre-trained network's input size, 224 px (:func:`choose_scales`: SPPnet's
rule of the scale whose scaled window is closest to 224 x 224, He et al. 2014, Section 3.1, taken as a pair of
adjacent scales as in Ren et al.'s "Object detection networks on convolutional feature maps", which the paper
follows); RoI pooling and the per-region layers (the box head: res5 for C4, the MLP for FPN) run at both, and
the two region features are merged by maxout -- their element-wise maximum -- before the class and box layers.
Boxes are regressed from the region at the training scale; a Mask R-CNN's masks are predicted there too.

This differs from ``--model.tta`` (``tasks.heads.tta``), which runs the *whole* detector on each view and
merges the views' detections by NMS (detectron2's way): here one set of proposals is scored once, each region
by the scales that suit its size. ``--model.multiscale_testing [200, 400, 600, 800, 1000]`` turns it on
(``detect``, ``instance_segment``), for evaluation and prediction; with ``--model.box_refinement`` both
passes read the pyramid. With one scale, the detector's own, it is plain testing exactly (tested).
``--model.multiscale_target`` moves the 224 px (for a detector trained from scratch on small objects, say,
whose regions never reach 224 px at any scale of the pyramid).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .region_passes import Stage, candidates, select

#: the paper's pyramid (shorter sides, pixels)
PAPER_SIDES = (200, 400, 600, 800, 1000)
#: the size the scaled region is brought nearest: the pre-trained network's input (SPPnet, Section 3.1)
TARGET = 224


def choose_scales(sides: Tensor, ratios: Sequence[float], target: float = TARGET) -> tuple[Tensor, Tensor]:
    """For regions of size ``sides`` (``sqrt(w h)`` at the training scale) and the pyramid's scales (``ratios``
    to the training scale, ascending), the indices of the two adjacent scales between which the scaled region
    ``side x ratio`` reaches ``target``: ``(k - 1, k)`` for the first scale ``k`` at which it does; the two
    largest when it never does, the two smallest when it already does at the smallest; ``(0, 0)`` with one
    scale."""
    scaled = sides[:, None] * sides.new_tensor(list(ratios))[None, :]
    reached = scaled >= target
    largest = len(ratios) - 1
    upper = torch.where(
        reached.any(1), reached.to(torch.int64).argmax(1), torch.full_like(sides, largest, dtype=torch.int64)
    )
    upper = upper.clamp(min=min(1, largest))
    return (upper - 1).clamp(min=0), upper


class PyramidStage(Stage):
    """:class:`Stage` whose region features are the maxout of two pyramid scales' (the module docstring)."""

    def __init__(self, detector, images: list[Tensor], sides: Sequence[int] = PAPER_SIDES,
                 target: float = TARGET) -> None:  # fmt: skip
        super().__init__(detector, images)
        self.target = target
        if not sides:
            raise ValueError(
                "model.multiscale_testing is empty: give the pyramid's shorter sides, e.g. [200, 400, 600]"
            )
        transform = detector.transform
        own = transform.min_size[-1]
        self.levels: list[tuple[dict[str, Tensor], list[tuple[int, int]], Tensor]] = []
        for side in sorted(sides):
            if side == own:  # the detector's own scale: its features, computed once
                self.levels.append((self.features, self.sizes, torch.ones(len(self.sizes), 4)))
                continue
            saved = transform.min_size, transform.max_size
            try:
                transform.min_size, transform.max_size = (side,), round(transform.max_size * side / own)
                batch, _ = transform(images)
            finally:
                transform.min_size, transform.max_size = saved
            factors = torch.tensor(
                [[w / ow, h / oh, w / ow, h / oh] for (h, w), (oh, ow) in zip(batch.image_sizes, self.sizes)]
            )
            self.levels.append((detector.backbone(batch.tensors), batch.image_sizes, factors))

    def scales_of(self, regions: list[Tensor]) -> list[tuple[Tensor, Tensor]]:
        """Each image's regions' two scales (indices into the pyramid, ascending): :func:`choose_scales`."""
        chosen = []
        for i, boxes in enumerate(regions):
            ratios = [float(factors[i, 1]) for _, _, factors in self.levels]
            sides = ((boxes[:, 2] - boxes[:, 0]).clamp(min=0) * (boxes[:, 3] - boxes[:, 1]).clamp(min=0)).sqrt()
            chosen.append(choose_scales(sides, ratios, self.target))
        return chosen

    def region_features(self, regions: list[Tensor]) -> Tensor:
        """The maxout of the box head's features at each region's two scales."""
        chosen = self.scales_of(regions)
        offsets = torch.tensor([0, *[len(r) for r in regions]]).cumsum(0)
        lower = upper = None
        for k, (features, sizes, factors) in enumerate(self.levels):
            picked = [torch.where((lo == k) | (hi == k))[0] for lo, hi in chosen]
            if not any(len(p) for p in picked):
                continue
            scaled = [r[p] * factors[i].to(r) for i, (r, p) in enumerate(zip(regions, picked))]
            found = self.heads.box_head(self.heads.box_roi_pool(features, scaled, sizes))
            where = torch.cat([p + offsets[i] for i, p in enumerate(picked)])
            as_lower = torch.cat([lo[p] == k for (lo, _), p in zip(chosen, picked)])
            as_upper = torch.cat([hi[p] == k for (_, hi), p in zip(chosen, picked)])
            if lower is None:
                lower = found.new_zeros((int(offsets[-1]), found.shape[1]))
                upper = lower.clone()
            lower[where[as_lower]] = found[as_lower]
            upper[where[as_upper]] = found[as_upper]
        if lower is None:  # no regions at all
            return super().region_features(regions)
        return torch.maximum(lower, upper)


@torch.no_grad()
def detect_multiscale(detector, images: list[Tensor], sides: Sequence[int] = PAPER_SIDES,
                      target: float = TARGET) -> list[dict[str, Tensor]]:  # fmt: skip
    """torchvision's Faster R-CNN or Mask R-CNN ``detector`` (in eval mode) on ``images`` with multi-scale
    testing on the pyramid ``sides``, each region at the two scales around ``target`` px (the module
    docstring); outputs as the detector's own."""
    stage = PyramidStage(detector, images, sides, target)
    probabilities, boxes = stage.predict(stage.proposals)
    return stage.finish(select(stage.heads, candidates(stage.heads, probabilities, boxes, stage.counts, stage.sizes)))
