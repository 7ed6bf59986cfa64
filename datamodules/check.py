"""Dataset validation before training: ``python -m datamodules.check --config <config> [--fix]``.

Scans the dataset a config points to and reports, file by file, what would break or silently corrupt a
run: unreadable or truncated images, annotation files that are not valid COCO or lack the 'area' and
'iscrowd' fields COCOeval reads (``--fix`` fills them in), boxes of zero or
negative size or outside their image, category ids missing from ``categories``, annotations of images
that do not exist, images listed twice or missing on disk, images whose size is not the one their
annotation file records (a resized copy: every box and mask would be misplaced), polygons of fewer
than 3 points (warned of; left out of segmentation masks), ImageFolder classes without images. The
report ends with counts; the command exits with status 1 when there are errors.

The datamodules run the cheap part (everything but decoding every image) when they set up, and stop
with this report before training starts. ``data.drop_invalid: true`` drops the offending items instead
(counts logged); ``--fix`` writes a cleaned copy of a COCO annotation file next to it. Decoding every
image is this command's job (``--no-decode`` skips it); during training ``data.skip_corrupt: true``
skips unreadable images as they are met, and an image of the wrong size stops the run when it is read.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


class DataValidationError(ValueError):
    """The dataset has errors that would break training or corrupt its results."""


@dataclass
class Problem:
    severity: str  # "error" or "warning"
    where: str  # the file (and the entry in it)
    message: str

    def __str__(self) -> str:
        return f"{self.severity.upper():7s} {self.where}: {self.message}"


@dataclass
class Report:
    """Problems found in one dataset split, and how much was checked."""

    subject: str
    checked: Counter = field(default_factory=Counter)
    problems: list[Problem] = field(default_factory=list)

    def error(self, where: str, message: str) -> None:
        self.problems.append(Problem("error", where, message))

    def warning(self, where: str, message: str) -> None:
        self.problems.append(Problem("warning", where, message))

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "warning"]

    def summary(self) -> str:
        checked = ", ".join(f"{n} {kind}" for kind, n in self.checked.items())
        return f"{self.subject}: {len(self.errors)} errors, {len(self.warnings)} warnings ({checked} checked)"

    def text(self, limit: int = 50) -> str:
        shown = [str(p) for p in (self.errors + self.warnings)[:limit]]
        more = len(self.problems) - len(shown)
        lines = shown + ([f"... and {more} more"] if more > 0 else []) + [self.summary()]
        return "\n".join(lines)


def _image_problem(path: Path, decode: bool, expected: tuple[int, int] | None = None) -> str | None:
    """Why ``path`` cannot be used as an image (decoded: also when it is not ``expected``, width x height),
    or ``None``."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return "the file does not exist"
    if size == 0:
        return "the file is empty (0 bytes)"
    if decode:
        from .images import CorruptImageError, read_image

        try:
            image = read_image(path)
        except CorruptImageError as err:
            return str(err).split(": ", 1)[-1]
        if expected is not None:
            return size_problem(image, *expected)
    return None


def size_problem(image: torch.Tensor, width: int, height: int) -> str | None:
    """Why a decoded image cannot carry annotations made for a ``width`` x ``height`` image, or ``None``."""
    found_height, found_width = image.shape[-2:]
    if (found_width, found_height) == (width, height):
        return None
    return (
        f"the image is {found_width}x{found_height} but the annotation file says {width}x{height}, so its boxes "
        f"and masks would be misplaced"
    )


# -- COCO ---------------------------------------------------------------------------------------------
def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def validate_coco(
    dataset: dict, annotation_file: Path, images_dir: Path | None = None, decode: bool = False
) -> tuple[Report, dict]:
    """Check a COCO instances dataset; return the report and a copy with the offending entries removed.

    Errors (would break training or corrupt results): entries without their required fields, image ids
    or file names listed twice, annotations of images not in ``images``, category ids not in
    ``categories``, annotations without the ``area``/``iscrowd`` COCOeval reads (filled in in the
    copy), image files missing on disk or unreadable (or, decoded, of another size than recorded).
    Warnings (handled by the datamodules, but worth knowing): boxes no wider or taller than one pixel
    (dropped), boxes reaching outside the image (clipped), polygons of fewer than 3 points (left out of
    masks).
    """
    from .coco import is_polygon

    report = Report(str(annotation_file))
    name = annotation_file.name
    images_ok: dict[int, dict] = {}
    seen_files: set[str] = set()
    on_disk: set[str] | None = None
    if images_dir is not None:
        on_disk = set(os.listdir(images_dir)) if images_dir.is_dir() else set()
        if not images_dir.is_dir():
            report.error(str(images_dir), "the image folder does not exist")
    for i, image in enumerate(dataset.get("images") or []):
        report.checked["images"] += 1
        where = f"{name} images[{i}]"
        if not isinstance(image, dict) or not isinstance(image.get("id"), int) or not image.get("file_name"):
            report.error(where, "an image needs an integer 'id' and a 'file_name'")
            continue
        if not (_number(image.get("width")) and _number(image.get("height"))):
            report.error(where, f"image id {image['id']} lacks 'width'/'height'")
            continue
        if image["id"] in images_ok:
            report.error(where, f"image id {image['id']} is listed twice")
            continue
        if image["file_name"] in seen_files:
            report.error(where, f"file {image['file_name']} is listed twice (image id {image['id']})")
            continue
        if on_disk is not None and images_dir.is_dir():
            if image["file_name"] not in on_disk and not (images_dir / image["file_name"]).exists():
                report.error(str(images_dir / image["file_name"]), f"image id {image['id']}: the file does not exist")
                continue
            expected = (image["width"], image["height"])
            problem = _image_problem(images_dir / image["file_name"], decode, expected) if decode else None
            if problem is None and not decode:
                try:
                    if (images_dir / image["file_name"]).stat().st_size == 0:
                        problem = "the file is empty (0 bytes)"
                except OSError as err:
                    problem = str(err)
            if problem:
                report.error(str(images_dir / image["file_name"]), f"image id {image['id']}: {problem}")
                continue
        seen_files.add(image["file_name"])
        images_ok[image["id"]] = image
    categories = {c.get("id") for c in dataset.get("categories") or [] if isinstance(c, dict)}
    annotations_ok = []
    for i, ann in enumerate(dataset.get("annotations") or []):
        report.checked["annotations"] += 1
        where = f"{name} annotations[{i}]"
        if not isinstance(ann, dict) or not all(k in ann for k in ("image_id", "category_id", "bbox")):
            report.error(where, "an annotation needs 'image_id', 'category_id' and 'bbox'")
            continue
        ident = f"annotation id {ann.get('id', '?')}"
        bbox = ann["bbox"]
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(_number(v) for v in bbox)):
            report.error(where, f"{ident}: 'bbox' must be four numbers [x, y, width, height], got {bbox!r}")
            continue
        if ann["category_id"] not in categories:
            report.error(
                where, f"{ident}: category_id {ann['category_id']} is not in 'categories' {sorted(categories)}"
            )
            continue
        image = images_ok.get(ann["image_id"])
        if image is None:
            report.error(where, f"{ident}: image_id {ann['image_id']} is not a usable image of this file")
            continue
        segmentation = ann.get("segmentation")
        if isinstance(segmentation, list):
            short = [len(p) if isinstance(p, list) else 0 for p in segmentation if not is_polygon(p)]
            if short:
                report.warning(
                    where,
                    f"{ident} (image {image['file_name']}): polygons of {', '.join(map(str, short))} coordinates "
                    f"are not polygons (3 points or more: 6 numbers, x and y) and are left out of its mask",
                )
        missing = [key for key in ("area", "iscrowd") if key not in ann]
        if missing:
            report.error(
                where,
                f"{ident}: lacks {' and '.join(repr(k) for k in missing)}; COCOeval sorts objects into small, "
                f"medium and large by 'area' and ignores 'iscrowd' regions, so APs/APm/APl would be wrong. "
                f"--fix writes them (the area of the polygons, mask or box; iscrowd 0)",
            )
            ann = {**ann, "area": ann.get("area", annotation_area(ann, image)), "iscrowd": ann.get("iscrowd", 0)}
        x, y, w, h = bbox
        if w <= 1 or h <= 1:
            report.warning(where, f"{ident} (image {image['file_name']}): degenerate box {bbox} (dropped for training)")
        elif x < -1 or y < -1 or x + w > image["width"] + 1 or y + h > image["height"] + 1:
            report.warning(
                where,
                f"{ident} (image {image['file_name']}): box {bbox} reaches outside the "
                f"{image['width']}x{image['height']} image (clipped)",
            )
        annotations_ok.append(ann)
    cleaned = dict(dataset)
    cleaned["images"] = list(images_ok.values())
    cleaned["annotations"] = [a for a in annotations_ok if a["bbox"][2] > 1 and a["bbox"][3] > 1]
    return report, cleaned


def annotation_area(ann: dict, image: dict) -> float:
    """An annotation's area as COCO defines it: of its mask (polygons, RLE), else of its box."""
    from pycocotools import mask as mask_utils

    from .coco import is_polygon

    segmentation = ann.get("segmentation")
    if isinstance(segmentation, list):
        polygons = [p for p in segmentation if is_polygon(p)]
        if polygons:
            rles = mask_utils.frPyObjects(polygons, image["height"], image["width"])
            return float(mask_utils.area(mask_utils.merge(rles)))
    elif isinstance(segmentation, dict) and "counts" in segmentation:
        rle = segmentation
        if isinstance(rle["counts"], list):
            rle = mask_utils.frPyObjects(rle, *rle["size"])
        return float(mask_utils.area(rle))
    return float(ann["bbox"][2] * ann["bbox"][3])


# -- ImageFolder ----------------------------------------------------------------------------------------
def validate_imagefolder(split_dir: Path, classes: list[str], decode: bool = False) -> Report:
    """Check ``split_dir/<class>/<images>``: class folders without images, empty or unreadable files."""
    from .imagefolder import list_images, no_images_problem, unreadable_files

    report = Report(str(split_dir))
    for name in classes:
        folder = split_dir / name
        report.checked["classes"] += 1
        files = list_images(folder) if folder.is_dir() else []
        if not files:
            report.error(str(folder), no_images_problem(folder))
        elif folder.is_dir():
            ignored = sum(unreadable_files(folder).values())
            if ignored:
                report.warning(str(folder), f"{ignored} files not in a readable image format are ignored")
        for path in files:
            report.checked["images"] += 1
            problem = _image_problem(path, decode)
            if problem:
                report.error(str(path), problem)
    return report


# -- the command ----------------------------------------------------------------------------------------
def check_datamodule(datamodule, decode: bool = True, fix: bool = False) -> list[Report]:
    """Every split of a configured datamodule (ImageFolder or COCO kinds)."""
    from .coco import COCODetectionDataModule, COCOSegmentationDataModule, read_coco_json
    from .imagefolder import ImageFolderDataModule, find_classes

    reports = []
    if isinstance(datamodule, ImageFolderDataModule):
        hp = datamodule.hparams
        train = datamodule._split_dir(hp.train_dir)
        classes = find_classes(train)
        for split in dict.fromkeys([hp.train_dir, hp.val_dir]):
            reports.append(validate_imagefolder(datamodule.root / split, classes, decode))
        return reports
    if isinstance(datamodule, (COCODetectionDataModule, COCOSegmentationDataModule)):
        files = datamodule.files if isinstance(datamodule, COCOSegmentationDataModule) else datamodule
        for split in ("train", "val"):
            images, annotations = files.split_files(split)
            try:
                dataset = read_coco_json(annotations)
            except (ValueError, FileNotFoundError) as err:
                report = Report(str(annotations))
                report.error(str(annotations), str(err))
                reports.append(report)
                continue
            report, cleaned = validate_coco(dataset, annotations, images, decode)
            reports.append(report)
            if fix and report.problems:
                target = annotations.with_name(annotations.stem + ".fixed.json")
                target.write_text(json.dumps(cleaned))
                dropped_images = len(dataset["images"]) - len(cleaned["images"])
                dropped_anns = len(dataset["annotations"]) - len(cleaned["annotations"])
                print(f"wrote {target}: {dropped_images} images and {dropped_anns} annotations dropped; point "
                      f"data.{split}_annotations at it")  # fmt: skip
        return reports
    raise ValueError(f"no checks for {type(datamodule).__name__}")


def main(argv: list[str] | None = None) -> int:
    import yaml
    from jsonargparse import ArgumentParser
    from lightning.pytorch import LightningDataModule

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("-c", "--config")
    known, rest = pre.parse_known_args(argv)
    parser = ArgumentParser(prog="python -m datamodules.check", description=__doc__.split("\n")[0])
    parser.add_argument("-c", "--config", help="a task config: its data section is checked")
    parser.add_subclass_arguments(LightningDataModule, "data", required=True)
    parser.add_argument("--fix", action="store_true", help="write cleaned COCO annotation files (*.fixed.json)")
    parser.add_argument("--no_decode", action="store_true", help="skip decoding every image (fast)")
    if known.config:
        section = (yaml.safe_load(Path(known.config).read_text()) or {}).get("data")
        if section is None:
            parser.error(f"{known.config} has no data section")
        rest = ["--data", json.dumps(section), *rest]
    args = parser.parse_args(rest)
    datamodule = parser.instantiate_classes(args).data
    if hasattr(datamodule, "prepare_data"):
        datamodule.prepare_data()
    reports = check_datamodule(datamodule, decode=not args.no_decode, fix=args.fix)
    for report in reports:
        print(report.text(limit=200))
    errors = sum(len(r.errors) for r in reports)
    print(f"total: {errors} errors, {sum(len(r.warnings) for r in reports)} warnings")
    return 1 if errors else 0


if __name__ == "__main__":
    from backbones.command import run_command

    from .images import CorruptImageError

    run_command(main, (CorruptImageError,))
