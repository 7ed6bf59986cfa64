"""COCO instance annotations as distributed, for detection (``tasks.detect``).

Layout (COCO 2017, the defaults)::

    <root>/train2017/*.jpg
    <root>/val2017/*.jpg
    <root>/annotations/instances_train2017.json
    <root>/annotations/instances_val2017.json

Boxes are converted from COCO's ``x, y, w, h`` to ``x1, y1, x2, y2`` and clipped to the image; labels
are the COCO category ids. Crowd annotations are kept out of the training targets (COCOeval reads them
from the annotation file); boxes no wider or taller than one pixel are dropped and counted. The rest of
the pipeline is every detection format's (``datamodules.detection``).
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import numpy as np

from .coco_files import COCOSplits, unlisted_categories
from .detection import DetectionDataModule, DetectionDataset
from .records import DetectionRecords, offsets, pack
from .validation import DataValidationError

log = logging.getLogger(__name__)


def coco_records(dataset: dict, dropped: Counter | None = None) -> DetectionRecords:
    """The images of an annotation file's dict with their training boxes (no crowds, no boxes a pixel thin
    or less, no unknown categories: each counted in ``dropped``), sorted by image id, each image's boxes in
    file order; ``sources`` holds each box's annotation row in :class:`datamodules.masks.InstanceRegions` of
    the same dict (where its mask is). Built with whole-array operations: one pass over the annotations
    collects their fields."""
    dropped = Counter() if dropped is None else dropped
    images = sorted(dataset["images"], key=lambda image: image["id"])
    ids = np.asarray([image["id"] for image in images], dtype=np.int64)
    sizes = np.asarray([(image["width"], image["height"]) for image in images], dtype=np.float64).reshape(-1, 2)
    anns = dataset["annotations"]
    rows = np.searchsorted(ids, np.fromiter((a["image_id"] for a in anns), dtype=np.int64, count=len(anns)))
    categories = np.fromiter((a.get("category_id", -1) for a in anns), dtype=np.int64, count=len(anns))
    crowd = np.fromiter((bool(a.get("iscrowd", 0)) for a in anns), dtype=bool, count=len(anns))
    xywh = np.asarray([a["bbox"] for a in anns], dtype=np.float64).reshape(-1, 4)
    width, height = sizes[rows, 0], sizes[rows, 1]  # boxes clipped to the image, as xywh_to_xyxy_clipped
    x1, y1 = np.clip(xywh[:, 0], 0, width), np.clip(xywh[:, 1], 0, height)
    x2, y2 = np.clip(xywh[:, 0] + xywh[:, 2], 0, width), np.clip(xywh[:, 1] + xywh[:, 3], 0, height)
    known = np.isin(categories, [c["id"] for c in dataset.get("categories") or []]) & ~crowd  # crowds: eval only
    thick = (x2 - x1 > 1) & (y2 - y1 > 1)
    for kind, count in (("unknown category", (~crowd & ~known).sum()), ("degenerate box", (known & ~thick).sum())):
        if count:
            dropped[kind] += int(count)
    keep = np.flatnonzero(known & thick)
    by_image = np.argsort(rows, kind="stable")  # by image, file order within one: InstanceRegions' rows
    region_row = np.empty(len(anns), dtype=np.int64)
    region_row[by_image] = np.arange(len(anns))
    keep = keep[np.argsort(rows[keep], kind="stable")]
    names, name_offsets = pack([image["file_name"].encode() for image in images])
    return DetectionRecords(
        ids=ids, names=names, name_offsets=name_offsets, widths=sizes[:, 0].astype(np.int32),
        heights=sizes[:, 1].astype(np.int32), box_offsets=offsets(np.bincount(rows[keep], minlength=len(ids))),
        boxes=np.stack([x1, y1, x2, y2], axis=1)[keep].astype(np.float32), labels=categories[keep],
        difficult=np.zeros(len(keep), dtype=bool), sources=region_row[keep],
    )  # fmt: skip


class COCODetectionDataset(DetectionDataset):
    """A COCO split's :class:`~datamodules.detection.DetectionDataset` built from its annotation file's dict
    (which it does not keep: loader workers read only flat arrays), with what was left out of the training
    targets (``dropped``)."""

    def __init__(
        self, images_dir: str | Path, dataset: dict, train: bool, transform=None, skip_corrupt: bool = False
    ) -> None:
        self.dropped: Counter = Counter()
        super().__init__(images_dir, coco_records(dataset, self.dropped), train, transform, skip_corrupt)
        if self.dropped and train:
            summary = ", ".join(f"{n} x {kind}" for kind, n in sorted(self.dropped.items()))
            log.warning("%s: dropped from the training targets: %s", images_dir, summary)


class COCODetectionDataModule(COCOSplits, DetectionDataModule):
    """COCO (or any COCO-format dataset) for ``tasks.detect``, scored by COCOeval on the annotation file.

    The files are named by :class:`datamodules.coco_files.COCOSplits`'s arguments (``root``, ``train_images``,
    ``train_annotations``, ``val_images``, ``val_annotations``, ``test_images``, ``test_annotations``); the
    loaders' options (``batch_size``, ``num_workers``, ``flip_prob``, ...) are
    :class:`datamodules.detection.DetectionDataModule`'s.
    """

    protocol = "coco"
    #: the validation file lists the classes: read first, it is parsed once, not twice
    first_split = "val"

    def images_dir(self, split: str) -> Path:
        return self.files.split_files(split)[0]

    @property
    def categories(self) -> list[dict]:
        """COCO categories (``id``, ``name``) sorted by id, from the validation (else training) file."""
        return self.files.categories

    # -- datasets -----------------------------------------------------------------------------------
    def _split(self, split: str) -> COCODetectionDataset:
        dataset = self.files.read(split, drop_invalid=self.hparams.drop_invalid)
        images, annotations = self.split_files(split)
        train = split == "train"
        unknown = unlisted_categories(dataset, self.category_ids)
        if train and unknown:  # the model's classes are the validation file's categories
            raise DataValidationError(
                f"{annotations} annotates categories {unknown[:10]} that {self.annotation_file('val')} does not "
                f"list; the detector's classes come from the validation file's list. Give both files the same "
                f"'categories' (COCO's share theirs)."
            )
        return self._dataset(images, dataset, train)

    def _dataset(self, images: Path, dataset: dict, train: bool) -> COCODetectionDataset:
        """The split's dataset from its annotation file's dict (instance segmentation's carries masks)."""
        return COCODetectionDataset(images, dataset, train, self._transform(train), self.hparams.skip_corrupt)

    def _records(self, split: str) -> DetectionRecords:
        return coco_records(self.files.read(split, drop_invalid=self.hparams.drop_invalid))
