"""Reading image files for the checks: a stat, or a full decode, of every file, in a process pool, with
progress -- the long part of ``python -m datamodules.check`` (decoding ImageNet's 1.28M files takes hours in
one process).

:func:`image_statuses` reads a list of files; what it finds (:data:`ImageStatus`) is a problem or the decoded
size, which :func:`status_problem` compares with what an annotation file records. :func:`image_pass` sets,
for a block, how many processes read and what is told of the progress (:func:`report_progress`); outside
one everything runs in this process and reports nothing (the datamodules' setup decodes nothing).
"""

from __future__ import annotations

import multiprocessing as mp
import os
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path

import torch

from .images import CorruptImageError, read_image


def image_problem(path: Path, decode: bool, expected: tuple[int, int] | None = None) -> str | None:
    """Why ``path`` cannot be used as an image (decoded: also when it is not ``expected``, width x height),
    or ``None``."""
    return status_problem(_image_status((str(path), decode)), expected)


def size_problem(found: tuple[int, int], expected: tuple[int, int]) -> str | None:
    """Why an image of ``found`` (width, height) cannot carry annotations made for one of ``expected``."""
    if tuple(found) == tuple(expected):
        return None
    return (
        f"the image is {found[0]}x{found[1]} but the annotation file says {expected[0]}x{expected[1]}, so its "
        f"boxes and masks would be misplaced"
    )


# -- reading every image: the check's long part, in a process pool, with progress --------------------------
#: What reading one image file found: a problem, the decoded ``(width, height)``, or ``None`` (the file is
#: there and not empty; not decoded).
ImageStatus = str | tuple[int, int] | None


@dataclass(frozen=True)
class ImagePass:
    """How the checks read image files: ``workers`` processes (1: this one), and ``progress(what, done,
    total)`` told how far they are (``total`` ``None``: a step without a count, such as reading a file)."""

    workers: int = 1
    progress: Callable[[str, int, int | None], None] | None = None


_IMAGE_PASS: ContextVar[ImagePass | None] = ContextVar("image_pass", default=None)


@contextmanager
def image_pass(workers: int = 1, progress: Callable[[str, int, int | None], None] | None = None):
    """Within this block, the checks read images in ``workers`` processes and report to ``progress``
    (``python -m datamodules.check``; the datamodules' setup reads no image and reports nothing)."""
    token = _IMAGE_PASS.set(ImagePass(max(1, workers), progress))
    try:
        yield
    finally:
        _IMAGE_PASS.reset(token)


def report_progress(what: str, done: int = 0, total: int | None = None) -> None:
    """Tell the current :func:`image_pass`'s progress display how far a step is (a no-op outside one)."""
    settings = _IMAGE_PASS.get()
    if settings is not None and settings.progress is not None:
        settings.progress(what, done, total)


def _image_status(job: tuple[str, bool]) -> ImageStatus:
    path, decode = job
    try:
        size = os.stat(path).st_size
    except FileNotFoundError:
        return "the file does not exist"
    except OSError as err:
        return str(err)
    if size == 0:
        return "the file is empty (0 bytes)"
    if not decode:
        return None
    try:
        image = read_image(path)
    except CorruptImageError as err:
        return str(err).split(": ", 1)[-1]
    return int(image.shape[-1]), int(image.shape[-2])


def _one_thread() -> None:
    torch.set_num_threads(1)  # the pool's processes share the cores: one thread each


def image_statuses(paths: Sequence[str | Path], decode: bool, what: str = "images") -> list[ImageStatus]:
    """Each file's :data:`ImageStatus`, in order: a stat (no decoding) or a full decode, in the current
    :func:`image_pass`'s processes (forked: the decoders need nothing from this process but the paths)."""
    settings = _IMAGE_PASS.get() or ImagePass()
    jobs = [(str(path), decode) for path in paths]
    total = len(jobs)
    step = max(1, min(256, total // 200))
    report_progress(what, 0, total)
    statuses: list[ImageStatus] = []
    if settings.workers == 1 or total < 4 * settings.workers:
        done = map(_image_status, jobs)
        pool = None
    else:
        pool = mp.get_context("fork").Pool(settings.workers, initializer=_one_thread)
        done = pool.imap(_image_status, jobs, chunksize=max(1, min(64, total // (8 * settings.workers))))
    try:
        for status in done:
            statuses.append(status)
            if len(statuses) % step == 0:
                report_progress(what, len(statuses), total)
    finally:
        if pool is not None:
            pool.terminate()
    report_progress(what, total, total)
    return statuses


def status_problem(status: ImageStatus, expected: tuple[int, int] | None = None) -> str | None:
    """The problem an :data:`ImageStatus` names, checking a decoded size against ``expected`` (width, height)."""
    if isinstance(status, str):
        return status
    if status is None or expected is None:
        return None
    return size_problem(status, expected)
