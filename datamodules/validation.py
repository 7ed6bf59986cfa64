"""Dataset validation: what would break a run or silently corrupt its results, found before training.

One function per format, each returning a :class:`Report` of errors and warnings that name the file, the
entry and the fix: the datamodules call them when they set up (and stop, or with ``data.drop_invalid``
leave the bad items out), and ``python -m datamodules.check`` prints them (decoding every image too).
"""

from __future__ import annotations

import operator
import os
from collections import Counter
from dataclasses import dataclass, field
from itertools import chain, repeat
from pathlib import Path

import numpy as np
import torch

from .coco_format import annotation_area, is_number, is_polygon
from .folders import find_classes, no_images_problem, scan_folder
from .image_checks import ImageStatus, image_statuses, report_progress, size_problem, status_problem


class DataValidationError(ValueError):
    """The dataset has errors that would break training or corrupt its results."""


def reaches_outside(box: tuple[float, float, float, float], width: float, height: float) -> bool:
    """Whether an ``x1, y1, x2, y2`` box reaches more than a pixel outside its ``width x height`` image (the
    one rule of every format: annotation tools round, so one pixel is tolerated)."""
    x1, y1, x2, y2 = box
    return x1 < -1 or y1 < -1 or x2 > width + 1 or y2 > height + 1


def clipped(box: tuple[float, float, float, float], width: float, height: float) -> tuple[float, float, float, float]:
    """The box clipped to the image (training targets: the loss needs boxes inside the image)."""
    x1, y1, x2, y2 = box
    return max(x1, 0.0), max(y1, 0.0), min(x2, float(width)), min(y2, float(height))


def outside_warning(box, width: int, height: int, train: bool) -> str:
    """The warning for a box :func:`reaches_outside` its image, saying what is done with it."""
    done = "clipped for training" if train else "kept as written for evaluation, as the devkit"
    return f"box {box} reaches outside the {width}x{height} image ({done})"


def stop_on_errors(report: Report, drop_invalid: bool, what: str, fix: str = "Fix or remove these files") -> None:
    """The one rule of every format: a report with errors stops the run, naming each, unless
    ``data.drop_invalid`` says to leave the bad items out (the caller drops them)."""
    if report.errors and not drop_invalid:
        raise DataValidationError(
            f"{what} has errors that would break training:\n{report.text()}\n{fix}, or set data.drop_invalid: true "
            f"to leave them out."
        )


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
        checked = ", ".join(f"{n} {kind}" for kind, n in self.checked.items()) or "nothing"
        return f"{self.subject}: {len(self.errors)} errors, {len(self.warnings)} warnings ({checked} checked)"

    def text(self, limit: int = 50) -> str:
        shown = [str(p) for p in (self.errors + self.warnings)[:limit]]
        more = len(self.problems) - len(shown)
        lines = shown + ([f"... and {more} more"] if more > 0 else []) + [self.summary()]
        return "\n".join(lines)


_ANNOTATION_KEYS = frozenset(("image_id", "category_id", "bbox"))


# -- COCO ---------------------------------------------------------------------------------------------
def validate_coco(
    dataset: dict, annotation_file: Path, images_dir: Path | None = None, decode: bool = False, sizes: bool = True
) -> tuple[Report, dict]:
    """Check a COCO instances dataset; return the report and a copy with the offending entries removed.

    Errors (would break training or corrupt results): entries without their required fields, image ids
    or file names listed twice, annotations of images not in ``images``, category ids not in
    ``categories``, annotations without the ``area``/``iscrowd`` COCOeval reads (filled in in the
    copy), image files missing on disk or unreadable (or, decoded, of another size than recorded).
    Warnings (handled by the datamodules, but worth knowing): boxes no wider or taller than one pixel
    (dropped), boxes reaching outside the image (clipped), polygons of fewer than 3 points (left out of
    masks).

    Image files are looked up in the folder's listing (one ``listdir``, no call per file); without
    ``decode``, ``sizes`` also reads each file's size to name empty ones (the ``check`` command does;
    the datamodules' setup does not -- a stat per file on every start costs minutes on a network
    filesystem at COCO's size -- and an empty file is named when it is read).
    """
    report = Report(str(annotation_file))
    name = annotation_file.name
    images_ok: dict[int, dict] = {}
    unusable: dict[int, dict] = {}  # listed properly, but the file is missing, unreadable or of another size
    seen_files: set[str] = set()
    on_disk: set[str] | None = None
    if images_dir is not None:
        on_disk = set(os.listdir(images_dir)) if images_dir.is_dir() else set()
        if not images_dir.is_dir():
            report.error(str(images_dir), "the image folder does not exist")
    images, annotations = (_entries(dataset, key, report, name) for key in ("images", "annotations"))
    status: dict[str, ImageStatus] = {}
    if on_disk is not None and images_dir.is_dir() and (decode or sizes):
        named = (image.get("file_name") for image in images if isinstance(image, dict))
        files = [f for f in dict.fromkeys(named) if isinstance(f, str) and (f in on_disk or (images_dir / f).exists())]
        status = dict(zip(files, image_statuses([images_dir / f for f in files], decode, f"{name}: images")))
    entries = len(images) + len(annotations)
    report.checked["images"] = len(images)  # (counted first: the per-entry loops below are the setup's cost)
    report.checked["annotations"] = len(annotations)
    folder = on_disk is not None and images_dir.is_dir()
    for i, image in enumerate(images):
        if i % 65536 == 0:
            report_progress(f"{name}: images and annotations", i, entries)
        if not isinstance(image, dict) or not isinstance(image.get("id"), int) or not image.get("file_name"):
            report.error(f"{name} images[{i}]", "an image needs an integer 'id' and a 'file_name'")
            continue
        if not (is_number(image.get("width")) and is_number(image.get("height"))):
            report.error(f"{name} images[{i}]", f"image id {image['id']} lacks 'width'/'height'")
            continue
        if image["id"] in images_ok:
            report.error(f"{name} images[{i}]", f"image id {image['id']} is listed twice")
            continue
        if image["file_name"] in seen_files:
            report.error(f"{name} images[{i}]", f"file {image['file_name']} is listed twice (image id {image['id']})")
            continue
        if folder:
            if image["file_name"] not in on_disk and not (images_dir / image["file_name"]).exists():
                report.error(str(images_dir / image["file_name"]), f"image id {image['id']}: the file does not exist")
                unusable[image["id"]] = image
                continue
            problem = status_problem(status.get(image["file_name"]), (image["width"], image["height"]),
                                     images_dir / image["file_name"])  # fmt: skip
            if problem:
                report.error(str(images_dir / image["file_name"]), f"image id {image['id']}: {problem}")
                unusable[image["id"]] = image
                continue
        seen_files.add(image["file_name"])
        images_ok[image["id"]] = image
    listed = [c for c in dataset.get("categories") or [] if isinstance(c, dict)]
    categories = {c.get("id") for c in listed}
    for category_id, count in Counter(c.get("id") for c in listed if _hashable(c.get("id"))).items():
        if count > 1:
            names = [repr(c.get("name")) for c in listed if c.get("id") == category_id]
            report.error(f"{name} categories", f"category id {category_id} is listed {count} times "
                         f"({', '.join(names)}): one of those classes would never be trained and the names would "
                         "not say which")  # fmt: skip
    report_progress(f"{name}: images and annotations", len(images), entries)
    suspects = annotation_suspects(annotations, images_ok, categories)
    annotations_ok = list(annotations)
    left_out: Counter = Counter()  # annotations of the unusable images, per image
    for i in suspects.tolist():  # in file order: the report is the one a check of every entry would give
        annotations_ok[i] = _check_annotation(report, name, i, annotations[i], categories, images_ok, unusable,
                                              left_out)  # fmt: skip
    annotations_ok = [ann for ann in annotations_ok if ann is not None]
    if left_out:  # said once, not once per annotation; their own problems were still reported above
        report.warning(
            f"{name} annotations",
            f"{sum(left_out.values())} annotations of the {len(left_out)} images that cannot be used (above) are left "
            f"out with them",
        )
    report_progress(f"{name}: images and annotations", entries, entries)
    cleaned = dict(dataset)
    cleaned["images"] = list(images_ok.values())
    cleaned["annotations"] = [a for a in annotations_ok if a["bbox"][2] > 1 and a["bbox"][3] > 1]
    return report, cleaned


def _entries(dataset: dict, key: str, report: Report, name: str) -> list:
    """The file's ``images`` or ``annotations`` list; anything else is an error, and no entries."""
    value = dataset.get(key) or []
    if isinstance(value, list):
        return value
    report.error(f"{name} {key}", f"'{key}' must be a list of objects, got a {type(value).__name__}")
    return []


def annotation_suspects(annotations: list, images_ok: dict, categories: set) -> np.ndarray:
    """Indices of the annotations :func:`_check_annotation` could report (an error or a warning), found with
    whole-list operations. Any other annotation passes that check without a word, so checking only these,
    in file order, gives the report a check of every entry gives -- in a fraction of the time (at COCO's
    size the per-entry loop was most of a setup). Anything unusual in the file's structure (an entry that
    is not a dict or lacks a field, a box that is not four numbers) makes every annotation a suspect."""
    n = len(annotations)
    every = np.arange(n)
    try:
        if n == 0 or set(map(type, annotations)) != {dict}:
            return every
        for key in (*_ANNOTATION_KEYS, "area", "iscrowd"):
            if not all(map(operator.contains, annotations, repeat(key))):
                return every
        bboxes = list(map(operator.itemgetter("bbox"), annotations))
        if set(map(type, bboxes)) != {list} or set(map(len, bboxes)) != {4}:
            return every
        if not set(map(type, chain.from_iterable(bboxes))) <= {int, float}:  # no bool, str, None
            return every
        x, y, w, h = np.asarray(bboxes, dtype=np.float64).T
        category_ids = list(map(operator.itemgetter("category_id"), annotations))
        if set(map(type, category_ids)) != {int}:  # a string or float id: checked one by one
            return every
        known = np.fromiter(map(categories.__contains__, category_ids), bool, n)
        row_of = {image_id: k for k, image_id in enumerate(images_ok)}
        image_ids = map(operator.itemgetter("image_id"), annotations)
        rows = np.fromiter(map(row_of.get, image_ids, repeat(-1)), np.int64, n)
    except TypeError:  # an unhashable id
        return every
    sizes = np.asarray([(image["width"], image["height"]) for image in images_ok.values()] + [(0, 0)], np.float64)
    width, height = sizes[rows, 0], sizes[rows, 1]
    suspect = ~known | (rows < 0) | (w <= 1) | (h <= 1) | (x < -1) | (y < -1) | (x + w > width + 1)
    suspect |= (y + h > height + 1) | ~np.isfinite(np.stack([x, y, w, h])).all(0)
    segmentations = list(map(dict.get, annotations, repeat("segmentation")))
    for k in np.flatnonzero(np.fromiter(map(operator.is_, map(type, segmentations), repeat(dict)), bool, n)):
        size = segmentations[k].get("size")  # a crowd's RLE must be the image's size (crowds are ~1% of COCO)
        if rows[k] < 0 or not isinstance(size, list) or size != [height[k], width[k]]:
            suspect[k] = True
    listed = np.flatnonzero(np.fromiter(map(operator.is_, map(type, segmentations), repeat(list)), bool, n))
    polygons = list(chain.from_iterable(map(segmentations.__getitem__, listed.tolist())))
    owners = np.repeat(listed, [len(segmentations[k]) for k in listed.tolist()])
    if set(map(type, polygons)) <= {list}:
        lengths = np.fromiter(map(len, polygons), np.int64, len(polygons))
        suspect[owners[(lengths < 6) | (lengths % 2 == 1)]] = True
        try:  # NaN or infinite coordinates (and anything not a number) in a polygon
            values = np.fromiter(chain.from_iterable(polygons), np.float64, int(lengths.sum()))
            finite = np.isfinite(values)
            if not finite.all():
                suspect[owners[np.repeat(np.arange(len(polygons)), lengths)[~finite]]] = True
        except (TypeError, ValueError):
            suspect[listed] = True
    else:
        suspect[listed] = True
    return np.flatnonzero(suspect)


def _hashable(value) -> bool:
    try:
        hash(value)
    except TypeError:
        return False
    return True


def _listed(key, listed) -> bool:
    """``key in listed``, false for an unhashable key (a list where an id belongs)."""
    try:
        return key in listed
    except TypeError:
        return False


def _check_annotation(report: Report, name: str, i: int, ann, categories: set, images_ok: dict,
                      unusable: dict | None = None, left_out: Counter | None = None) -> dict | None:  # fmt: skip
    """Annotation ``i`` checked one by one: its problems reported; ``None`` for an error, else the entry
    (with ``area``/``iscrowd`` filled in when missing). An annotation of an image listed properly but unusable
    (``unusable``: its file is missing, unreadable or of another size) is checked for its own problems against
    the listed size, counted in ``left_out`` and left out, without an error of its own."""
    if not isinstance(ann, dict) or not ann.keys() >= _ANNOTATION_KEYS:
        report.error(f"{name} annotations[{i}]", "an annotation needs 'image_id', 'category_id' and 'bbox'")
        return None
    bbox = ann["bbox"]
    if not (type(bbox) is list and len(bbox) == 4 and is_number(bbox[0]) and is_number(bbox[1])
            and is_number(bbox[2]) and is_number(bbox[3])):  # fmt: skip
        report.error(f"{name} annotations[{i}]", f"annotation id {ann.get('id', '?')}: 'bbox' must be four "
                     f"numbers [x, y, width, height], got {bbox!r}")  # fmt: skip
        return None
    if type(ann["category_id"]) is not int:
        report.error(f"{name} annotations[{i}]", f"annotation id {ann.get('id', '?')}: category_id must be an integer "
                     f"(one of {sorted(categories)}), got {ann['category_id']!r}")  # fmt: skip
        return None
    if not _listed(ann["category_id"], categories):
        report.error(f"{name} annotations[{i}]", f"annotation id {ann.get('id', '?')}: category_id "
                     f"{ann['category_id']} is not in 'categories' {sorted(categories)}")  # fmt: skip
        return None
    image = images_ok.get(ann["image_id"]) if _listed(ann["image_id"], images_ok) else None
    lost = unusable is not None and _listed(ann["image_id"], unusable)
    if image is None and lost:
        image = unusable[ann["image_id"]]  # its own problems are still worth naming
    elif image is None:
        report.error(f"{name} annotations[{i}]", f"annotation id {ann.get('id', '?')}: image_id "
                     f"{ann['image_id']} is not an image of this file's 'images'")  # fmt: skip
        return None
    segmentation = ann.get("segmentation")
    if type(segmentation) is list and not all(all(map(is_number, p)) for p in segmentation if isinstance(p, list)):
        report.error(f"{name} annotations[{i}]", f"annotation id {ann.get('id', '?')} (image {image['file_name']}): "
                     "a polygon holds a coordinate that is not a finite number (NaN?)")  # fmt: skip
        return None
    if type(segmentation) is dict and list(segmentation.get("size") or []) != [image["height"], image["width"]]:
        report.error(
            f"{name} annotations[{i}]",
            f"annotation id {ann.get('id', '?')} (image {image['file_name']}): its RLE mask is "
            f"{'x'.join(map(str, segmentation.get('size') or ['?']))} (height x width) but the image is "
            f"{image['height']}x{image['width']}: the mask cannot be placed (fix its 'size' and 'counts')",
        )
        return None
    if type(segmentation) is list and not all(map(is_polygon, segmentation)):
        short = [len(p) if isinstance(p, list) else 0 for p in segmentation if not is_polygon(p)]
        report.warning(
            f"{name} annotations[{i}]",
            f"annotation id {ann.get('id', '?')} (image {image['file_name']}): polygons of "
            f"{', '.join(map(str, short))} coordinates are not polygons (3 points or more: 6 numbers, x and y) "
            "and are left out of its mask",
        )
    if "area" not in ann or "iscrowd" not in ann:
        missing = [key for key in ("area", "iscrowd") if key not in ann]
        report.error(
            f"{name} annotations[{i}]",
            f"annotation id {ann.get('id', '?')}: lacks {' and '.join(repr(k) for k in missing)}; COCOeval sorts "
            f"objects into small, medium and large by 'area' and ignores 'iscrowd' regions, so APs/APm/APl would "
            f"be wrong. --fix writes them (the area of the polygons, mask or box; iscrowd 0)",
        )
        ann = {**ann, "area": ann.get("area", annotation_area(ann, image)), "iscrowd": ann.get("iscrowd", 0)}
    x, y, w, h = bbox
    if w < 0 or h < 0:
        report.warning(f"{name} annotations[{i}]", f"annotation id {ann.get('id', '?')} (image "
                       f"{image['file_name']}): box {bbox} has a negative {'width' if w < 0 else 'height'} (an "
                       "inverted box): dropped for training; COCOeval scores the file as written, where no detection "
                       "can match it")  # fmt: skip
    elif w <= 1 or h <= 1:
        report.warning(f"{name} annotations[{i}]", f"annotation id {ann.get('id', '?')} (image "
                       f"{image['file_name']}): degenerate box {bbox} (dropped for training)")  # fmt: skip
    elif reaches_outside((x, y, x + w, y + h), image["width"], image["height"]):
        # (COCOeval scores the file as written; the training targets are clipped)
        report.warning(
            f"{name} annotations[{i}]",
            f"annotation id {ann.get('id', '?')} (image {image['file_name']}): box {bbox} reaches outside the "
            f"{image['width']}x{image['height']} image (clipped)",
        )
    if lost:
        left_out[ann["image_id"]] += 1
        return None
    return ann


def check_image_size(image: torch.Tensor, info: dict, path: Path) -> None:
    """Annotations are in the pixel coordinates of the image they were made on: a resized or different file
    would misplace every box and mask silently, so the decoded size must be the one the file records."""
    problem = size_problem((image.shape[-1], image.shape[-2]), (info["width"], info["height"]), path)
    if problem:
        raise DataValidationError(
            f"{path}: {problem} (image id {info['id']}). Use the images the annotations were made for, or rescale "
            f"the annotations and their 'width'/'height' to these images."
        )


# -- ImageFolder ----------------------------------------------------------------------------------------
def validate_imagefolder(
    split_dir: Path, classes: list[str], *, train: bool, decode: bool = False, strict: bool = True, sizes: bool = True
) -> tuple[Report, list[tuple[str, int]]]:
    """Check ``split_dir/<class>/<images>``; return the report and the ``(path, class index)`` samples.

    Errors: class folders the training split lacks (with ``strict``), a training class without images it
    can read (what the folder holds instead is named), a link to a folder it is in (a loop), empty files
    (read by ``sizes``, a stat per file:
    the ``check`` command's; the datamodules' setup lists folders only and names an empty file when it
    reads it) and, with ``decode``, files that do not decode. Warnings: files in formats that are not
    read, an evaluation class without images.
    """
    report = Report(str(split_dir))
    index = {name: i for i, name in enumerate(classes)}
    extra = [name for name in find_classes(split_dir) if name not in index]
    if extra and strict:
        report.error(
            str(split_dir),
            f"class folders {extra[:5]} do not exist in the training split; every evaluation class must be one "
            f"of the {len(classes)} training classes",
        )
    listed = {}
    loops: list[tuple[str, str]] = []
    for k, name in enumerate(classes):
        if k % 50 == 0:
            report_progress(f"{split_dir.name}: listing class folders", k, len(classes))
        folder = split_dir / name
        listed[name] = scan_folder(folder, loops) if folder.is_dir() else ([], Counter())
    for link, target in loops:
        report.error(link, f"links back to {target}, a folder it is in: a loop (followed, it lists the same images "
                           f"dozens of times). Remove the link")  # fmt: skip
    every = [path for images, _ in listed.values() for path in images] if decode or sizes else []
    problems = iter(status_problem(s) for s in image_statuses(every, decode, f"{split_dir.name}: images"))
    samples: list[tuple[str, int]] = []
    for name, (images, others) in listed.items():
        folder = split_dir / name
        report.checked["classes"] += 1
        if not images and (train or folder.is_dir()):
            (report.error if train else report.warning)(str(folder), no_images_problem(folder, others))
        elif others:
            report.warning(str(folder), f"{sum(others.values())} files not in a readable image format are ignored")
        report.checked["images"] += len(images)
        if decode or sizes:
            for path, problem in zip(images, problems):
                if problem:
                    report.error(path, problem)
        label = index[name]
        samples.extend((path, label) for path in images)
    return report, samples


def without_reported(
    samples: list[tuple[str, int]], report: Report, classes: list[str], train: bool
) -> tuple[list[tuple[str, int]], list[str]]:
    """``data.drop_invalid`` on an ImageFolder split: the samples without the files ``report`` names, and the
    classes left (a class left without training images leaves the label set; the labels are renumbered)."""
    bad = {p.where for p in report.errors}
    samples = [(f, label) for f, label in samples if f not in bad]
    counts = Counter(label for _, label in samples)
    empty = [c for i, c in enumerate(classes) if not counts[i]] if train else []
    if not empty:
        return samples, classes
    keep = [c for c in classes if c not in empty]
    remap = {classes.index(c): k for k, c in enumerate(keep)}
    return [(f, remap[label]) for f, label in samples if label in remap], keep


# -- PASCAL VOC / ILSVRC XML -----------------------------------------------------------------------------
