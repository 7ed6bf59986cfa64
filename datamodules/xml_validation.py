"""What would break a run in the VOC-schema XML formats (PASCAL VOC, ILSVRC DET): each split's annotation
files read and checked into flat records and a :class:`~datamodules.validation.Report`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .image_checks import image_statuses, report_progress, status_problem
from .records import DetectionRecords
from .validation import Report, clipped, outside_warning, reaches_outside, stop_on_errors


@dataclass
class XMLSplit:
    """A split of per-image XML annotations, read and checked: its records and the report."""

    records: DetectionRecords
    report: Report


def read_xml_split(
    entries: list[tuple[str, Path, Path | None]],
    root: Path,
    base: int,
    class_of,
    subject: str,
    drop_invalid: bool = False,
    decode: bool = False,
    train: bool = True,
) -> XMLSplit:
    """Read and check the annotation files of ``entries`` (``(image id, image file, XML file or None)``).

    Errors: an image or annotation file the split lists but that does not exist, an unreadable file,
    XML that is not well-formed or lacks ``<size>``, a ``<name>`` not in the label set (``class_of``
    returns ``None``), an inverted box (and, with ``decode``, an image of another size than recorded).
    Warnings: boxes reaching outside the image, boxes one pixel wide or tall, objects without a box
    (image-level labels, not detection targets). For training (``train``) the first are clipped to the image and
    the second dropped (they would harm the loss); for evaluation both are kept as written, as the devkits
    score them (a 1-pixel object is a real object to ``VOCevaldet.m`` and ``eval_detection.m``). Images with
    errors stop the run with the report, or with ``drop_invalid`` are left out. ``None`` for the XML file is a
    negative image (ILSVRC's training images without objects).
    """
    from .voc_format import AnnotationError, read_xml

    report = Report(subject)
    ids, names, sizes, boxes, labels, difficult = [], [], [], [], [], []
    statuses = image_statuses([jpeg for _, jpeg, _ in entries], True, f"{subject}: images") if decode else []
    for number, (image, jpeg, xml) in enumerate(entries, start=1):
        if number % 4096 == 1:
            report_progress(f"{subject}: annotation files", number - 1, len(entries))
        report.checked["images"] += 1
        if not jpeg.is_file():
            report.error(str(jpeg), f"image {image}: the file does not exist (the split file lists it)")
            continue
        if xml is None:
            kept, size = [], (0, 0)  # a negative image: no objects, size read when it is decoded
        else:
            if not xml.is_file():
                report.error(str(xml), f"image {image}: no annotation file")
                continue
            try:
                annotation = read_xml(xml, base)
            except AnnotationError as err:
                report.error(str(xml), str(err).split(": ", 1)[-1])
                continue
            size = (annotation.width, annotation.height)
            kept, bad = [], False
            for index, obj in enumerate(annotation.objects):
                where = f"{xml.name} <object> {index} ({obj.name})"
                category = class_of(obj.name)
                if category is None:
                    report.error(str(xml), f"{where}: '{obj.name}' is not one of the dataset's classes")
                    bad = True
                    continue
                if obj.box is None:
                    report.checked["objects without a box"] += 1
                    continue
                report.checked["objects"] += 1
                x1, y1, x2, y2 = obj.box
                w, h = annotation.width, annotation.height
                if reaches_outside(obj.box, w, h):
                    report.warning(str(xml), f"{where}: {outside_warning(obj.box, w, h, train)}")
                if train:
                    x1, y1, x2, y2 = clipped(obj.box, w, h)
                if x2 - x1 <= 1 or y2 - y1 <= 1:
                    done = "dropped for training" if train else "kept for evaluation: the devkit counts it"
                    report.warning(str(xml), f"{where}: box {obj.box} is one pixel wide or tall ({done})")
                    if train:
                        continue
                kept.append(((x1, y1, x2, y2), category, obj.difficult))
            if bad:
                continue
        if decode:
            problem = status_problem(statuses[number - 1], size if size != (0, 0) else None, jpeg)
            if problem:
                report.error(str(jpeg), f"image {image}: {problem}")
                continue
        ids.append(number)
        names.append(str(jpeg.relative_to(root)))
        sizes.append(size)
        boxes.append([k[0] for k in kept])
        labels.append([k[1] for k in kept])
        difficult.append([k[2] for k in kept])
    stop_on_errors(report, drop_invalid, subject)
    return XMLSplit(DetectionRecords.build(ids, names, sizes, boxes, labels, difficult), report)
