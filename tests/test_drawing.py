"""Drawn predictions a person can read (tasks.outputs.drawing): the threshold, a color per class, labels that do
not overlap, small images upscaled, a legend on overlays."""

from __future__ import annotations

import numpy as np
import torch

from tasks.outputs.drawing import class_colors, draw_detections, draw_overlay, place_labels, plan_detections
from tasks.outputs.media import class_palette

NAMES = ["background", "circle", "square", "triangle"]


def _gray(height: int, width: int) -> torch.Tensor:
    return torch.full((3, height, width), 128, dtype=torch.uint8)


def test_boxes_under_the_threshold_are_not_drawn_and_classes_get_their_own_colors():
    out = {
        "boxes": torch.tensor([[10.0, 10.0, 100.0, 100.0], [150.0, 150.0, 250.0, 250.0], [120.0, 20.0, 200.0, 90.0]]),
        "labels": torch.tensor([1, 2, 3]),
        "scores": torch.tensor([0.9, 0.6, 0.3]),
    }
    scale, drawn = plan_detections(out["boxes"], out["labels"], out["scores"], NAMES, 300, 300, threshold=0.5)
    assert scale == 1 and [d.text for d in drawn] == ["circle 0.90", "square 0.60"]
    assert drawn[0].color != drawn[1].color and drawn[0].color == class_colors(4)[1]
    picture = np.asarray(draw_detections(_gray(300, 300), out, NAMES, threshold=0.5))
    assert tuple(picture[60, 10]) == drawn[0].color  # the left edge of the circle's box, in its color
    assert tuple(picture[200, 150]) == drawn[1].color
    assert tuple(picture[60, 120]) == (128, 128, 128)  # the 0.3 box's left edge: not drawn
    assert tuple(picture[60, 200]) == (128, 128, 128)


def test_labels_of_one_image_do_not_overlap():
    """Five boxes stacked on one corner, as a detector's duplicates are: every label finds its own place."""
    boxes = [(20.0 + k, 30.0 + k, 120.0 + k, 130.0 + k) for k in range(5)]
    sizes = [(70.0, 16.0)] * 5
    rects = place_labels(boxes, sizes, 300, 300)
    for i, a in enumerate(rects):
        assert 0 <= a[0] and a[2] <= 300 and 0 <= a[1] and a[3] <= 300  # inside the image
        for b in rects[i + 1 :]:
            assert not (a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]), (a, b)
    assert rects[0] == (20.0, 14.0, 90.0, 30.0)  # the best detection's label sits right above its box
    # through the drawing itself: the labels of two boxes that overlap come apart
    out = {
        "boxes": torch.tensor([[10.0, 10.0, 200.0, 200.0], [12.0, 12.0, 202.0, 202.0]]),
        "labels": torch.tensor([3, 1]),
        "scores": torch.tensor([0.97, 0.63]),
    }
    _, drawn = plan_detections(out["boxes"], out["labels"], out["scores"], NAMES, 300, 300)
    a, b = drawn[0].label, drawn[1].label
    assert not (a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3])


def test_an_image_under_256_px_is_drawn_upscaled():
    out = {"boxes": torch.tensor([[8.0, 8.0, 40.0, 40.0]]), "labels": torch.tensor([2]), "scores": torch.tensor([0.8])}
    picture = draw_detections(_gray(64, 80), out, NAMES)
    assert picture.size == (320, 256)  # 4x: the shorter side reaches 256
    scale, drawn = plan_detections(out["boxes"], out["labels"], out["scores"], NAMES, 64, 80)
    assert scale == 4 and drawn[0].box == (32.0, 32.0, 160.0, 160.0)
    assert draw_detections(_gray(300, 400), out, NAMES).size == (400, 300)  # large enough: as it is
    # float images in [0, 1] are drawn too
    assert draw_detections(torch.rand(3, 64, 80), out, NAMES).size == (320, 256)


def test_overlays_have_a_legend_of_the_classes_present():
    mask = torch.zeros(1, 64, 64, dtype=torch.uint8)
    mask[0, 20:40, 30:50] = 2
    picture = np.asarray(draw_overlay(_gray(64, 64), mask, NAMES))
    assert picture.shape == (256, 256, 3)
    swatch = [tuple(int(v) for v in picture[y, 9]) for y in range(2, 40)]
    assert tuple(int(v) for v in class_palette(4)[2]) in swatch  # the square's swatch in the legend
    assert tuple(int(v) for v in class_palette(4)[0]) in swatch  # and the background's
