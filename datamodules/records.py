"""Per-image detection records in flat numpy arrays, as detectron2 serializes its dataset dicts.

A dataset of Python objects (a dict per image, a tensor per box list) is copied page by page into every
loader worker over an epoch: reading an object writes its reference count. Flat arrays are read without
writing, so the workers share the parent's memory. Every detection format (COCO, PASCAL VOC, ILSVRC)
is read into :class:`DetectionRecords`; the datasets index them.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np


@contextlib.contextmanager
def collection_paused() -> Iterator[None]:
    """No cyclic garbage collection inside: for an annotation file parsed and turned into records. A parsed
    file is millions of small containers and not one cycle; a collection would visit all of them (each young
    collection, and again on their way to the oldest generation: at 1/8 of train2017 most of a setup's time),
    while reference counting frees them all once the records are built."""
    collecting = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if collecting:
            gc.enable()


def offsets(counts: Sequence[int]) -> np.ndarray:
    """``[0, c0, c0 + c1, ...]``: where each of a run of variable-length items starts in one flat array."""
    out = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=out[1:])
    return out


def pack(chunks: Sequence[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """Byte strings as one ``uint8`` buffer and their :func:`offsets` in it."""
    return np.frombuffer(b"".join(chunks), dtype=np.uint8).copy(), offsets([len(c) for c in chunks])


def unpack(buffer: np.ndarray, offsets: np.ndarray, index: int) -> str:
    """String ``index`` of a :func:`pack`-ed buffer."""
    return buffer[offsets[index] : offsets[index + 1]].tobytes().decode()


def _pack_strings(values: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    return pack([v.encode() for v in values])


@dataclass
class DetectionRecords:
    """Images with their boxes (continuous ``x1, y1, x2, y2`` pixels) and labels (dataset category ids).

    ``difficult`` marks objects the benchmark does not score (PASCAL VOC); they are kept here, and the
    training datasets leave them out of the targets.
    """

    ids: np.ndarray  # int64 [n]: the dataset's image ids
    names: np.ndarray  # uint8: file names (relative to the image folder), concatenated
    name_offsets: np.ndarray  # int64 [n + 1]
    widths: np.ndarray  # int32 [n]
    heights: np.ndarray  # int32 [n]
    box_offsets: np.ndarray  # int64 [n + 1]: image i's boxes are rows box_offsets[i]:box_offsets[i + 1]
    boxes: np.ndarray  # float32 [m, 4]
    labels: np.ndarray  # int64 [m]
    difficult: np.ndarray  # bool [m]
    #: int64 [m] or None: each object's row in another per-object table of the split (COCO: its annotation's
    #: row in ``datamodules.masks.InstanceRegions``, where instance segmentation reads its mask)
    sources: np.ndarray | None = None

    @classmethod
    def build(
        cls,
        ids: Sequence[int],
        names: Sequence[str],
        sizes: Sequence[tuple[int, int]],
        boxes: Sequence[Sequence[Sequence[float]]],
        labels: Sequence[Sequence[int]],
        difficult: Sequence[Sequence[bool]] | None = None,
    ) -> DetectionRecords:
        """From per-image lists: ``sizes`` as ``(width, height)``, ``boxes``/``labels`` one list per image."""
        counts = [len(b) for b in boxes]
        box_offsets = offsets(counts)
        flat = [tuple(b) for per_image in boxes for b in per_image]
        packed, name_offsets = _pack_strings(names)
        flags = [bool(f) for per_image in (difficult or [[False] * int(c) for c in counts]) for f in per_image]
        size = np.asarray(sizes, dtype=np.int32).reshape(-1, 2)
        return cls(
            ids=np.asarray(ids, dtype=np.int64),
            names=packed,
            name_offsets=name_offsets,
            widths=size[:, 0].copy(),
            heights=size[:, 1].copy(),
            box_offsets=box_offsets,
            boxes=np.asarray(flat, dtype=np.float32).reshape(-1, 4),
            labels=np.asarray([int(c) for per_image in labels for c in per_image], dtype=np.int64),
            difficult=np.asarray(flags, dtype=bool),
        )

    def __len__(self) -> int:
        return len(self.ids)

    def name(self, index: int) -> str:
        return unpack(self.names, self.name_offsets, index)

    def objects(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Image ``index``'s ``(boxes, labels, difficult)``."""
        start, end = self.box_offsets[index], self.box_offsets[index + 1]
        return self.boxes[start:end], self.labels[start:end], self.difficult[start:end]

    def size(self, index: int) -> tuple[int, int]:
        """``(width, height)`` of image ``index``."""
        return int(self.widths[index]), int(self.heights[index])

    def select(self, keep: np.ndarray) -> DetectionRecords:
        """The records of the images ``keep`` (indices or a mask), in that order."""
        keep = np.flatnonzero(keep) if keep.dtype == bool else np.asarray(keep, dtype=np.int64)
        rows = [np.arange(self.box_offsets[i], self.box_offsets[i + 1]) for i in keep]
        rows = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)
        box_offsets = offsets(self.box_offsets[keep + 1] - self.box_offsets[keep])
        names, name_offsets = _pack_strings([self.name(i) for i in keep])
        return DetectionRecords(
            ids=self.ids[keep], names=names, name_offsets=name_offsets, widths=self.widths[keep],
            heights=self.heights[keep], box_offsets=box_offsets, boxes=self.boxes[rows], labels=self.labels[rows],
            difficult=self.difficult[rows], sources=None if self.sources is None else self.sources[rows],
        )  # fmt: skip

    def ground_truth(self) -> dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """``{image id: (boxes, labels, difficult)}`` of every image: what a devkit metric scores against."""
        return {int(self.ids[i]): self.objects(i) for i in range(len(self))}
