"""ImageNet localization's errors, as the ILSVRC devkit (``eval_localization``) defines them.

An image has one class and one or more boxes of it. A guess is a ``(class, box)`` pair; a guess is right
when its class is the image's and its box overlaps one of the image's boxes with IoU >= 0.5. The **top-5
localization error** of an image is 0 when one of its (up to) five guesses is right, else 1; the
**localization error with the ground-truth class** takes the one box predicted for the true class. Both
are averaged over the images. IoU is on continuous pixel boxes (the devkit's ``+1`` on inclusive pixels
gives the same numbers, see ``tasks.metrics.devkits``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .devkits import iou


def box_right(box: Sequence[float], truth: np.ndarray, threshold: float = 0.5) -> bool:
    """Whether ``box`` overlaps one of ``truth``'s rows with IoU >= ``threshold``."""
    truth = np.asarray(truth, dtype=np.float64).reshape(-1, 4)
    return bool(len(truth) and iou(np.asarray(box, dtype=np.float64), truth).max() >= threshold)


def top5_error(guesses: Sequence[tuple[int, Sequence[float]]], label: int, truth: np.ndarray) -> int:
    """0 when one of ``guesses`` (at most five are read) has the true ``label`` and a right box, else 1."""
    return 0 if any(c == label and box_right(box, truth) for c, box in list(guesses)[:5]) else 1


def gt_known_error(box: Sequence[float], truth: np.ndarray) -> int:
    """0 when the box predicted for the true class is right, else 1."""
    return 0 if box_right(box, truth) else 1
