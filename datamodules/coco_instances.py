"""COCO instance annotations as distributed, for instance segmentation (``tasks.instance_segment``).

The files, splits, categories and boxes are detection's (``datamodules.coco_detection``: crowds and boxes a
pixel thin or less out of the training targets, images without a box skipped for training); each kept
object also carries its mask, rasterized from its polygons or RLE by pycocotools when the sample is read
(``datamodules.masks.InstanceRegions``: the annotation file's regions in flat arrays, never a
``COCO`` index and never every decoded mask in memory). The masks are ``tv_tensors.Mask`` and go through
the same ``transforms.v2`` flip as the boxes; the detector resizes both. Crowd regions are left to
COCOeval (which ignores detections on them), as detectron2 leaves them out of training.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torchvision import tv_tensors

from .coco_detection import COCODetectionDataModule, COCODetectionDataset
from .masks import InstanceRegions


class COCOInstanceDataset(COCODetectionDataset):
    """A COCO split's detection samples with each object's ``masks`` (``K x H x W`` uint8, at the image's
    size, in the order of its boxes)."""

    def __init__(
        self, images_dir: str | Path, dataset: dict, train: bool, transform=None, skip_corrupt: bool = False
    ) -> None:
        self.regions = InstanceRegions.from_dataset(dataset)
        super().__init__(images_dir, dataset, train, transform, skip_corrupt)

    def object_targets(self, index: int, height: int, width: int) -> dict[str, torch.Tensor]:
        start, end = int(self.records.box_offsets[index]), int(self.records.box_offsets[index + 1])
        rows = self.records.sources[start:end]
        masks = np.zeros((len(rows), height, width), dtype=np.uint8)
        for k, row in enumerate(rows.tolist()):
            masks[k] = self.regions.region(row, height, width)
        return {"masks": tv_tensors.Mask(torch.from_numpy(masks))}


class COCOInstanceDataModule(COCODetectionDataModule):
    """COCO (or any COCO-format dataset) for ``tasks.instance_segment``: detection's datamodule (its files,
    loaders and options: :class:`datamodules.coco_detection.COCODetectionDataModule`) whose samples carry
    the objects' masks, scored by COCOeval's ``bbox`` and ``segm`` on the annotation file."""

    def _dataset(self, images: Path, dataset: dict, train: bool) -> COCOInstanceDataset:
        return COCOInstanceDataset(images, dataset, train, self._transform(train), self.hparams.skip_corrupt)
