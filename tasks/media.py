"""Turning batches into pictures for W&B: sample predictions, boxes and masks (written once, used by all tasks)."""

from __future__ import annotations

import torch


def to_display(image: torch.Tensor) -> torch.Tensor:
    """A normalized ``3 x H x W`` float image as ``H x W x 3`` uint8 (min-max scaled per image)."""
    image = image.detach().cpu()
    if image.dtype == torch.uint8:
        return image.permute(1, 2, 0)
    image = image.float()
    lo, hi = image.amin(), image.amax()
    scaled = (image - lo) / (hi - lo).clamp_min(1e-6)
    return (scaled * 255).round().to(torch.uint8).permute(1, 2, 0)


def class_palette(num_classes: int) -> torch.Tensor:
    """``num_classes x 3`` uint8 colors, PASCAL VOC's bit-interleaved palette (class 0 black)."""
    colors = torch.zeros(num_classes, 3, dtype=torch.uint8)
    for index in range(num_classes):
        c, value = index, [0, 0, 0]
        for shift in range(7, -1, -1):
            for channel in range(3):
                value[channel] |= ((c >> channel) & 1) << shift
            c >>= 3
        colors[index] = torch.tensor(value, dtype=torch.uint8)
    return colors
