"""COCO's instances format as distributed (``annotations/instances_{train,val}2017.json``): reading it, and
the format's own definitions (polygons, boxes, areas) -- nothing here knows about datasets or training.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from .records import collection_paused

LAYOUT_HELP = (
    "Expected COCO's layout: <root>/train2017/*.jpg, <root>/val2017/*.jpg and "
    "<root>/annotations/instances_{train,val}2017.json (or set data.train_images, data.train_annotations, ...)."
)


def read_coco_json(path: str | Path) -> dict:
    """The parsed annotation file, with errors that name the file and the problem."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"annotation file {path} does not exist. {LAYOUT_HELP}")
    text = path.read_text()
    try:
        with collection_paused():  # the parse makes millions of objects and no cycle
            dataset = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err}); re-download or regenerate the annotation file") from None
    if not isinstance(dataset, dict):
        raise ValueError(f"{path}: a COCO annotation file is a JSON object, not a {type(dataset).__name__}")
    missing = [key for key in ("images", "annotations", "categories") if key not in dataset]
    if missing:
        raise ValueError(f"{path}: not a COCO instances file, it lacks the {', '.join(missing)} field(s)")
    return dataset


def is_number(value) -> bool:
    """A finite int or float (not a bool, not NaN or infinite: a NaN coordinate would pass every comparison)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def is_polygon(points) -> bool:
    """A COCO polygon: x, y pairs of at least 3 points (pycocotools reads a list of 4 numbers as a box)."""
    return isinstance(points, list) and len(points) >= 6 and len(points) % 2 == 0


def xywh_to_xyxy_clipped(bbox, width: int, height: int) -> tuple[float, float, float, float]:
    """COCO's ``[x, y, w, h]`` as ``(x1, y1, x2, y2)`` clipped to the image."""
    x, y, w, h = (float(v) for v in bbox)
    x1, y1 = min(max(x, 0.0), width), min(max(y, 0.0), height)
    x2, y2 = min(max(x + w, 0.0), width), min(max(y + h, 0.0), height)
    return x1, y1, x2, y2


def compressed_rle(rle: dict, height: int, width: int) -> dict:
    """A COCO RLE with compressed ``counts`` (crowds carry uncompressed lists of counts), as pycocotools'
    mask functions take it; its ``size`` defaults to the image's."""
    from pycocotools import mask as mask_utils

    if isinstance(rle["counts"], list):
        return mask_utils.frPyObjects(rle, *rle.get("size", (height, width)))
    return rle


def annotation_area(ann: dict, image: dict) -> float:
    """An annotation's area as COCO defines it: of its mask (polygons, RLE), else of its box."""
    from pycocotools import mask as mask_utils

    segmentation = ann.get("segmentation")
    if isinstance(segmentation, list):
        polygons = [p for p in segmentation if is_polygon(p)]
        if polygons:
            rles = mask_utils.frPyObjects(polygons, image["height"], image["width"])
            return float(mask_utils.area(mask_utils.merge(rles)))
    elif isinstance(segmentation, dict) and "counts" in segmentation:
        return float(mask_utils.area(compressed_rle(segmentation, image["height"], image["width"])))
    return float(ann["bbox"][2] * ann["bbox"][3])
