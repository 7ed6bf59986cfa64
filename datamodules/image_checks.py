"""Reading image files for the checks: a stat, or a full decode, of every file, in a pool of threads, with
progress -- the long part of ``python -m datamodules.check`` (decoding ImageNet's 1.28M files takes hours on
one core).

:func:`image_statuses` reads a list of files; what it finds (:data:`ImageStatus`) is a problem or the decoded
size, which :func:`status_problem` compares with what an annotation file records. :func:`image_pass` sets,
for a block, how many threads read and what is told of the progress (:func:`report_progress`); outside
one everything runs in the calling thread and reports nothing (the datamodules' setup decodes nothing).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path

from .images import CorruptImageError, read_image


def image_problem(path: Path, decode: bool, expected: tuple[int, int] | None = None) -> str | None:
    """Why ``path`` cannot be used as an image (decoded: also when it is not ``expected``, width x height),
    or ``None``."""
    return status_problem(_image_status((str(path), decode)), expected, path)


def size_problem(found: tuple[int, int], expected: tuple[int, int], path=None) -> str | None:
    """Why an image of ``found`` (width, height) cannot carry annotations made for one of ``expected``; with
    its ``path``, a size turned by the file's EXIF orientation tag is said to be that."""
    if tuple(found) == tuple(expected):
        return None
    problem = (
        f"the image is {found[0]}x{found[1]} but the annotation file says {expected[0]}x{expected[1]}, so its "
        f"boxes and masks would be misplaced"
    )
    if path is not None and tuple(found) == tuple(expected)[::-1] and exif_rotation(path):
        problem += (
            f": its EXIF orientation tag ({exif_rotation(path)}) turns it to the recorded size when displayed, so the "
            f"annotations were made on the turned picture, which the decoder does not turn. Save the images turned "
            f"(e.g. exiftran -ai, or PIL's ImageOps.exif_transpose) before training"
        )
    return problem


def exif_rotation(path) -> str | None:
    """The rotation a JPEG's EXIF orientation tag (5 to 8) asks for when the picture is shown, or ``None``."""
    try:
        from PIL import Image

        with Image.open(path) as image:
            orientation = image.getexif().get(0x0112)
    except (OSError, ValueError):
        return None
    return {5: "5: mirrored, turned 90 degrees", 6: "6: turned 90 degrees", 7: "7: mirrored, turned 270 degrees",
            8: "8: turned 270 degrees"}.get(orientation)  # fmt: skip


# -- reading every image: the check's long part, in a pool of threads, with progress -----------------------
#: What reading one image file found: a problem, the decoded ``(width, height)``, or ``None`` (the file is
#: there and not empty; not decoded).
ImageStatus = str | tuple[int, int] | None


@dataclass(frozen=True)
class ImagePass:
    """How the checks read image files: ``workers`` threads (1: the calling one), and ``progress(what, done,
    total)`` told how far they are (``total`` ``None``: a step without a count, such as reading a file)."""

    workers: int = 1
    progress: Callable[[str, int, int | None], None] | None = None


_IMAGE_PASS: ContextVar[ImagePass | None] = ContextVar("image_pass", default=None)


@contextmanager
def image_pass(workers: int = 1, progress: Callable[[str, int, int | None], None] | None = None):
    """Within this block, the checks read images in ``workers`` threads and report to ``progress``
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


def image_statuses(paths: Sequence[str | Path], decode: bool, what: str = "images") -> list[ImageStatus]:
    """Each file's :data:`ImageStatus`, in order: a stat (no decoding) or a full decode, in the current
    :func:`image_pass`'s threads. Threads, not processes: PyTorch's decoders and file reads release the GIL
    (two threads decode twice as fast as one, measured), and nothing is forked from a process whose other
    threads may hold locks (a forked worker of a multi-threaded process can hang for ever on one)."""
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
        pool = ThreadPoolExecutor(settings.workers, thread_name_prefix="image-check")
        chunks = (jobs[start : start + 4096] for start in range(0, total, 4096))  # not a future per file at once
        done = (status for chunk in chunks for status in pool.map(_image_status, chunk))
    try:
        for status in done:
            statuses.append(status)
            if len(statuses) % step == 0:
                report_progress(what, len(statuses), total)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    report_progress(what, total, total)
    return statuses


def status_problem(status: ImageStatus, expected: tuple[int, int] | None = None, path=None) -> str | None:
    """The problem an :data:`ImageStatus` names, checking a decoded size against ``expected`` (width, height)
    (``path``: the file, to tell an EXIF-turned one)."""
    if isinstance(status, str):
        return status
    if status is None or expected is None:
        return None
    return size_problem(status, expected, path)
