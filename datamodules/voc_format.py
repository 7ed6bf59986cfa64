"""The PASCAL VOC annotation format, which ILSVRC's DET and CLS-LOC annotations share, read exactly.

One XML file per image (``<annotation>`` with ``<filename>``, ``<size>`` and one ``<object>`` per box:
``<name>``, ``<difficult>``, ``<truncated>``, ``<bndbox>`` with ``xmin ymin xmax ymax``). Coordinates are
inclusive pixel indices: **1-based in PASCAL VOC** (a box covering a W-pixel-wide image is ``xmin=1,
xmax=W``) and **0-based in ILSVRC** (``xmin=0, xmax=W-1``). Both become torchvision's continuous
``x1, y1, x2, y2`` (a whole image is ``0, 0, W, H``): ``x1 = xmin - base``, ``x2 = xmax - base + 1``,
as detectron2 reads VOC. The devkits' evaluation works on inclusive pixels with ``+1`` in every width;
on continuous boxes the same overlaps come out without it (``datamodules``' consumers rely on that).

What is wrong in a file is an :class:`AnnotationError` naming the file, the object and the fix: malformed
XML, a missing ``<size>`` or ``<bndbox>``, coordinates that are not finite numbers, inverted boxes, boxes in a
file whose ``<size>`` is 0x0. Non-integer
coordinates (seen in some re-exported files) are accepted and kept exact. An ``<object>`` without a
``<bndbox>`` (CLS-LOC's image-level labels) is returned with ``box=None``.
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

#: the 20 PASCAL VOC classes, in the devkit's order (their indices 1..20 are the category ids used here)
VOC_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable", "dog",
    "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip


class AnnotationError(ValueError):
    """An annotation file that cannot be read as the format says."""


@dataclass(frozen=True)
class XMLObject:
    """One ``<object>``: its class name, box (continuous ``x1, y1, x2, y2``, or ``None``) and flags."""

    name: str
    box: tuple[float, float, float, float] | None
    difficult: bool = False
    truncated: bool = False


@dataclass(frozen=True)
class XMLAnnotation:
    """One image's annotation file."""

    path: Path
    filename: str
    width: int
    height: int
    objects: tuple[XMLObject, ...] = field(default_factory=tuple)


def _text(node: ET.Element | None, tag: str) -> str | None:
    child = node.find(tag) if node is not None else None
    return child.text.strip() if child is not None and child.text is not None else None


def _flag(node: ET.Element, tag: str) -> bool:
    value = _text(node, tag)
    return value not in (None, "", "0")


def read_xml(path: str | Path, base: int) -> XMLAnnotation:
    """Parse one VOC-schema annotation file; ``base`` is 1 for PASCAL VOC and 0 for ILSVRC."""
    path = Path(path)
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as err:
        raise AnnotationError(f"{path}: not well-formed XML ({err}); re-extract or regenerate the file") from None
    except OSError as err:
        raise AnnotationError(f"{path}: cannot read the annotation file ({err})") from None
    size = root.find("size")
    try:
        width, height = int(float(_text(size, "width"))), int(float(_text(size, "height")))
    except (TypeError, ValueError):
        raise AnnotationError(
            f"{path}: no usable <size><width>/<height>: every VOC/ILSVRC annotation records the image's size"
        ) from None
    objects = []
    for index, node in enumerate(root.findall("object")):
        name = _text(node, "name")
        if not name:
            raise AnnotationError(f"{path}: <object> {index} has no <name>")
        bndbox = node.find("bndbox")
        box = None
        if bndbox is not None:
            try:
                xmin, ymin, xmax, ymax = (float(_text(bndbox, tag)) for tag in ("xmin", "ymin", "xmax", "ymax"))
            except (TypeError, ValueError):
                raise AnnotationError(
                    f"{path}: <object> {index} ({name}): <bndbox> needs numeric xmin, ymin, xmax, ymax"
                ) from None
            if not all(map(math.isfinite, (xmin, ymin, xmax, ymax))):
                raise AnnotationError(
                    f"{path}: <object> {index} ({name}): <bndbox> holds a coordinate that is not a finite number "
                    f"({xmin}, {ymin}, {xmax}, {ymax})"
                )
            if width <= 0 or height <= 0:
                raise AnnotationError(
                    f"{path}: <size> records the image as {width}x{height}, so its boxes cannot be placed: write the "
                    f"image's real width and height into <size>"
                )
            if xmax < xmin or ymax < ymin:
                raise AnnotationError(
                    f"{path}: <object> {index} ({name}): inverted box xmin={xmin} xmax={xmax} ymin={ymin} "
                    f"ymax={ymax}; fix the file or drop the object (data.drop_invalid: true)"
                )
            box = (xmin - base, ymin - base, xmax - base + 1, ymax - base + 1)
        objects.append(XMLObject(name, box, _flag(node, "difficult"), _flag(node, "truncated")))
    filename = _text(root, "filename") or path.stem
    return XMLAnnotation(path, filename, width, height, tuple(objects))


def read_split(path: str | Path) -> list[tuple[str, int]]:
    """An ``ImageSets`` split file: ``(image id, flag)`` per line. VOC's ``Main/<split>.txt`` has the id
    alone (flag 1); ILSVRC's DET files add an index or ``-1`` for a negative image (flag -1)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"split file {path} does not exist")
    out = []
    for line in path.read_text().splitlines():
        parts = line.split()
        if not parts:
            continue
        flag = -1 if len(parts) > 1 and parts[-1] == "-1" else 1
        out.append((parts[0], flag))
    if not out:
        raise ValueError(f"split file {path} lists no images")
    return out
