"""Semantic masks from COCO instance annotations: label sets, rasterization, and the on-disk mask cache.

Each image's instances are rasterized once by pycocotools (polygons, RLE and crowd RLE alike) into one
class-index mask and cached as a PNG; ``IGNORE_INDEX`` marks pixels the loss and the metrics skip.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from .coco_format import is_polygon
from .validation import DataValidationError

#: COCO category ids of the 20 PASCAL VOC classes, in VOC's class order (class 0 is the background):
#: the label set of torchvision's COCO-trained FCN and DeepLab models.
VOC_CATEGORY_IDS: tuple[int, ...] = (5, 2, 16, 9, 44, 6, 3, 17, 62, 21, 67, 18, 19, 4, 1, 64, 20, 63, 7, 72)
VOC_CLASS_NAMES: tuple[str, ...] = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip
IGNORE_INDEX = 255
#: COCO's own names of those ids (instances_{train,val}2017.json), to recognize COCO's category list.
VOC_COCO_NAMES: dict[int, str] = {
    5: "airplane", 2: "bicycle", 16: "bird", 9: "boat", 44: "bottle", 6: "bus", 3: "car", 17: "cat", 62: "chair",
    21: "cow", 67: "dining table", 18: "dog", 19: "horse", 4: "motorcycle", 1: "person", 64: "potted plant",
    20: "sheep", 63: "couch", 7: "train", 72: "tv",
}  # fmt: skip


def check_voc_categories(categories: list[dict], source: str) -> None:
    """``voc`` picks COCO's VOC categories by id: refuse a file whose ids mean something else (a dataset
    with its own categories would have them relabeled as VOC classes without a word)."""
    present = [c for c in categories if c.get("id") in VOC_COCO_NAMES]
    wrong = [c for c in present if str(c.get("name", "")).strip().lower() != VOC_COCO_NAMES[c["id"]]]
    if present and not wrong:
        return
    found = (
        f"names id {wrong[0]['id']} {wrong[0].get('name')!r} (COCO's is {VOC_COCO_NAMES[wrong[0]['id']]!r})"
        if wrong
        else "has none of their ids"
    )
    raise DataValidationError(
        f"data.categories=voc takes COCO's 20 PASCAL VOC categories by their COCO ids (1 person, 2 bicycle, "
        f"3 car, ...), but {source} {found}: these are not COCO's categories. Set data.categories: all to "
        f"segment the file's own categories."
    )


def category_classes(categories: list[dict], label_set: str) -> tuple[dict[int, int], list[str]]:
    """``(category id -> class index, class names)`` for ``voc`` (21 classes) or ``all`` (categories + 1)."""
    if label_set == "voc":
        return {cid: i + 1 for i, cid in enumerate(VOC_CATEGORY_IDS)}, list(VOC_CLASS_NAMES)
    if label_set == "all":
        ordered = sorted(categories, key=lambda c: c["id"])
        return {c["id"]: i + 1 for i, c in enumerate(ordered)}, ["background", *[c["name"] for c in ordered]]
    raise ValueError(f"data.categories={label_set!r} must be 'voc' or 'all'")


MaskRules = Literal["default", "torchvision"]


def instance_mask(coco, ann: dict):
    """The annotation's region (``H x W`` bool numpy array) by ``pycocotools``' ``annToMask``, without its
    degenerate polygons (fewer than 3 points), which pycocotools would read as a box or reject with a
    ``TypeError`` when they come first."""
    segmentation = ann.get("segmentation")
    if isinstance(segmentation, list):
        polygons = [p for p in segmentation if is_polygon(p)]
        if not polygons:
            info = coco.imgs[ann["image_id"]]
            return np.zeros((info["height"], info["width"]), dtype=bool)
        ann = {**ann, "segmentation": polygons}
    return coco.annToMask(ann).astype(bool)


def semantic_mask(coco, image_id: int, classes: dict[int, int], rules: MaskRules = "default"):
    """Rasterize an image's instances into one class-index mask (``H x W`` uint8 numpy array).

    Polygons, RLE and crowd RLE all go through ``pycocotools``' ``annToMask`` (``instance_mask``);
    instances of categories outside the label set are background. ``default`` rules: pixels covered by
    instances of *different* classes, and crowd regions of a class in the label set, become 255 (ignored
    by the loss and the metrics). ``torchvision`` rules (its reference scripts, which produced its
    published FCN numbers): crowd regions count as instances of their class, and any pixel covered by
    two or more instances becomes 255.
    """
    info = coco.imgs[image_id]
    class_map = np.zeros((info["height"], info["width"]), dtype=np.uint8)
    ignore = np.zeros(class_map.shape, dtype=bool)
    if rules == "torchvision":
        coverage = np.zeros(class_map.shape, dtype=np.uint16)
        for ann in coco.imgToAnns.get(image_id, []):
            cls = classes.get(ann["category_id"])
            if cls is not None:
                region = instance_mask(coco, ann)
                coverage += region
                np.maximum(class_map, np.where(region, cls, 0).astype(np.uint8), out=class_map)
        class_map[coverage > 1] = IGNORE_INDEX
        return class_map
    for ann in coco.imgToAnns.get(image_id, []):
        cls = classes.get(ann["category_id"])
        if cls is None:
            continue
        region = instance_mask(coco, ann)
        if ann.get("iscrowd", 0):
            ignore |= region
            continue
        ignore |= region & (class_map > 0) & (class_map != cls)
        class_map[region & (class_map == 0)] = cls
    class_map[ignore] = IGNORE_INDEX
    return class_map


class MaskCache:
    """Class-index masks of one annotation file, rasterized on first use and kept as ``<image id>.png``.

    Args:
        folder: where the PNG files go (one folder per annotation file, label set and rules).
        coco: the annotation file's ``COCO`` object.
        classes: category id to class index.
        rules: how overlaps and crowds are labeled (:func:`semantic_mask`).
    """

    def __init__(self, folder: Path, coco, classes: dict[int, int], rules: MaskRules = "default") -> None:
        self.folder = Path(folder)
        self.coco = coco
        self.classes = classes
        self.rules = rules

    def __call__(self, image_id: int) -> torch.Tensor:
        """The class-index mask (``1 x H x W`` uint8), from the cache or rasterized and cached now."""
        from torchvision.io import ImageReadMode, decode_png, encode_png, read_file

        path = self.folder / f"{image_id}.png"
        if path.is_file():
            try:
                return decode_png(read_file(str(path)), mode=ImageReadMode.GRAY)
            except RuntimeError:
                path.unlink(missing_ok=True)  # a damaged cache entry is rebuilt
        mask = torch.from_numpy(semantic_mask(self.coco, image_id, self.classes, self.rules))[None]
        self.folder.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.tmp")
        partial.write_bytes(encode_png(mask).numpy().tobytes())
        os.replace(partial, path)  # atomic: concurrent workers never see half a file
        return mask


def cache_folder(annotations: Path, base: str | None, *key: str) -> Path:
    """The mask cache's folder for ``annotations`` (under ``base``, default ``~/.cache/residual-zoo/coco_masks``),
    keyed by the file's path, size and modification time and by ``key`` (label set, rules): an edited file
    or another label set never reads stale masks."""
    import hashlib

    if base:
        root = Path(base).expanduser()
    else:
        root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "residual-zoo" / "coco_masks"
    stat = annotations.stat()
    text = "|".join([str(annotations.resolve()), str(stat.st_size), str(stat.st_mtime_ns), *key])
    return root / f"{annotations.stem}-{hashlib.sha1(text.encode()).hexdigest()[:12]}"
