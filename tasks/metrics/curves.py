"""Precision-recall curves as the benchmarks compute them, kept beside the APs they integrate to.

``tasks.metrics.coco`` gives, from COCOeval's precision array ``eval["precision"][T, R, K, A, M]`` (all areas,
100 detections), each class's curve over COCOeval's 101 recall points at IoU 0.50:0.95 (the mean over the ten
thresholds), 0.50 and 0.75, and the same over all classes (the mean over the classes with ground truth): each
curve's mean precision is the AP COCOeval's ``summarize`` reports for it (``mAP``, ``AP50``, ``AP75``,
``AP/<class>``, ``AP50/<class>``). ``tasks.metrics.devkits`` gives each class's raw curve at IoU 0.5 (one point
per ranked detection), whose 11-point or envelope area is the devkit's AP.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PRCurve:
    """``precision[i]`` at ``recall[i]`` for ``name`` (a class, or ``all``) at the IoU threshold(s) ``iou``;
    ``ap`` is the benchmark's AP of this curve."""

    name: str
    iou: str
    recall: list[float]
    precision: list[float]
    ap: float
