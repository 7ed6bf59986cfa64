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
image is this command's job (``--no_decode`` skips it); during training ``data.skip_corrupt: true``
skips unreadable images as they are met, and an image of the wrong size stops the run when it is read.
"""

from __future__ import annotations

import sys

if __name__ == "__main__":  # at once: loading PyTorch and Lightning takes seconds, the check may take hours
    print("python -m datamodules.check: starting (loading PyTorch and Lightning)", file=sys.stderr, flush=True)

import argparse
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    ProgressColumn,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.progress import Progress as RichProgress
from rich.text import Text

from zoo_common.command import run_command

from .contract import CheckableData
from .image_checks import image_pass
from .images import CorruptImageError
from .validation import DataValidationError, Report

__all__ = ["DataValidationError", "Progress", "check_datamodule", "main"]


# -- the command ----------------------------------------------------------------------------------------
def check_datamodule(datamodule, decode: bool = True, fix: bool = False) -> Iterator[Report]:
    """Every split's report of a configured datamodule, each as soon as it is done: its ``check(decode, fix)``
    (``datamodules.contract.CheckableData``; every datamodule here has one). Images are read in the current
    ``image_checks.image_pass``'s threads."""
    if not isinstance(datamodule, CheckableData):
        raise ValueError(f"no checks for {type(datamodule).__name__}: it has no check(decode, fix) method")
    yield from datamodule.check(decode=decode, fix=fix)


class Progress:
    """The check's progress on stderr, step by step (``what``: reading a file, listing folders, reading the
    images): on a terminal a Rich bar with the count, rate and time left; elsewhere (a SLURM log, a pipe) a
    line when a step starts and every ``every`` seconds, with the same figures."""

    def __init__(self, console: Console | None = None, every: float = 10.0) -> None:
        self.console = console or Console(stderr=True)
        self.every = every
        self.bar: RichProgress | None = None
        self.task: TaskID | None = None
        self.what: str | None = None
        self.started = self.printed = 0.0
        self.last = -1

    def __call__(self, what: str, done: int, total: int | None) -> None:
        now = time.monotonic()
        new = what != self.what
        if new:
            self.what, self.started, self.printed, self.last = what, now, 0.0, -1
        if self.console.is_terminal:
            self._bar(what, done, total, new)
        elif new or (done != self.last and (now - self.printed >= self.every or done == total)):
            self.printed, self.last = now, done
            self.console.print(self._line(what, done, total, now - self.started), highlight=False, soft_wrap=True)

    def _bar(self, what: str, done: int, total: int | None, new: bool) -> None:
        if self.bar is None:
            self.bar = RichProgress(
                SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), _Rate(),
                TimeElapsedColumn(), TextColumn("left"), TimeRemainingColumn(), console=self.console,
            )  # fmt: skip
            self.bar.start()
        if new:
            if self.task is not None:
                self.bar.stop_task(self.task)
            self.task = self.bar.add_task(what, total=total)
        self.bar.update(self.task, completed=done, total=total)

    @staticmethod
    def _line(what: str, done: int, total: int | None, elapsed: float) -> str:
        if total is None:
            return f"{what} ..."
        if done == 0:
            return f"{what}: {total:,} to check"
        rate = done / elapsed if elapsed > 0 else 0.0
        left = f", {_clock((total - done) / rate)} left" if rate > 0 and done < total else ""
        return f"{what}: {done:,}/{total:,} ({rate:,.0f}/s, {_clock(elapsed)} elapsed{left})"

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


class _Rate(ProgressColumn):
    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:,.0f}/s" if speed else "")


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def main(argv: list[str] | None = None) -> int:
    import yaml
    from jsonargparse import ArgumentParser
    from lightning.pytorch import LightningDataModule

    from . import load_all

    load_all()  # --data by its short name
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("-c", "--config")
    known, rest = pre.parse_known_args(argv)
    parser = ArgumentParser(prog="python -m datamodules.check", description=__doc__.split("\n")[0])
    parser.add_argument("-c", "--config", help="a task config: its data section is checked")
    parser.add_subclass_arguments(LightningDataModule, "data", required=True)
    parser.add_argument("--fix", action="store_true", help="write cleaned COCO annotation files (*.fixed.json)")
    parser.add_argument(
        "--no_decode",
        action="store_true",
        help="a fast pass: existence and size of every file, annotations, classes; no image decoded",
    )
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)),
                        help="threads reading the images (default: the cores this process may use)")  # fmt: skip
    if known.config:
        section = (yaml.safe_load(Path(known.config).read_text()) or {}).get("data")
        if section is None:
            raise ValueError(f"{known.config} has no data section to check")
        rest = ["--data", json.dumps(section), *rest]
    elif not any(arg == "--data" or arg.startswith("--data=") for arg in rest) and "--help" not in rest:
        given = next((arg for arg in rest if arg.startswith("--data.")), None)
        names = ", ".join(
            f"datamodules.{n}"
            for n in ("ImageFolderDataModule", "CIFARDataModule", "COCODetectionDataModule", "VOCDetectionDataModule")
        )
        raise ValueError(
            f"{given or '--data'} needs the datamodule's class first: --data <class> (one of {names}, ...), or "
            f"--config <the task's config file>, whose data section is checked"
        )
    args = parser.parse_args(rest)
    datamodule = parser.instantiate(args).data
    if hasattr(datamodule, "prepare_data"):
        datamodule.prepare_data()
    progress = Progress()
    errors = warnings = 0
    try:
        with image_pass(args.workers, progress):
            for report in check_datamodule(datamodule, decode=not args.no_decode, fix=args.fix):
                print(report.text(limit=200), flush=True)
                errors, warnings = errors + len(report.errors), warnings + len(report.warnings)
    finally:
        progress.close()
    print(f"total: {errors} errors, {warnings} warnings")
    return 1 if errors else 0


if __name__ == "__main__":
    run_command(main, (CorruptImageError,))
