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
from typing import Any

from .coco_files import COCOFiles, unlisted_categories
from .coco_format import LAYOUT_HELP, xywh_to_xyxy_clipped
from .detection import DetectionDataModule, DetectionDataset
from .records import DetectionRecords
from .validation import DataValidationError

log = logging.getLogger(__name__)


def annotations_by_image(dataset: dict) -> dict[int, list[dict]]:
    """``{image id: its annotations in file order}`` of an annotation file's dict (pycocotools'
    ``imgToAnns`` without the rest of its index)."""
    grouped: dict[int, list[dict]] = {}
    for ann in dataset["annotations"]:
        grouped.setdefault(ann["image_id"], []).append(ann)
    return grouped


def coco_records(dataset: dict, dropped: Counter | None = None) -> DetectionRecords:
    """The images of an annotation file's dict with their training boxes (no crowds, no boxes a pixel thin
    or less, no unknown categories: each counted in ``dropped``), sorted by image id."""
    known = {c["id"] for c in dataset.get("categories") or []}
    dropped = Counter() if dropped is None else dropped
    grouped = annotations_by_image(dataset)
    ids, names, sizes, boxes, labels = [], [], [], [], []
    for info in sorted(dataset["images"], key=lambda image: image["id"]):
        kept, categories = [], []
        for ann in grouped.get(info["id"], ()):
            if ann.get("iscrowd", 0):
                continue  # crowd regions are for evaluation only
            if ann.get("category_id") not in known:
                dropped["unknown category"] += 1
                continue
            x1, y1, x2, y2 = xywh_to_xyxy_clipped(ann["bbox"], info["width"], info["height"])
            if x2 - x1 <= 1 or y2 - y1 <= 1:
                dropped["degenerate box"] += 1
                continue
            kept.append((x1, y1, x2, y2))
            categories.append(ann["category_id"])
        ids.append(info["id"])
        names.append(info["file_name"])
        sizes.append((info["width"], info["height"]))
        boxes.append(kept)
        labels.append(categories)
    return DetectionRecords.build(ids, names, sizes, boxes, labels)


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


class COCODetectionDataModule(DetectionDataModule):
    """COCO (or any COCO-format dataset) for ``tasks.detect``, scored by COCOeval on the annotation file.

    Args:
        root: dataset folder; the other paths are relative to it.
        train_images: training image folder.
        train_annotations: training instances file.
        val_images: validation image folder.
        val_annotations: validation instances file (COCOeval's ground truth).
        test_images: test image folder (defaults to the validation split).
        test_annotations: test instances file (defaults to the validation split).
        kwargs: the loaders' options (``batch_size``, ``num_workers``, ``flip_prob``, ...), see
            :class:`datamodules.detection.DetectionDataModule`.
    """

    #: what ``data.root`` must hold (named by command-line errors)
    layout = LAYOUT_HELP
    protocol = "coco"

    def __init__(
        self,
        root: str,
        train_images: str = "train2017",
        train_annotations: str = "annotations/instances_train2017.json",
        val_images: str = "val2017",
        val_annotations: str = "annotations/instances_val2017.json",
        test_images: str | None = None,
        test_annotations: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.files = COCOFiles(
            root, train_images, train_annotations, val_images, val_annotations, test_images, test_annotations
        )
        self.root = self.files.root

    # -- files and categories ---------------------------------------------------------------------
    def split_files(self, split: str) -> tuple[Path, Path]:
        """``(images folder, annotation file)`` of ``train``, ``val`` or ``test``."""
        return self.files.split_files(split)

    def annotation_file(self, split: str) -> Path:
        """The split's annotation file: COCOeval's ground truth."""
        return self.files.annotation_file(split)

    def images_dir(self, split: str) -> Path:
        return self.files.split_files(split)[0]

    def _check_split(self, split: str) -> None:
        self.files.check_split(split)

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
        return COCODetectionDataset(images, dataset, train, self._transform(train), self.hparams.skip_corrupt)

    def _records(self, split: str) -> DetectionRecords:
        return coco_records(self.files.read(split, drop_invalid=self.hparams.drop_invalid))
