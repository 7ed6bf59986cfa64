"""The ImageFolder layout (ImageNet's as distributed, and any ``<split>/<class>/<images>`` tree), read fast.

Class indices are the sorted folder names of the training split (for ImageNet, the WordNet ids
``n01440764`` ...); human-readable names come from ImageNet's ``LOC_synset_mapping.txt`` when it is in
the root or its parent. Nothing here decodes an image: this is the floor of formats the datasets, the
validation and the ``check`` command read.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

from .images import IMAGE_EXTENSIONS, is_image_file

LAYOUT_HELP = (
    "Expected an ImageFolder tree: <root>/{train}/<class name>/<image files> and the same for the "
    "validation folder (ImageNet: train/n01440764/n01440764_10026.JPEG, val/n01440764/*.JPEG)."
)


def find_classes(directory: Path) -> list[str]:
    """Sorted names of the class folders in ``directory``."""
    return sorted(entry.name for entry in os.scandir(directory) if entry.is_dir() and not entry.name.startswith("."))


def scan_folder(directory: Path | str, loops: list[tuple[str, str]] | None = None) -> tuple[list[str], Counter]:
    """One walk below ``directory`` (directory listings only: no call per file): its image files as path
    strings (sorted), and how many other files it holds by suffix (hidden files aside).

    Symbolic links to folders are followed, each folder once: a link back to a folder already walked (a link
    to itself or to a parent: a loop, which would list the same images dozens of times until the system's link
    limit) is not followed again, and is appended to ``loops`` as ``(link, the folder it leads to)``.
    """
    found: list[str] = []
    others: Counter = Counter()
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(directory, followlinks=True):
        real = os.path.realpath(dirpath)
        seen.add(real)
        kept = []
        for d in sorted(d for d in dirnames if not d.startswith(".")):
            target = os.path.realpath(os.path.join(dirpath, d))
            if target in seen or real.startswith(target + os.sep) or target == real:
                if loops is not None:
                    loops.append((os.path.join(dirpath, d), target))
                continue
            kept.append(d)
        dirnames[:] = kept
        names = sorted(filenames)
        images = [name for name in names if name.lower().endswith(IMAGE_EXTENSIONS)]  # is_image_file, inlined
        prefix = dirpath if dirpath.endswith(os.sep) else dirpath + os.sep  # os.path.join's, per folder
        found.extend(map(prefix.__add__, images))
        if len(images) < len(names):
            for name in names:
                if not is_image_file(name) and not name.startswith("."):
                    others[os.path.splitext(name)[1].lower() or name] += 1
    return found, others


def list_images(directory: Path) -> list[Path]:
    """Every image file below ``directory``, sorted."""
    return [Path(p) for p in scan_folder(directory)[0]]


def no_images_problem(folder: Path, others: Counter | None = None) -> str:
    """What to say about a class folder without readable images: empty, or holding files of other types."""
    others = scan_folder(folder)[1] if others is None and folder.is_dir() else (others or Counter())
    if not others:
        return "class folder without images"
    kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(others.items()))
    return (
        f"class folder without images it can read: it holds {kinds} files; the readable formats are "
        f"{', '.join(IMAGE_EXTENSIONS)} (convert the files, e.g. to PNG)"
    )


def list_samples(directory: Path, classes: list[str]) -> list[tuple[str, int]]:
    """``(path, class index)`` for every image of ``directory/<class>/``, classes in the given order
    (``datamodules.validation.validate_imagefolder`` also checks them)."""
    samples: list[tuple[str, int]] = []
    for index, name in enumerate(classes):
        if (directory / name).is_dir():
            samples.extend((path, index) for path in scan_folder(directory / name)[0])
    return samples


def loose_images(directory: Path) -> list[str]:
    """Image files directly in ``directory`` (not in a class folder)."""
    return [entry.name for entry in os.scandir(directory) if entry.is_file() and is_image_file(entry.name)]


def class_archives(directory: Path) -> list[str]:
    """``.tar`` files in ``directory``: ImageNet's training archive unpacks into one tar per class."""
    return [entry.name for entry in os.scandir(directory) if entry.name.endswith(".tar")]


def synset_names(root: Path) -> dict[str, str]:
    """WordNet id to first human-readable name, from ``LOC_synset_mapping.txt`` (Kaggle ImageNet layout)."""
    for candidate in (root / "LOC_synset_mapping.txt", root.parent / "LOC_synset_mapping.txt"):
        if candidate.is_file():
            names = {}
            for line in candidate.read_text().splitlines():
                wnid, _, text = line.strip().partition(" ")
                if wnid:
                    names[wnid] = text.split(",")[0].strip() or wnid
            return names
    return {}
