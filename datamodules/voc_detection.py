"""PASCAL VOC and ILSVRC DET in their distributed layouts, for ``tasks.detect``.

PASCAL VOC (``data.root`` is the ``VOCdevkit`` folder)::

    VOCdevkit/VOC2007/JPEGImages/000005.jpg
    VOCdevkit/VOC2007/Annotations/000005.xml          (1-based pixel boxes, <difficult>)
    VOCdevkit/VOC2007/ImageSets/Main/{trainval,test}.txt
    VOCdevkit/VOC2012/...

ILSVRC DET (``data.root`` is the ``ILSVRC`` folder of the ILSVRC2015 archives)::

    ILSVRC/Data/DET/{train,val}/<image id>.JPEG
    ILSVRC/Annotations/DET/{train,val}/<image id>.xml  (0-based pixel boxes, synset ids as names)
    ILSVRC/ImageSets/DET/{train_1..train_200,val}.txt  (ids; "-1" marks a negative training image)
    devkit/data/map_det.txt                            (the 200 synsets and their names; optional)

A split is a list of ``<year or subset>:<split file>`` (VOC: ``2007:trainval``, the file under
``VOC2007/ImageSets/Main``; ILSVRC: ``train:ImageSets/DET/train_*.txt``, a path or glob under ``root``,
or any file of ids such as R-CNN's val1/val2 split). Images are numbered in the order listed. Every
annotation file is read and checked (``datamodules.xml_validation.read_xml_split``): an unknown class, a
missing file, a box outside the image or inverted stop the run with a report naming each, unless
``data.drop_invalid``. PASCAL VOC's ``difficult`` objects stay in the ground truth, which the metric does
not score, and leave the training targets.
"""

from __future__ import annotations

import glob
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from .detection import DetectionDataModule
from .records import DetectionRecords
from .validation import DataValidationError, Report
from .voc_format import VOC_CLASSES
from .xml_validation import XMLSplit, read_xml_split

VOC_LAYOUT = (
    "Expected PASCAL VOC's layout: <root>/VOC2007/{JPEGImages,Annotations,ImageSets/Main}, likewise VOC2012 "
    "(data.root is the VOCdevkit folder)."
)
ILSVRC_LAYOUT = (
    "Expected ILSVRC DET's layout: <root>/Data/DET/<subset>/, <root>/Annotations/DET/<subset>/ and "
    "<root>/ImageSets/DET/*.txt (data.root is the ILSVRC folder)."
)


class _XMLDetectionDataModule(DetectionDataModule):
    """A detection format of per-image VOC-schema XML files listed by split files."""

    base: int = 1
    layout_help: str = ""

    def __init__(self, root: str, train_sets: list[str], val_sets: list[str], test_sets: list[str] | None,
                 **kwargs: Any) -> None:  # fmt: skip
        super().__init__(**kwargs)
        self.root = Path(root).expanduser()
        self.sets = {"train": list(train_sets), "val": list(val_sets), "test": list(test_sets or val_sets)}
        self._splits: dict[str, XMLSplit] = {}

    def images_dir(self, split: str) -> Path:
        return self.root

    # -- what a format says about one entry of a split -------------------------------------------
    def _entries(self, spec: str) -> list[tuple[str, Path, Path | None]]:
        """``(image id, image file, annotation file or None)`` of each image a split entry lists."""
        raise NotImplementedError

    #: the category field an object's ``<name>`` holds (VOC: the class name; ILSVRC: the synset id)
    name_key: str = "name"

    def _class_of(self, name: str) -> int | None:
        """The category id of an object's ``<name>`` (``None``: not in the label set)."""
        return {c[self.name_key]: c["id"] for c in self.categories}.get(name)

    def _check_split(self, split: str) -> None:
        if not self.root.is_dir():
            raise FileNotFoundError(f"{self.root} does not exist. {self.layout_help}")
        for spec in self.sets[split]:
            self._entries(spec)  # a missing split file or folder is named here, before any run starts

    def xml_split(self, split: str) -> XMLSplit:
        """The split's annotations read and checked (cached: each file is parsed once per process)."""
        if split not in self._splits:
            entries = [entry for spec in self.sets[split] for entry in self._entries(spec)]
            xml = read_xml_split(entries, self.root, self.base, self._class_of, split, self.hparams.drop_invalid,
                                 train=split == "train")  # fmt: skip
            self._splits[split] = xml
        return self._splits[split]

    def _records(self, split: str) -> DetectionRecords:
        return self.xml_split(split).records

    def check(self, decode: bool = True, fix: bool = False) -> Iterator[Report]:
        """The data check's reports (``python -m datamodules.check``), each split's as soon as it is done: its
        every file, all problems listed (nothing stops at the first)."""
        for split in ("train", "val"):
            try:
                entries = [entry for spec in self.sets[split] for entry in self._entries(spec)]
            except (FileNotFoundError, ValueError) as err:
                report = Report(split)
                report.error(str(self.root), str(err))
                yield report
                continue
            yield read_xml_split(entries, self.root, self.base, self._class_of, split, drop_invalid=True,
                                 decode=decode, train=split == "train").report  # fmt: skip


class VOCDetectionDataModule(_XMLDetectionDataModule):
    """PASCAL VOC detection, scored by the VOC devkit's mean AP at IoU 0.5.

    Args:
        root: the ``VOCdevkit`` folder.
        train_sets: ``<year>:<split>`` entries; the default is the ResNet paper's 07+12 (Table 7).
        val_sets: the sets validated on (VOC 2007 test).
        test_sets: the sets tested on (defaults to ``val_sets``).
        metric: ``voc07`` (VOC 2007's 11-point interpolated AP), ``voc`` (VOC 2010+'s area under the
            precision-recall curve) or ``auto``: ``voc07`` when every evaluated set is VOC 2007's.
        classes: the class names, in the order of the model's classes (ids 1, 2, ...); ``None`` is VOC's 20.
            Datasets written in VOC's layout with their own classes name them here.
        kwargs: the loaders' options, see :class:`datamodules.detection.DetectionDataModule`.
    """

    layout = VOC_LAYOUT
    layout_help = VOC_LAYOUT
    base = 1

    def __init__(
        self,
        root: str,
        train_sets: list[str] = ("2007:trainval", "2012:trainval"),
        val_sets: list[str] = ("2007:test",),
        test_sets: list[str] | None = None,
        metric: Literal["auto", "voc07", "voc"] = "auto",
        classes: list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(root, train_sets, val_sets, test_sets, **kwargs)
        self.metric = metric
        self.classes = list(classes) if classes else list(VOC_CLASSES)

    @property
    def protocol(self) -> str:
        if self.metric != "auto":
            return self.metric
        years = {spec.split(":", 1)[0] for split in ("val", "test") for spec in self.sets[split]}
        return "voc07" if years == {"2007"} else "voc"

    @property
    def categories(self) -> list[dict]:
        return [{"id": k, "name": name} for k, name in enumerate(self.classes, start=1)]

    def _entries(self, spec: str) -> list[tuple[str, Path, Path | None]]:
        year, _, name = spec.partition(":")
        if not name:
            raise ValueError(f"data sets entry {spec!r}: write <year>:<split>, e.g. 2007:trainval")
        folder = self.root / f"VOC{year}"
        split_file = folder / "ImageSets" / "Main" / f"{name}.txt"
        if not split_file.is_file():
            raise FileNotFoundError(f"split file {split_file} does not exist. {VOC_LAYOUT}")
        from .voc_format import read_split

        return [
            (f"{year}/{image}", folder / "JPEGImages" / f"{image}.jpg", folder / "Annotations" / f"{image}.xml")
            for image, _ in read_split(split_file)
        ]


def read_synsets(root: Path, path: str | None) -> list[tuple[str, str]]:
    """ILSVRC DET's synsets in index order, ``(wnid, name)``, from the devkit's ``map_det.txt`` (``path``,
    else found under ``root/devkit/data``, ``root/../devkit/data`` or ``root``); empty if there is none."""
    candidates = [Path(path)] if path else [root / "devkit/data/map_det.txt", root.parent / "devkit/data/map_det.txt",
                                             root / "map_det.txt"]  # fmt: skip
    for candidate in candidates:
        if candidate.is_file():
            rows = [line.split(maxsplit=2) for line in candidate.read_text().splitlines() if line.strip()]
            rows = sorted((int(r[1]), r[0], r[2] if len(r) > 2 else r[0]) for r in rows)
            return [(wnid, name) for _, wnid, name in rows]
    if path:
        raise FileNotFoundError(f"data.synsets_file={path} does not exist (ILSVRC's devkit/data/map_det.txt)")
    return []


class ILSVRCDetectionDataModule(_XMLDetectionDataModule):
    """ILSVRC DET (200 classes), scored by the ILSVRC devkit's mean AP with its small-object IoU rule.

    Args:
        root: the ``ILSVRC`` folder.
        train_sets: ``<subset>:<split file or glob>`` entries, files relative to ``root`` (the ResNet
            paper trained on train + val1 of R-CNN's split: add ``val:<your val1.txt>``).
        val_sets: the sets validated on (the paper: val2 of R-CNN's split).
        test_sets: the sets tested on (defaults to ``val_sets``).
        synsets_file: the devkit's ``map_det.txt`` (the 200 synsets in order, with names); found next to
            ``root`` when not given, else the synsets the annotation files use, named by their ids.
        blacklist: the devkit's ``ILSVRC2015_det_validation_blacklist.txt`` (``<val.txt index> <synset>`` per
            line; a path, or relative to ``root``): in evaluation each listed (image, class) pair is left out as
            ``eval_detection.m`` leaves it out -- the image's detections of that class count neither way and its
            objects of that class are not positives. The official DET validation numbers use it.
        kwargs: the loaders' options, see :class:`datamodules.detection.DetectionDataModule`.
    """

    layout = ILSVRC_LAYOUT
    layout_help = ILSVRC_LAYOUT
    base = 0
    protocol = "ilsvrc"
    name_key = "synset"

    def __init__(
        self,
        root: str,
        train_sets: list[str] = ("train:ImageSets/DET/train_*.txt",),
        val_sets: list[str] = ("val:ImageSets/DET/val.txt",),
        test_sets: list[str] | None = None,
        synsets_file: str | None = None,
        blacklist: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(root, train_sets, val_sets, test_sets, **kwargs)
        self.synsets_file = synsets_file
        self.blacklist = blacklist
        self._categories: list[dict] | None = None
        self._blacklisted: set[tuple[str, int]] | None = None

    def evaluation_blacklist(self, split: str) -> set[tuple[int, int]] | None:
        """The blacklist's ``(image id, category id)`` pairs among the split's images (none for training)."""
        if not self.blacklist or split == "train":
            return None
        if self._blacklisted is None:
            self._blacklisted = self._read_blacklist()
        records = self._records(split)
        by_name = {Path(records.name(k)).stem: int(records.ids[k]) for k in range(len(records))}
        return {(by_name[name], cid) for name, cid in self._blacklisted if name in by_name}

    def _read_blacklist(self) -> set[tuple[str, int]]:
        """``(image name, category id)`` of each line of the blacklist; its image numbers are indexes of the
        devkit's validation list, ``ImageSets/DET/val.txt`` (``<image name> <index>`` per line)."""
        path = Path(self.blacklist).expanduser()
        path = path if path.is_absolute() or path.is_file() else self.root / path
        if not path.is_file():
            raise FileNotFoundError(f"data.blacklist={self.blacklist}: no such file (the devkit's "
                                    f"data/ILSVRC2015_det_validation_blacklist.txt)")  # fmt: skip
        listing = self.root / "ImageSets" / "DET" / "val.txt"
        if not listing.is_file():
            raise FileNotFoundError(f"data.blacklist: its image numbers index {listing}, which does not exist")
        names = {}
        for line in listing.read_text().splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[1].lstrip("-").isdigit():
                names[int(parts[1])] = parts[0]
        synsets = {c["synset"]: c["id"] for c in self.categories}
        pairs = set()
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 2 or not parts[0].isdigit() or int(parts[0]) not in names or parts[1] not in synsets:
                raise ValueError(
                    f"{path}:{number}: {line.strip()!r} is not '<index of {listing.name}> <one of the "
                    f"{len(synsets)} synsets>'"
                )
            pairs.add((names[int(parts[0])], synsets[parts[1]]))
        return pairs

    @property
    def categories(self) -> list[dict]:
        if self._categories is None:
            synsets = read_synsets(self.root, self.synsets_file)
            if not synsets:  # no devkit: the synsets the validation (else training) annotations use
                split = "val" if self.sets["val"] else "train"
                seen = sorted({o.name for a in self._peek(split) for o in a.objects})
                synsets = [(wnid, wnid) for wnid in seen]
            self._categories = [{"id": k, "synset": w, "name": n} for k, (w, n) in enumerate(synsets, start=1)]
        return self._categories

    def _peek(self, split: str):
        from .voc_format import read_xml

        return [read_xml(xml, 0) for spec in self.sets[split] for _, _, xml in self._entries(spec)
                if xml is not None and xml.is_file()]  # fmt: skip

    def _entries(self, spec: str) -> list[tuple[str, Path, Path | None]]:
        from .voc_format import read_split

        subset, _, pattern = spec.partition(":")
        if not pattern:
            raise ValueError(f"data sets entry {spec!r}: write <subset>:<split file>, e.g. val:ImageSets/DET/val.txt")
        files = sorted(glob.glob(str(self.root / pattern))) or ([pattern] if Path(pattern).is_file() else [])
        if not files:
            raise FileNotFoundError(f"no split file {self.root / pattern}. {ILSVRC_LAYOUT}")
        entries: dict[str, tuple[str, Path, Path | None]] = {}
        for file in files:
            for image, flag in read_split(file):
                if image in entries:
                    continue
                xml = self.root / "Annotations" / "DET" / subset / f"{image}.xml"
                negative = flag < 0 and not xml.is_file()  # negative training images have no annotation
                jpeg = self.root / "Data" / "DET" / subset / f"{image}.JPEG"
                entries[image] = (f"{subset}/{image}", jpeg, None if negative else xml)
        return list(entries.values())


__all__ = ["DataValidationError", "ILSVRCDetectionDataModule", "VOCDetectionDataModule"]
