"""The embedded shapes in PASCAL VOC's and ILSVRC CLS-LOC's layouts (``datamodules.shapes`` has the others).

``generate_voc`` writes ``VOCdevkit/VOC2007`` (JPEGs, 1-based XML boxes, a few small objects marked
``difficult``, ``ImageSets/Main/{trainval,test}.txt``); ``generate_localization`` writes the Kaggle
ImageNet-localization layout with one shape per image (class folders for training, boxes for two thirds
of them as XML, a flat validation folder whose labels and boxes are in ``LOC_val_solution.csv``, made-up
WordNet ids in ``LOC_synset_mapping.txt``). The ``Shapes*DataModule`` classes are the VOC and CLS-LOC
datamodules pointed at them, generating them in ``prepare_data`` when the folder is empty.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
from PIL import ImageDraw

from .localization import ILSVRCLocalizationDataModule
from .shapes import SHAPES, _background, _color, _polygon, generate_once, render
from .voc_detection import VOCDetectionDataModule

#: made-up WordNet-style ids of the shapes (CLS-LOC's folders and files are named by them)
SHAPE_SYNSETS: dict[str, str] = {shape: f"n0000000{k + 1}" for k, shape in enumerate(SHAPES)}


def _xml(filename: str, width: int, height: int, objects: list[tuple[str, tuple[int, int, int, int], bool]]) -> str:
    parts = [f"<annotation><folder>VOC2007</folder><filename>{filename}</filename>",
             f"<size><width>{width}</width><height>{height}</height><depth>3</depth></size>"]  # fmt: skip
    for name, (xmin, ymin, xmax, ymax), difficult in objects:
        parts.append(
            f"<object><name>{name}</name><pose>Unspecified</pose><truncated>0</truncated>"
            f"<difficult>{int(difficult)}</difficult><bndbox><xmin>{xmin}</xmin><ymin>{ymin}</ymin>"
            f"<xmax>{xmax}</xmax><ymax>{ymax}</ymax></bndbox></object>"
        )
    return "".join(parts) + "</annotation>\n"


def _pixels(points: list[tuple[float, float]], base: int, width: int, height: int) -> tuple[int, int, int, int]:
    """A polygon's box as inclusive integer pixels counted from ``base`` (VOC 1, ILSVRC 0)."""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x1, y1 = max(0, math.floor(min(xs))), max(0, math.floor(min(ys)))
    x2, y2 = min(width, math.ceil(max(xs))), min(height, math.ceil(max(ys)))
    return x1 + base, y1 + base, x2 - 1 + base, y2 - 1 + base


def generate_voc(
    root: str | Path, *, trainval: int = 160, test: int = 40, size: int = 128,
    object_size: tuple[float, float] = (20, 56), difficult_below: float = 24, seed: int = 0,
) -> Path:  # fmt: skip
    """Write ``root/VOC2007`` with the shapes as classes; objects smaller than ``difficult_below`` pixels
    are marked difficult (not scored by the metric). Returns ``root`` (the ``VOCdevkit`` folder)."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    folder = root / "VOC2007"
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    names = [f"{i:06d}" for i in range(1, trainval + test + 1)]
    for name in names:
        image, shapes = render(rng, size, size, int(rng.integers(1, 5)), *object_size)
        image.save(folder / "JPEGImages" / f"{name}.jpg", quality=92)
        objects = []
        for item in shapes:
            box = _pixels(item["polygon"], 1, size, size)
            objects.append((item["shape"], box, min(box[2] - box[0], box[3] - box[1]) + 1 < difficult_below))
        (folder / "Annotations" / f"{name}.xml").write_text(_xml(f"{name}.jpg", size, size, objects))
    (folder / "ImageSets" / "Main" / "trainval.txt").write_text("\n".join(names[:trainval]) + "\n")
    (folder / "ImageSets" / "Main" / "test.txt").write_text("\n".join(names[trainval:]) + "\n")
    return root


def generate_localization(
    root: str | Path, *, train_per_class: int = 40, val_per_class: int = 10, size: int = 96, seed: int = 0
) -> Path:
    """Write the Kaggle ImageNet-localization layout with one shape per image; returns ``root``."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    data, notes = root / "ILSVRC" / "Data" / "CLS-LOC", root / "ILSVRC" / "Annotations" / "CLS-LOC"
    root.mkdir(parents=True, exist_ok=True)
    (root / "LOC_synset_mapping.txt").write_text("".join(f"{w} {s}\n" for s, w in SHAPE_SYNSETS.items()))
    rows = ["ImageId,PredictionString"]
    number = 0
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for shape, wnid in SHAPE_SYNSETS.items():
            for i in range(count):
                image = _background(rng, size, size)
                r = rng.uniform(0.12, 0.4) * size
                cx, cy = rng.uniform(r + 1, size - r - 1), rng.uniform(r + 1, size - r - 1)
                points = _polygon(shape, cx, cy, r, rng.uniform(0, 2 * math.pi))
                ImageDraw.Draw(image).polygon(points, fill=_color(rng))
                box = _pixels(points, 0, size, size)
                if split == "train":
                    name = f"{wnid}_{i}"
                    (data / "train" / wnid).mkdir(parents=True, exist_ok=True)
                    image.save(data / "train" / wnid / f"{name}.JPEG", quality=92)
                    if i % 3:  # boxes exist for a subset of the training images, as in ImageNet
                        (notes / "train" / wnid).mkdir(parents=True, exist_ok=True)
                        (notes / "train" / wnid / f"{name}.xml").write_text(
                            _xml(f"{name}.JPEG", size, size, [(wnid, box, False)])
                        )
                else:
                    number += 1
                    name = f"ILSVRC2012_val_{number:08d}"
                    (data / "val").mkdir(parents=True, exist_ok=True)
                    image.save(data / "val" / f"{name}.JPEG", quality=92)
                    rows.append(f"{name},{wnid} {' '.join(map(str, box))} ")
    (root / "LOC_val_solution.csv").write_text("\n".join(rows) + "\n")
    return root


class ShapesVOCDataModule(VOCDetectionDataModule):
    """The shapes in PASCAL VOC 2007's layout, for ``tasks.detect`` (generated when ``root`` is empty).

    Args:
        root: the ``VOCdevkit`` folder it is (or will be) written to.
        trainval, test, size, seed: generation parameters (see ``generate_voc``).
        train_sets: VOC 2007's trainval (the only year written).
        classes: the shapes.
        kwargs: any other ``VOCDetectionDataModule`` option.
    """

    def __init__(
        self,
        root: str = "data/shapes_voc",
        trainval: int = 160,
        test: int = 40,
        size: int = 128,
        seed: int = 0,
        train_sets: list[str] = ("2007:trainval",),
        classes: list[str] | None = SHAPES,
        **kwargs: Any,
    ) -> None:
        super().__init__(root=root, train_sets=train_sets, classes=classes, **kwargs)
        self.generation = {"trainval": trainval, "test": test, "size": size, "seed": seed}

    def prepare_data(self) -> None:
        generate_once(self.root, generate_voc, **self.generation)
        super().prepare_data()


class ShapesLocalizationDataModule(ILSVRCLocalizationDataModule):
    """The shapes in ILSVRC CLS-LOC's layout, for ``tasks.localize`` (generated when ``root`` is empty).

    Args:
        root: where it is (or will be) written.
        train_per_class, val_per_class, size, seed: generation parameters (see ``generate_localization``).
        kwargs: any other ``ILSVRCLocalizationDataModule`` option (``image_size`` defaults to ``size``).
    """

    def __init__(
        self,
        root: str = "data/shapes_loc",
        train_per_class: int = 40,
        val_per_class: int = 10,
        size: int = 96,
        seed: int = 0,
        image_size: int | None = None,
        eval_resize: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(root=root, image_size=image_size or size, eval_resize=eval_resize or size, **kwargs)
        self.hparams.update(image_size=image_size or size, eval_resize=eval_resize or size)
        self.generation = {"train_per_class": train_per_class, "val_per_class": val_per_class, "size": size,
                           "seed": seed}  # fmt: skip

    def prepare_data(self) -> None:
        generate_once(self.root, generate_localization, **self.generation)
        super().prepare_data()
