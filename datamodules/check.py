"""Dataset validation before training: ``python -m datamodules.check --config <config> [--fix]``.

Scans the dataset a config points to and reports, file by file, what would break or silently corrupt a
run: unreadable or truncated images, annotation files that are not valid COCO or lack the 'area' and
'iscrowd' fields COCOeval reads (``--fix`` fills them in), boxes of zero or
negative size or outside their image, category ids missing from ``categories``, annotations of images
that do not exist, images listed twice or missing on disk, images whose size is not the one their
annotation file records (a resized copy: every box and mask would be misplaced), polygons of fewer
than 3 points (warned of; left out of segmentation masks), ImageFolder classes without images; for the
XML formats (PASCAL VOC, ILSVRC DET and CLS-LOC) malformed XML, inverted boxes or boxes outside the image,
names not in the label set, images without an annotation file or label, and files a split lists but
that are missing. The report ends with counts; the command exits with status 1 when there are errors.

The datamodules run the cheap part (everything but decoding every image) when they set up, and stop
with this report before training starts. ``data.drop_invalid: true`` drops the offending items instead
(counts logged); ``--fix`` writes a cleaned copy of a COCO annotation file next to it. Decoding every
image is this command's job (``--no-decode`` skips it); during training ``data.skip_corrupt: true``
skips unreadable images as they are met, and an image of the wrong size stops the run when it is read.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from zoo_common.command import run_command

from .coco_files import COCOFiles
from .coco_format import read_coco_json
from .imagefolder import ImageFolderDataModule
from .images import CorruptImageError
from .validation import DataValidationError, Report, validate_coco, validate_imagefolder

__all__ = ["DataValidationError", "check_datamodule", "main"]


# -- the command ----------------------------------------------------------------------------------------
def check_datamodule(datamodule, decode: bool = True, fix: bool = False) -> list[Report]:
    """Every split of a configured datamodule: ImageFolder and COCO kinds here; any other datamodule with a
    ``check(decode)`` method returning its reports (the VOC, ILSVRC DET and CLS-LOC kinds)."""
    if callable(getattr(datamodule, "check", None)):
        return datamodule.check(decode=decode)
    reports = []
    if isinstance(datamodule, ImageFolderDataModule):
        classes = datamodule.classes  # the training split's class folders (an error names a missing one)
        for split in ("train", "val"):
            path = datamodule.split_path(split)
            report, _ = validate_imagefolder(path, classes, train=split == "train", decode=decode)
            if split == "train" or path != datamodule.split_path("train"):
                reports.append(report)
        return reports
    files = getattr(datamodule, "files", None)
    if isinstance(files, COCOFiles):
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
    datamodule = parser.instantiate(args).data
    if hasattr(datamodule, "prepare_data"):
        datamodule.prepare_data()
    reports = check_datamodule(datamodule, decode=not args.no_decode, fix=args.fix)
    for report in reports:
        print(report.text(limit=200))
    errors = sum(len(r.errors) for r in reports)
    print(f"total: {errors} errors, {sum(len(r.warnings) for r in reports)} warnings")
    return 1 if errors else 0


if __name__ == "__main__":
    run_command(main, (CorruptImageError,))
