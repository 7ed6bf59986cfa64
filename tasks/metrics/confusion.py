"""Segmentation's scores from a confusion matrix: per-class IoU, mean IoU and pixel accuracy (the FCN paper's
Sec. 5 definitions; torchmetrics accumulates the matrix over the split and across ranks)."""

from __future__ import annotations

import torch
from torch import Tensor


@torch.no_grad()
def confusion_scores(confusion: Tensor) -> dict[str, Tensor]:
    """Per-class IoU, mean IoU and pixel accuracy from a confusion matrix (rows: truth, columns: prediction).

    Classes that appear neither in the truth nor in the predictions have no IoU (NaN) and are left out
    of the mean.
    """
    confusion = confusion.double()
    tp = confusion.diag()
    union = confusion.sum(0) + confusion.sum(1) - tp
    iou = torch.where(union > 0, tp / union.clamp_min(1), torch.full_like(tp, float("nan")))
    total = confusion.sum()
    return {
        "iou": iou,
        "mIoU": iou.nanmean() if (union > 0).any() else torch.zeros((), dtype=torch.float64),
        "pixel_acc": tp.sum() / total if total > 0 else torch.zeros((), dtype=torch.float64),
    }
