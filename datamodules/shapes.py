"""The embedded dataset: colored shapes on textured backgrounds, written in the real on-disk formats.

``generate_classification`` writes an ImageFolder tree (``train/<class>/*.jpg``, ``val/<class>/*.jpg``);
``generate_coco`` writes COCO 2017's layout (``train2017/``, ``val2017/``,
``annotations/instances_{train,val}2017.json``) with polygon segmentations. Both are deterministic for a
given seed and take seconds for a few hundred images. The ``Shapes*DataModule`` classes *are* the
ImageFolder and COCO datamodules, pointed at these files and generating them in ``prepare_data`` when
the folder is empty -- every code path a real dataset takes is exercised.

Classes: circle, square, triangle, star, ring. A ring's polygon goes around the outer circle, cuts in
and around the inner circle backwards, so its hole is part of the polygon (COCO polygons have no holes
otherwise).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import uuid
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from .coco_detection import COCODetectionDataModule
from .coco_instances import COCOInstanceDataModule
from .coco_segmentation import COCOSegmentationDataModule
from .imagefolder import ImageFolderDataModule

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "ring")


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    def ring_points(radius: float, n: int, start: float = 0.0, reverse: bool = False) -> list[tuple[float, float]]:
        steps = range(n, -1, -1) if reverse else range(n + 1)
        return [
            (cx + radius * math.cos(start + 2 * math.pi * i / n), cy + radius * math.sin(start + 2 * math.pi * i / n))
            for i in steps
        ]

    if shape == "circle":
        return ring_points(r, 32)[:-1]
    if shape == "square":
        return ring_points(r, 4, angle)[:-1]
    if shape == "triangle":
        return ring_points(r, 3, angle)[:-1]
    if shape == "star":
        points = []
        for i in range(10):
            radius = r if i % 2 == 0 else r * 0.45
            theta = angle + math.pi * i / 5
            points.append((cx + radius * math.cos(theta), cy + radius * math.sin(theta)))
        return points
    if shape == "ring":
        return ring_points(r, 32) + ring_points(r * 0.55, 32, reverse=True)
    raise ValueError(f"unknown shape {shape!r}; shapes are {', '.join(SHAPES)}")


def _background(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A smooth color gradient plus blurred noise: texture the detector must learn to ignore."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    c0, c1 = rng.uniform(40, 215, 3), rng.uniform(40, 215, 3)
    t = (xx / max(width - 1, 1) * rng.uniform(0, 1) + yy / max(height - 1, 1) * rng.uniform(0, 1))[..., None] / 2
    base = c0 * (1 - t) + c1 * t
    noise = rng.normal(0, 22, (height, width, 3))
    image = Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))
    return image.filter(ImageFilter.GaussianBlur(radius=1.2))


def _color(rng: np.random.Generator) -> tuple[int, int, int]:
    hue = rng.uniform(0, 1)
    rgb = [0.5 + 0.5 * math.cos(2 * math.pi * (hue + k / 3)) for k in range(3)]
    return tuple(int(40 + 200 * c) for c in rgb)


def render(
    rng: np.random.Generator, width: int, height: int, objects: int, min_size: float, max_size: float
) -> tuple[Image.Image, list[dict]]:
    """One image with ``objects`` non-overlapping shapes; returns it and the shapes' polygons."""
    image = _background(rng, width, height)
    draw = ImageDraw.Draw(image)
    placed: list[tuple[float, float, float]] = []
    shapes: list[dict] = []
    for _ in range(objects):
        for _attempt in range(50):
            r = rng.uniform(min_size, max_size) / 2
            cx, cy = rng.uniform(r + 1, width - r - 1), rng.uniform(r + 1, height - r - 1)
            if all(math.hypot(cx - x, cy - y) > r + q + 2 for x, y, q in placed):
                break
        else:
            continue
        placed.append((cx, cy, r))
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        points = _polygon(shape, cx, cy, r, rng.uniform(0, 2 * math.pi))
        draw.polygon(points, fill=_color(rng))
        shapes.append({"shape": shape, "polygon": points})
    return image, shapes


def generate_classification(
    root: str | Path, *, train_per_class: int = 60, val_per_class: int = 20, size: int = 64, seed: int = 0
) -> Path:
    """Write an ImageFolder tree with one centered shape per image; returns ``root``."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for shape in SHAPES:
            folder = root / split / shape
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                image = _background(rng, size, size)
                r = rng.uniform(0.25, 0.42) * size
                cx, cy = size / 2 + rng.uniform(-0.1, 0.1) * size, size / 2 + rng.uniform(-0.1, 0.1) * size
                ImageDraw.Draw(image).polygon(_polygon(shape, cx, cy, r, rng.uniform(0, 2 * math.pi)), fill=_color(rng))
                image.save(folder / f"{shape}_{i:04d}.jpg", quality=90)
    return root


def _coco_annotations(shapes: list[dict], image_id: int, first_id: int, category_ids: dict[str, int]) -> list[dict]:
    from pycocotools import mask as mask_utils

    annotations = []
    for k, item in enumerate(shapes):
        poly = [round(v, 2) for point in item["polygon"] for v in point]
        xs, ys = poly[0::2], poly[1::2]
        annotations.append(
            {
                "id": first_id + k,
                "image_id": image_id,
                "category_id": category_ids[item["shape"]],
                "segmentation": [poly],
                "area": 0.0,  # filled below from the rasterized polygon, as COCO's areas are
                "bbox": [
                    round(min(xs), 2),
                    round(min(ys), 2),
                    round(max(xs) - min(xs), 2),
                    round(max(ys) - min(ys), 2),
                ],
                "iscrowd": 0,
            }
        )
    for ann, item in zip(annotations, shapes):
        rle = mask_utils.frPyObjects(ann["segmentation"], item["height"], item["width"])
        ann["area"] = float(mask_utils.area(mask_utils.merge(rle)))
    return annotations


def generate_coco(
    root: str | Path,
    *,
    train_images: int = 200,
    val_images: int = 50,
    size: tuple[int, int] = (160, 160),
    objects: tuple[int, int] = (1, 4),
    object_size: tuple[float, float] = (24, 64),
    seed: int = 0,
    category_ids: dict[str, int] | None = None,
) -> Path:
    """Write COCO 2017's layout with instance annotations (polygons) of the shapes; returns ``root``."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    category_ids = category_ids or {name: i + 1 for i, name in enumerate(SHAPES)}
    categories = [{"id": cid, "name": name, "supercategory": "shape"} for name, cid in category_ids.items()]
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    width, height = size
    ann_id = 1
    for split, count in (("train2017", train_images), ("val2017", val_images)):
        folder = root / split
        folder.mkdir(parents=True, exist_ok=True)
        images, annotations = [], []
        for i in range(count):
            image_id = i + 1
            n = int(rng.integers(objects[0], objects[1] + 1))
            image, shapes = render(rng, width, height, n, *object_size)
            file_name = f"{image_id:012d}.jpg"
            image.save(folder / file_name, quality=92)
            images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
            for item in shapes:
                item.update(width=width, height=height)
            new = _coco_annotations(shapes, image_id, ann_id, category_ids)
            ann_id += len(new)
            annotations.extend(new)
        data = {
            "info": {"description": "residual-zoo generated shapes", "version": "1.0"},
            "licenses": [],
            "images": images,
            "annotations": annotations,
            "categories": categories,
        }
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))
    return root


def _empty(root: Path) -> bool:
    return not root.exists() or not any(root.iterdir())


def generate_once(root: Path, generate, **kwargs) -> None:
    """``generate(root, **kwargs)`` unless ``root`` holds a dataset, atomically: the files are written into a
    temporary sibling folder that is renamed to ``root`` when complete, so several jobs starting together on
    one folder (SLURM jobs, test runs) never read a half-written tree; the first to finish wins."""
    if not _empty(root):
        return
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = root.parent / f".{root.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.partial"
    try:
        generate(staging, **kwargs)
        try:
            if root.exists() and _empty(root):
                root.rmdir()
            os.rename(staging, root)
        except OSError:
            if _empty(root):
                raise  # not another process's dataset: a real error
    finally:
        shutil.rmtree(staging, ignore_errors=True)


class ShapesClassificationDataModule(ImageFolderDataModule):
    """The generated shapes as an ImageFolder tree (written by ``prepare_data`` when ``root`` is empty).

    Args:
        root: where the tree is (or will be) written.
        train_per_class, val_per_class, size, seed: generation parameters (see ``generate_classification``).
        image_size, eval_resize: as for ``ImageFolderDataModule``; default to ``size``.
        kwargs: any other ``ImageFolderDataModule`` option.
    """

    def __init__(
        self,
        root: str = "data/shapes_classification",
        train_per_class: int = 60,
        val_per_class: int = 20,
        size: int = 64,
        seed: int = 0,
        image_size: int | None = None,
        eval_resize: int | None = None,
        **kwargs,
    ) -> None:
        super().__init__(root=root, image_size=image_size or size, eval_resize=eval_resize or size, **kwargs)
        # save_hyperparameters also records this frame's arguments; keep the resolved values
        self.hparams.update(image_size=image_size or size, eval_resize=eval_resize or size)
        self.generation = {
            "train_per_class": train_per_class,
            "val_per_class": val_per_class,
            "size": size,
            "seed": seed,
        }

    def prepare_data(self) -> None:
        generate_once(self.root, generate_classification, **self.generation)
        super().prepare_data()


def _coco_generation(train_images: int, val_images: int, size: int, seed: int) -> dict:
    return {
        "train_images": train_images,
        "val_images": val_images,
        "size": (size, size),
        "object_size": (0.15 * size, 0.45 * size),
        "seed": seed,
    }


class _GeneratedCOCO:
    """``prepare_data`` writes the shapes in COCO's layout into ``root`` when it is empty."""

    root: Path
    generation: dict

    def prepare_data(self) -> None:
        generate_once(self.root, generate_coco, **self.generation)
        super().prepare_data()


class ShapesDetectionDataModule(_GeneratedCOCO, COCODetectionDataModule):
    """The generated shapes in COCO 2017's layout, for ``tasks.detect`` (generated when ``root`` is empty).

    Args:
        root: where the dataset is (or will be) written.
        num_train_images, num_val_images, size, seed: generation parameters (see ``generate_coco``).
        kwargs: any ``COCODetectionDataModule`` option.
    """

    def __init__(
        self,
        root: str = "data/shapes",
        num_train_images: int = 320,
        num_val_images: int = 48,
        size: int = 128,
        seed: int = 0,
        **kwargs,
    ) -> None:
        super().__init__(root=root, **kwargs)
        self.generation = _coco_generation(num_train_images, num_val_images, size, seed)


class ShapesInstanceDataModule(ShapesDetectionDataModule, COCOInstanceDataModule):
    """The generated shapes with their polygons, for ``tasks.instance_segment``: the detection demo's files and
    arguments (:class:`ShapesDetectionDataModule`), each object's mask in its samples."""


class ShapesSegmentationDataModule(_GeneratedCOCO, COCOSegmentationDataModule):
    """The generated shapes as semantic masks (every shape a class), for ``tasks.segment``.

    Args:
        root: where the dataset is (or will be) written (the detection demo's files serve both).
        num_train_images, num_val_images, size, seed: generation parameters (see ``generate_coco``).
        categories: ``all`` (every shape a class) by default.
        base_size, crop_size: default to ``size`` and ``7/8 size``.
        min_area: keep every training image with a shape.
        kwargs: any other ``COCOSegmentationDataModule`` option.
    """

    def __init__(
        self,
        root: str = "data/shapes",
        num_train_images: int = 320,
        num_val_images: int = 48,
        size: int = 128,
        seed: int = 0,
        categories: Literal["voc", "all"] = "all",
        base_size: int | None = None,
        crop_size: int | None = None,
        min_area: float = 0,
        **kwargs,
    ) -> None:
        super().__init__(
            root=root,
            categories=categories,
            base_size=base_size or size,
            crop_size=crop_size or size - size // 8,
            min_area=min_area,
            **kwargs,
        )
        self.hparams.update(base_size=base_size or size, crop_size=crop_size or size - size // 8)
        self.generation = _coco_generation(num_train_images, num_val_images, size, seed)
