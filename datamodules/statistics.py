"""Statistics of a training set that its normalization needs: the per-pixel mean image.

The ResNet paper subtracts "the per-pixel mean" (Sec. 3.4 for ImageNet, after AlexNet; Sec. 4.2 for
CIFAR): the mean over the training images of each pixel position and channel. Here it is estimated from
the training images each resized (shorter side) and center-cropped to the crop size, as the Caffe models'
mean file was, from at most ``limit`` of them taken evenly through the sorted file list (all of a small
set; 10,000 pin ImageNet's mean image down to about a tenth of a gray level), and cached so that every
later run reads it instead of decoding the images again.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torchvision.transforms import v2

from zoo_common.cache import user_cache

from .images import read_image

log = logging.getLogger(__name__)


def pixel_mean(paths: Sequence[str], size: int, limit: int = 10000) -> torch.Tensor:
    """The ``3 x size x size`` mean image (in [0, 1]) of up to ``limit`` of ``paths``, evenly spaced; its
    progress logged at every tenth of the images (decoding 10,000 ImageNet images takes minutes)."""
    if not paths:
        raise ValueError("no training images to compute the per-pixel mean from")
    step = max(1, len(paths) / limit) if limit else 1
    chosen = [paths[int(i * step)] for i in range(min(len(paths), limit or len(paths)))]
    view = v2.Compose([v2.Resize(size, antialias=True), v2.CenterCrop(size)])
    total = torch.zeros(3, size, size, dtype=torch.float64)
    tenth, start = max(1, len(chosen) // 10), time.perf_counter()
    for done, path in enumerate(chosen, start=1):
        total += view(read_image(path)).double()
        if done % tenth == 0 or done == len(chosen):  # ten lines over what can be minutes of decoding
            elapsed = time.perf_counter() - start
            left = elapsed / done * (len(chosen) - done)
            log.info("per-pixel mean: %d/%d images, %.0f s, about %.0f s left", done, len(chosen), elapsed, left)
    return (total / (255.0 * len(chosen))).float()


def cache_path(paths: Sequence[str], size: int, limit: int) -> Path:
    """Where the mean of these files at this size is cached (``~/.cache/residual-zoo/pixel_means``)."""
    base = user_cache("pixel_means")
    key = hashlib.sha1("\n".join([str(size), str(limit), str(len(paths)), *paths]).encode()).hexdigest()[:16]
    return base / f"{key}.pt"


def cached_pixel_mean(paths: Sequence[str], size: int, limit: int = 10000) -> torch.Tensor:
    """:func:`pixel_mean`, computed once per file list and size, then read from the cache."""
    path = cache_path(paths, size, limit)
    if path.is_file():
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except (RuntimeError, EOFError, OSError):  # a damaged cache entry is recomputed
            path.unlink(missing_ok=True)
    log.info("computing the per-pixel mean of %d training images at %d px", min(len(paths), limit), size)
    mean = pixel_mean(paths, size, limit)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".{os.getpid()}.tmp")
    torch.save(mean, partial)
    os.replace(partial, path)  # atomic: another process sees the whole file or none
    return mean
