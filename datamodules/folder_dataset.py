"""The ImageFolder dataset: a packed buffer of image paths and an array of labels, each image decoded when it
is read (``datamodules.images``), then transformed on the CPU or handed raw to the GPU decoder."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from .gpu_decode import encoded_item, on_cpu
from .images import MemoryImage, read_image_or_skip
from .records import pack, unpack


class ImageFolderDataset(Dataset):
    """``(path, label)`` samples decoded and transformed on access.

    Args:
        samples: ``(path, label)`` pairs; ``label`` is -1 for unlabeled (prediction) images.
        transform: a callable on ``3 x H x W`` uint8 tensors.
        skip_corrupt: return ``None`` for an unreadable file (logged with its path, dropped by the
            collate function and counted) instead of raising :class:`CorruptImageError`.
    """

    def __init__(
        self,
        samples: Sequence[tuple[str, int]],
        transform,
        skip_corrupt: bool = False,
        raw: bool = False,
        draw: Callable[[int, int], dict[str, torch.Tensor]] | None = None,
        cpu_share: float = 0.0,
    ) -> None:
        # flat arrays, not a list of tuples: loader workers do not copy them (see datamodules.records)
        self.paths, self.path_offsets = pack([str(path).encode() for path, _ in samples])
        self.labels = np.asarray([label for _, label in samples], dtype=np.int64)
        memory = [path for path, _ in samples if isinstance(path, MemoryImage)]  # pixels: kept as objects
        self.memory = [path for path, _ in samples] if memory else None
        self.transform = transform
        self.skip_corrupt = skip_corrupt
        self.raw = raw
        self.draw = draw
        self.cpu_share = cpu_share

    def __len__(self) -> int:
        return len(self.labels)

    def sample(self, index: int) -> tuple[str, int]:
        path = self.memory[index] if self.memory else unpack(self.paths, self.path_offsets, index)
        return path, int(self.labels[index])

    @property
    def samples(self) -> list[tuple[str, int]]:  # every (path, label), built on demand
        return [self.sample(i) for i in range(len(self))]

    def __getitem__(self, index: int) -> dict | None:
        path, label = self.sample(index)
        if self.raw:
            return self._raw_item(path, label, index)
        image = read_image_or_skip(path, self.skip_corrupt)
        if image is None:
            return None
        return {"image": self.transform(image), "label": label, "index": index, "path": path}

    def on_cpu(self, index: int) -> bool:
        """Whether training sample ``index`` is finished by the worker on the GPU path (``cpu_share``)."""
        return self.draw is not None and on_cpu(index, self.cpu_share)

    def _raw_item(self, path: str, label: int, index: int) -> dict | None:
        sample = {"label": label, "index": index, "path": path}
        return encoded_item(sample, self.transform, self.draw, self.on_cpu(index), self.skip_corrupt)
