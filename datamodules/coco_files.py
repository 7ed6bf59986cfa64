"""A COCO-format dataset's files: where each split's images and annotation file are, its categories, and
the annotation file read and validated (shared by detection and segmentation, which keep flat arrays built
from it; COCO evaluation reads the file itself).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from zoo_common.cache import user_cache
from zoo_common.distributed import broadcast_object, rank

from .coco_format import LAYOUT_HELP, read_coco_json
from .image_checks import report_progress
from .validation import DataValidationError, Report, stop_on_errors, validate_coco

log = logging.getLogger(__name__)

SPLITS: tuple[str, ...] = ("train", "val", "test")


#: part of every validation mark: a new version of the checks invalidates the old marks
CHECKS_VERSION = "1"


def validation_mark(path: Path, images_dir: Path | None) -> Path:
    """The file that says ``path`` passed the checks: keyed by its path, size and modification time and the
    image folder's (a file added to or removed from the folder changes its modification time)."""
    stat = path.stat()
    parts = [CHECKS_VERSION, str(path.resolve()), str(stat.st_size), str(stat.st_mtime_ns)]
    if images_dir is not None and images_dir.is_dir():
        parts += [str(images_dir.resolve()), str(images_dir.stat().st_mtime_ns)]
    return user_cache("validated") / f"{hashlib.sha1('|'.join(parts).encode()).hexdigest()}.ok"


def passes_checks(dataset: dict, path: Path, images_dir: Path | None) -> bool:
    """Whether the file has no error: from its validation mark, or by running the checks (warnings logged)
    and marking it when clean. Errors are not cached: the caller runs the checks again to report them."""
    mark = validation_mark(path, images_dir)
    if mark.is_file():
        log.info("%s: checked before (%s), not again", path, mark)
        return True
    report, _ = validate_coco(dataset, path, images_dir, sizes=False)  # empty files are named when read
    if report.errors:
        return False
    if report.warnings:
        log.info("%s: %d warnings:\n%s", path, len(report.warnings), report.text(limit=10))
    try:  # a mark is an optimization: a read-only cache only means checking again next time
        mark.parent.mkdir(parents=True, exist_ok=True)
        partial = mark.with_suffix(f".{os.getpid()}.tmp")
        partial.write_text(f"{path}\n")
        os.replace(partial, mark)
    except OSError:
        pass
    return True


def read_validated(path: str | Path, images_dir: str | Path | None = None, drop_invalid: bool = False) -> dict:
    """The annotation file ``path`` as a dict, checked (``datamodules.validation.validate_coco``; image files
    against the folder's listing when ``images_dir`` is given, without decoding or a stat per file).

    The checks run once per job: on rank 0 only under DDP (the other ranks wait for its verdict), and not at
    all when the same file and folder passed them before (:func:`validation_mark`, so a requeued job starts
    at once). Errors stop here with the report -- before any training -- unless ``drop_invalid``, which
    drops the offending images and annotations and logs how many. Warnings (degenerate or out-of-image
    boxes, handled later) are logged.
    """
    path = Path(path)
    folder = Path(images_dir) if images_dir is not None else None
    dataset = read_coco_json(path)
    if broadcast_object(passes_checks(dataset, path, folder) if rank() == 0 else None):
        return dataset
    report, cleaned = validate_coco(dataset, path, folder, sizes=False)  # every rank: the same report
    lacking = sum(isinstance(a, dict) and not ("area" in a and "iscrowd" in a) for a in dataset["annotations"])
    if lacking and drop_invalid:  # COCOeval reads them from the file itself: dropping cannot mend that
        raise DataValidationError(
            f"{path}: {lacking} annotations lack 'area' or 'iscrowd', which COCOeval reads from this file "
            f"(data.drop_invalid cannot mend the file). python -m datamodules.check --config <config> --fix "
            f"writes a copy with them filled in; point data.*_annotations at it."
        )
    fix = "Fix the file (python -m datamodules.check --config <config> --fix writes a cleaned copy)"
    stop_on_errors(report, drop_invalid, str(path), fix=fix)
    log.warning(
        "%s: dropped %d images and %d annotations with errors (data.drop_invalid):\n%s",
        path, len(dataset["images"]) - len(cleaned["images"]),
        len(dataset["annotations"]) - len(cleaned["annotations"]), report.text(limit=20),
    )  # fmt: skip
    return cleaned


def load_coco(path: str | Path, images_dir: str | Path | None = None, drop_invalid: bool = False):
    """A ``pycocotools.coco.COCO`` of the file :func:`read_validated` reads and checks."""
    from pycocotools.coco import COCO

    dataset = read_validated(path, images_dir, drop_invalid)
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        coco.createIndex()
    return coco


def unlisted_categories(dataset: dict, listed) -> list[int]:
    """Category ids the annotations of ``dataset`` (an annotation file's dict) use that ``listed`` (the
    model's classes) lacks, sorted."""
    return sorted({a["category_id"] for a in dataset["annotations"]} - set(listed))


class COCOFiles:
    """The files of a COCO-format dataset below ``root``: each split's image folder and annotation file.

    Args:
        root: dataset folder; the other paths are relative to it.
        paths: ``{split: (image folder, annotation file)}`` for ``train``, ``val`` and ``test`` (the names
            :class:`COCOSplits` takes as arguments).
    """

    def __init__(self, root: str | Path, paths: dict[str, tuple[str, str]]) -> None:
        self.root = Path(root).expanduser()
        self.paths = dict(paths)
        self._categories: list[dict] | None = None

    def split_files(self, split: str) -> tuple[Path, Path]:
        """``(images folder, annotation file)`` of ``train``, ``val`` or ``test``."""
        if split not in self.paths:
            raise ValueError(f"unknown split {split!r}: one of {', '.join(SPLITS)}")
        images, annotations = self.paths[split]
        return self.root / images, self.root / annotations

    def annotation_file(self, split: str) -> Path:
        return self.split_files(split)[1]

    def check(self, decode: bool = True, fix: bool = False) -> Iterator[Report]:
        """Both splits' reports (``python -m datamodules.check``), each as it is done; ``fix`` writes a cleaned
        copy of a file with problems next to it (``<name>.fixed.json``)."""
        for split in ("train", "val"):
            images, annotations = self.split_files(split)
            report_progress(f"reading {annotations.name}")
            try:
                dataset = read_coco_json(annotations)
            except (ValueError, FileNotFoundError) as err:
                report = Report(str(annotations))
                report.error(str(annotations), str(err))
                yield report
                continue
            report, cleaned = validate_coco(dataset, annotations, images, decode)
            if fix and report.problems:
                target = annotations.with_name(annotations.stem + ".fixed.json")
                target.write_text(json.dumps(cleaned))
                dropped_images = len(dataset["images"]) - len(cleaned["images"])
                dropped_anns = len(dataset["annotations"]) - len(cleaned["annotations"])
                print(f"wrote {target}: {dropped_images} images and {dropped_anns} annotations dropped; point "
                      f"data.{split}_annotations at it")  # fmt: skip
            yield report

    def check_split(self, split: str) -> None:
        """Raise, naming the path and COCO's layout, when the split's folder or annotation file is missing."""
        images, annotations = self.split_files(split)
        if not images.is_dir():
            raise FileNotFoundError(f"image folder {images} does not exist. {LAYOUT_HELP}")
        if not annotations.is_file():
            raise FileNotFoundError(f"annotation file {annotations} does not exist. {LAYOUT_HELP}")

    def read(self, split: str, drop_invalid: bool = False) -> dict:
        """The split's checked annotation file as a dict (:func:`read_validated`), after checking its files
        exist. The datasets keep flat arrays built from it, not this dict (nor a pycocotools index)."""
        self.check_split(split)
        images, annotations = self.split_files(split)
        dataset = read_validated(annotations, images, drop_invalid=drop_invalid)
        if self._categories is None and annotations == self._categories_file():
            self._categories = sorted(dataset["categories"], key=lambda c: c["id"])  # not parsed again for them
        return dataset

    def _categories_file(self) -> Path | None:
        return next((p for p in map(self.annotation_file, ("val", "train")) if p.is_file()), None)

    @property
    def categories(self) -> list[dict]:
        """COCO categories (``id``, ``name``) sorted by id, from the validation (else training) file."""
        if self._categories is None:
            path = self._categories_file()
            if path is None:
                raise FileNotFoundError(f"no annotation file under {self.root}. {LAYOUT_HELP}")
            self._categories = sorted(read_coco_json(path)["categories"], key=lambda c: c["id"])
        return self._categories


class COCOSplits:
    """The arguments that name a COCO-format dataset's files, written once for every COCO datamodule (a mixin
    before the datamodule's base: ``class COCODetectionDataModule(COCOSplits, DetectionDataModule)``), with the
    methods over them: ``split_files``, ``annotation_file``, the missing-file check and the data check.

    Args:
        root: dataset folder; the other paths are relative to it.
        train_images: training image folder.
        train_annotations: training instances file.
        val_images: validation image folder.
        val_annotations: validation instances file (COCOeval's ground truth).
        test_images: test image folder (defaults to the validation split).
        test_annotations: test instances file (defaults to the validation split).
    """

    #: what ``data.root`` must hold (named by command-line errors)
    layout = LAYOUT_HELP

    def __init__(
        self,
        root: str,
        train_images: str = "train2017",
        train_annotations: str = "annotations/instances_train2017.json",
        val_images: str = "val2017",
        val_annotations: str = "annotations/instances_val2017.json",
        test_images: str | None = None,
        test_annotations: str | None = None,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        test = (test_images or val_images, test_annotations or val_annotations)
        paths = {"train": (train_images, train_annotations), "val": (val_images, val_annotations), "test": test}
        self.files = COCOFiles(root, paths)
        self.root = self.files.root

    def split_files(self, split: str) -> tuple[Path, Path]:
        """``(images folder, annotation file)`` of ``train``, ``val`` or ``test``."""
        return self.files.split_files(split)

    def annotation_file(self, split: str) -> Path:
        """The split's annotation file: COCOeval's ground truth."""
        return self.files.annotation_file(split)

    def _check_split(self, split: str) -> None:
        self.files.check_split(split)

    def check(self, decode: bool = True, fix: bool = False) -> Iterator[Report]:
        """The data check's reports, both splits (``COCOFiles.check``)."""
        return self.files.check(decode, fix)
