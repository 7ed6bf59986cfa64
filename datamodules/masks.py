"""Semantic masks from COCO instance annotations: label sets, rasterization, and the on-disk mask cache.

The annotation file's instances are kept in flat arrays (:class:`InstanceRegions`); each image's are
rasterized once by pycocotools (polygons, RLE and crowd RLE alike) into one class-index mask and cached as
a PNG; ``IGNORE_INDEX`` marks pixels the loss and the metrics skip.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from zoo_common.cache import user_cache

from .coco_format import compressed_rle, is_polygon
from .records import offsets, pack, unpack
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


def _rle_of(segmentation: dict, height: int, width: int) -> bytes:
    """A COCO RLE (compressed, or uncompressed ``counts`` lists as crowds carry them) as compressed bytes."""
    counts = compressed_rle(segmentation, height, width)["counts"]
    return counts if isinstance(counts, bytes) else counts.encode()


@dataclass
class InstanceRegions:
    """Each image's instances (category, crowd flag, area, region) in flat numpy arrays, sorted by image id,
    annotations in file order: what segmentation rasterizes, without the annotation file's Python objects
    (which every loader worker would copy page by page; see ``datamodules.records``).

    A region is polygons (coordinates in ``coords``, polygons of fewer than 3 points left out, as the
    validation warns) or a compressed RLE (bytes in ``rle``, its ``H x W`` in ``rle_sizes``); an annotation
    with neither covers no pixel.
    """

    ids: np.ndarray  # int64 [n]
    names: np.ndarray  # uint8: file names, concatenated
    name_offsets: np.ndarray  # int64 [n + 1]
    widths: np.ndarray  # int32 [n]
    heights: np.ndarray  # int32 [n]
    ann_offsets: np.ndarray  # int64 [n + 1]: image i's annotations are ann_offsets[i]:ann_offsets[i + 1]
    categories: np.ndarray  # int64 [m]
    crowd: np.ndarray  # bool [m]
    areas: np.ndarray  # float64 [m]: the file's 'area'
    polygon_offsets: np.ndarray  # int64 [m + 1]: annotation j's polygons
    point_offsets: np.ndarray  # int64 [p + 1]: polygon k's coordinates in ``coords``
    coords: np.ndarray  # float64 [c]: x, y, x, y, ...
    rle_offsets: np.ndarray  # int64 [m + 1]: annotation j's RLE bytes (none for polygons)
    rle: np.ndarray  # uint8 [r]
    rle_sizes: np.ndarray  # int32 [m, 2]: an RLE's height and width

    @classmethod
    def from_dataset(cls, dataset: dict) -> InstanceRegions:
        """From an annotation file's dict (already validated: ``datamodules.coco_files.read_validated``)."""
        images = sorted(dataset["images"], key=lambda image: image["id"])
        order = {image["id"]: i for i, image in enumerate(images)}
        grouped: list[list[dict]] = [[] for _ in images]
        for ann in dataset["annotations"]:
            grouped[order[ann["image_id"]]].append(ann)
        anns = [ann for per_image in grouped for ann in per_image]
        polygons: list[list[float]] = []
        polygon_counts, rles, rle_sizes = [], [], []
        for image, per_image in zip(images, grouped):
            for ann in per_image:
                segmentation = ann.get("segmentation")
                kept = [p for p in segmentation if is_polygon(p)] if isinstance(segmentation, list) else []
                polygons.extend(kept)
                polygon_counts.append(len(kept))
                if isinstance(segmentation, dict) and "counts" in segmentation:
                    rles.append(_rle_of(segmentation, image["height"], image["width"]))
                    rle_sizes.append(segmentation.get("size", (image["height"], image["width"])))
                else:
                    rles.append(b"")
                    rle_sizes.append((0, 0))
        names, name_offsets = pack([image["file_name"].encode() for image in images])
        rle, rle_offsets = pack(rles)
        return cls(
            ids=np.asarray([image["id"] for image in images], dtype=np.int64),
            names=names,
            name_offsets=name_offsets,
            widths=np.asarray([image["width"] for image in images], dtype=np.int32),
            heights=np.asarray([image["height"] for image in images], dtype=np.int32),
            ann_offsets=offsets([len(per_image) for per_image in grouped]),
            categories=np.asarray([ann["category_id"] for ann in anns], dtype=np.int64),
            crowd=np.asarray([bool(ann.get("iscrowd", 0)) for ann in anns], dtype=bool),
            areas=np.asarray([float(ann.get("area", 0.0)) for ann in anns], dtype=np.float64),
            polygon_offsets=offsets(polygon_counts),
            point_offsets=offsets([len(p) for p in polygons]),
            coords=np.fromiter((v for p in polygons for v in p), dtype=np.float64),
            rle_offsets=rle_offsets,
            rle=rle,
            rle_sizes=np.asarray(rle_sizes, dtype=np.int32).reshape(-1, 2),
        )

    def __len__(self) -> int:
        return len(self.ids)

    def name(self, index: int) -> str:
        return unpack(self.names, self.name_offsets, index)

    def info(self, index: int) -> dict:
        """Image ``index``'s ``id``, ``file_name``, ``width`` and ``height`` (as the file's ``images`` entry)."""
        return {"id": int(self.ids[index]), "file_name": self.name(index), "width": int(self.widths[index]),
                "height": int(self.heights[index])}  # fmt: skip

    def annotations(self, index: int) -> range:
        """The rows of image ``index``'s annotations."""
        return range(int(self.ann_offsets[index]), int(self.ann_offsets[index + 1]))

    def region(self, row: int, height: int, width: int) -> np.ndarray:
        """Annotation ``row``'s pixels (``height x width`` bool), rasterized by pycocotools (``frPyObjects``,
        ``merge``, ``decode``: what its ``annToMask`` does)."""
        from pycocotools import mask as mask_utils

        first, last = int(self.polygon_offsets[row]), int(self.polygon_offsets[row + 1])
        start, end = int(self.rle_offsets[row]), int(self.rle_offsets[row + 1])
        if last > first:
            points = self.point_offsets[first : last + 1]
            polygons = [self.coords[a:b].tolist() for a, b in zip(points[:-1], points[1:])]
            rle = mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
        elif end > start:
            rle = {"size": self.rle_sizes[row].tolist(), "counts": self.rle[start:end].tobytes()}
        else:
            return np.zeros((height, width), dtype=bool)
        return mask_utils.decode(rle).astype(bool)

    def annotated_areas(self, classes: dict[int, int]) -> np.ndarray:
        """Each image's summed ``area`` of its annotations of the label set (float64 [n], file order within an
        image, as a loop would add them)."""
        listed = np.isin(self.categories, list(classes))
        image = np.repeat(np.arange(len(self)), np.diff(self.ann_offsets))
        return np.bincount(image[listed], weights=self.areas[listed], minlength=len(self))


def semantic_mask(regions: InstanceRegions, index: int, classes: dict[int, int], rules: MaskRules = "default"):
    """Rasterize image ``index``'s instances into one class-index mask (``H x W`` uint8 numpy array).

    Polygons, RLE and crowd RLE all go through pycocotools (:meth:`InstanceRegions.region`); instances of
    categories outside the label set are background. ``default`` rules: pixels covered by instances of
    *different* classes, and crowd regions of a class in the label set, become 255 (ignored by the loss and
    the metrics). ``torchvision`` rules (its reference scripts, which produced its published FCN numbers):
    crowd regions count as instances of their class, and any pixel covered by two or more instances becomes
    255.
    """
    height, width = int(regions.heights[index]), int(regions.widths[index])
    class_map = np.zeros((height, width), dtype=np.uint8)
    ignore = np.zeros(class_map.shape, dtype=bool)
    if rules == "torchvision":
        coverage = np.zeros(class_map.shape, dtype=np.uint16)
        for row in regions.annotations(index):
            cls = classes.get(int(regions.categories[row]))
            if cls is not None:
                region = regions.region(row, height, width)
                coverage += region
                np.maximum(class_map, np.where(region, cls, 0).astype(np.uint8), out=class_map)
        class_map[coverage > 1] = IGNORE_INDEX
        return class_map
    for row in regions.annotations(index):
        cls = classes.get(int(regions.categories[row]))
        if cls is None:
            continue
        region = regions.region(row, height, width)
        if regions.crowd[row]:
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
        regions: the annotation file's instances.
        classes: category id to class index.
        rules: how overlaps and crowds are labeled (:func:`semantic_mask`).
    """

    def __init__(self, folder: Path, regions: InstanceRegions, classes: dict[int, int], rules: MaskRules = "default"):
        self.folder = Path(folder)
        self.regions = regions
        self.classes = classes
        self.rules = rules

    def __call__(self, index: int) -> torch.Tensor:
        """Image ``index``'s class-index mask (``1 x H x W`` uint8), from the cache or rasterized and cached
        now (under the image's id)."""
        from torchvision.io import ImageReadMode, decode_png, encode_png, read_file

        path = self.folder / f"{int(self.regions.ids[index])}.png"
        if path.is_file():
            try:
                return decode_png(read_file(str(path)), mode=ImageReadMode.GRAY)
            except RuntimeError:
                path.unlink(missing_ok=True)  # a damaged cache entry is rebuilt
        mask = torch.from_numpy(semantic_mask(self.regions, index, self.classes, self.rules))[None]
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
        root = user_cache("coco_masks")
    stat = annotations.stat()
    text = "|".join([str(annotations.resolve()), str(stat.st_size), str(stat.st_mtime_ns), *key])
    return root / f"{annotations.stem}-{hashlib.sha1(text.encode()).hexdigest()[:12]}"
