"""ILSVRC CLS-LOC (ImageNet localization) as distributed, for ``tasks.localize``.

The Kaggle mirror's layout (``data.root``; the ``ILSVRC`` folder itself works too)::

    <root>/LOC_synset_mapping.txt                 "n01440764 tench, Tinca tinca" (class order)
    <root>/LOC_train_solution.csv, LOC_val_solution.csv
                                                  ImageId,PredictionString: "<wnid> xmin ymin xmax ymax ..."
    <root>/ILSVRC/Data/CLS-LOC/train/<wnid>/<wnid>_<n>.JPEG
    <root>/ILSVRC/Data/CLS-LOC/val/ILSVRC2012_val_<n>.JPEG
    <root>/ILSVRC/Annotations/CLS-LOC/{train/<wnid>,val}/<image>.xml   (boxes for a subset of train)

Every training image is classified; the ones with boxes (an XML file, or a row of the training solution
file) also teach the box regressor. Boxes are ILSVRC's 0-based inclusive pixels, read as continuous
``x1, y1, x2, y2`` (``datamodules.voc_format``). Samples are uint8 crops with their boxes in the crop's
coordinates (``transforms.v2`` on ``tv_tensors``); evaluation keeps how each crop maps back to the
original image (``scale``, ``offset``), where the metrics compare boxes.
"""

from __future__ import annotations

import csv
import logging
import math
import os
from collections.abc import Iterator
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset, default_collate
from torchvision import tv_tensors
from torchvision.transforms import v2

from .folders import find_classes, list_images
from .image_checks import image_statuses, report_progress, status_problem
from .images import read_image_or_skip
from .loading import SplitLoaders
from .transforms import IMAGENET_MEAN, IMAGENET_STD, Normalize, default_crop_scale, default_eval_resize
from .validation import Report, clipped, outside_warning, reaches_outside, stop_on_errors
from .voc_format import AnnotationError, read_xml

log = logging.getLogger(__name__)

LAYOUT = (
    "Expected ILSVRC CLS-LOC's layout: <root>/ILSVRC/Data/CLS-LOC/{train/<wnid>,val}/*.JPEG with "
    "<root>/LOC_synset_mapping.txt and either <root>/ILSVRC/Annotations/CLS-LOC/ or <root>/LOC_val_solution.csv."
)


def read_solution(path: Path, problems: list[tuple[str, str]] | None = None) -> dict[str, list]:
    """A ``LOC_*_solution.csv``: image id to its ``(wnid, box)`` list (boxes continuous, from 0-based pixels).

    A row with a value that is not a finite number, an inverted box, a malformed ``PredictionString`` or an
    image listed again (a later row would replace the label silently) is left out and appended to ``problems``
    as ``("<file>:<row>", what is wrong)``; without ``problems`` it raises ``ValueError`` naming both.
    """
    out: dict[str, list] = {}
    with open(path, newline="") as f:
        for row_number, row in enumerate(csv.DictReader(f), start=2):
            problem = None
            parts = (row.get("PredictionString") or "").split()
            image = row.get("ImageId")
            entries = []
            if len(parts) % 5:
                problem = "PredictionString must be groups of '<wnid> xmin ymin xmax ymax'"
            elif image in out:
                problem = f"image {image} is listed again (a later row would replace its label)"
            for i in range(0, len(parts) if problem is None else 0, 5):
                try:
                    xmin, ymin, xmax, ymax = (float(v) for v in parts[i + 1 : i + 5])
                except ValueError:
                    problem = f"{' '.join(parts[i + 1 : i + 5])!r} are not four numbers"
                    break
                if not all(map(math.isfinite, (xmin, ymin, xmax, ymax))):
                    problem = f"box {' '.join(parts[i + 1 : i + 5])} holds a value that is not a finite number"
                    break
                if xmax < xmin or ymax < ymin:
                    problem = f"inverted box xmin={xmin} ymin={ymin} xmax={xmax} ymax={ymax}"
                    break
                entries.append((parts[i], (xmin, ymin, xmax + 1, ymax + 1)))
            if problem is not None:
                if problems is None:
                    raise ValueError(f"{path}:{row_number}: {problem}")
                problems.append((f"{path}:{row_number}", problem))
                continue
            out[image] = entries
    return out


class LocalizationDataset(Dataset):
    """Images with a class and the boxes of that class (``4 x K``, possibly none).

    Args:
        samples: ``(path, label, boxes)``; ``boxes`` is ``K x 4`` continuous pixels of the original image.
        transform: ``transforms.v2`` on ``(Image, BoundingBoxes)``.
        geometry: for evaluation, ``(resize, crop)``: the crop's scale and offset in the original image are
            returned with each sample, so that predictions can be mapped back.
        unscored: names (file stems) of images the localization error leaves out (the devkit's blacklist):
            each evaluation sample says whether it is scored (``loc_scored``).
    """

    def __init__(self, samples, transform, geometry: tuple[int, int] | None = None, skip_corrupt: bool = False,
                 unscored: frozenset[str] = frozenset()) -> None:  # fmt: skip
        self.samples = samples
        self.transform = transform
        self.geometry = geometry
        self.skip_corrupt = skip_corrupt
        self.unscored = unscored

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict | None:
        path, label, boxes = self.samples[index]
        image = read_image_or_skip(path, self.skip_corrupt)
        if image is None:
            return None
        height, width = image.shape[-2:]
        box = tv_tensors.BoundingBoxes(torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4), format="XYXY",
                                       canvas_size=(height, width))  # fmt: skip
        crop, box = self.transform(tv_tensors.Image(image), box)
        item = {
            "image": crop.as_subclass(torch.Tensor),
            "label": label,
            "boxes": box.as_subclass(torch.Tensor),
            "index": index,
            "path": str(path),
        }
        if self.geometry is not None:
            resize, size = self.geometry
            short = min(height, width)
            new_h, new_w = (
                (resize, int(resize * width / height)) if height == short else (int(resize * height / width), resize)
            )
            top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
            item["scale"] = torch.tensor([width / new_w, height / new_h], dtype=torch.float64)
            item["offset"] = torch.tensor([left, top], dtype=torch.float64)
            item["original_boxes"] = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4)
            item["loc_scored"] = os.path.splitext(os.path.basename(path))[0] not in self.unscored
        return item


def localization_collate(batch: list[dict | None]) -> dict:
    """Stacked crops and labels; each sample's boxes stay a list entry (their counts differ)."""
    kept = [s for s in batch if s is not None]
    out: dict = {"skipped": len(batch) - len(kept)}
    if not kept:
        return out
    listed = ("boxes", "original_boxes")
    out.update(default_collate([{k: v for k, v in s.items() if k not in listed} for s in kept]))
    for key in listed:
        if key in kept[0]:
            out[key] = [s[key] for s in kept]
    return out


class ILSVRCLocalizationDataModule(SplitLoaders, pl.LightningDataModule):
    """ImageNet localization (ILSVRC CLS-LOC, 1000 classes) for ``tasks.localize``.

    Args:
        root: the dataset folder (see the module docstring).
        predict_root: a folder of images (searched recursively) for ``predict``.
        batch_size: images per batch and process.
        eval_batch_size: images per evaluation batch (defaults to ``batch_size``).
        num_workers: loader processes.
        image_size: the crop the network sees (224 in the paper).
        eval_resize: shorter side before the evaluation's center crop (``None``: the crop / 0.875); the
            paper's "1-crop" is a 224 crop of the image at 256.
        crop_scale: training random-resized-crop's area range (``None``: as classification's).
        mean, std: normalization.
        skip_corrupt: skip unreadable images instead of failing.
        drop_invalid: leave out images whose annotations have errors (listed at setup) instead of stopping.
        blacklist: the devkit's ``ILSVRC2015_clsloc_validation_blacklist.txt`` (one validation image number per
            line, ``n`` for ``ILSVRC2012_val_<n, 8 digits>``; a path, or relative to ``root``): those images are
            left out of the localization errors' denominators, as ``eval_localization.m`` leaves them out (their
            classification still counts in ``acc1``/``acc5``). The official LOC validation numbers use it.
        pin_memory, persistent_workers: loader options.
    """

    layout = LAYOUT

    def __init__(
        self,
        root: str | None = None,
        predict_root: str | None = None,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_workers: int = 8,
        image_size: int = 224,
        eval_resize: int | None = None,
        crop_scale: tuple[float, float] | None = None,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
        skip_corrupt: bool = False,
        drop_invalid: bool = False,
        blacklist: str | None = None,
        pin_memory: bool = True,
        persistent_workers: bool = True,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.hparams.update(eval_resize=eval_resize or default_eval_resize(image_size, "random_resized_crop"))
        self.root = Path(root).expanduser() if root else None
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.datasets: dict[str, Dataset] = {}
        self.normalize = Normalize(mean, std)
        self._synsets: list[tuple[str, str]] | None = None

    # -- layout ----------------------------------------------------------------------------------
    @property
    def ilsvrc(self) -> Path:
        if self.root is None:
            raise ValueError(f"data.root is not set. {LAYOUT}")
        return self.root / "ILSVRC" if (self.root / "ILSVRC").is_dir() else self.root

    def _kaggle_file(self, name: str) -> Path | None:
        for folder in (self.root, self.ilsvrc, self.ilsvrc.parent):
            if (folder / name).is_file():
                return folder / name
        return None

    def _check_split(self, split: str) -> None:
        folder = self.ilsvrc / "Data" / "CLS-LOC" / ("train" if split == "train" else "val")
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder} does not exist. {LAYOUT}")

    @property
    def synsets(self) -> list[tuple[str, str]]:
        """``(wnid, name)`` of each class, in class order (``LOC_synset_mapping.txt``, else the train folders)."""
        if self._synsets is None:
            mapping = self._kaggle_file("LOC_synset_mapping.txt")
            if mapping is not None:
                rows = [line.strip().partition(" ") for line in mapping.read_text().splitlines() if line.strip()]
                self._synsets = [(w, (n.split(",")[0].strip() or w)) for w, _, n in rows]
            else:
                self._synsets = [(w, w) for w in find_classes(self.ilsvrc / "Data" / "CLS-LOC" / "train")]
        return self._synsets

    @property
    def class_names(self) -> list[str]:
        return [name for _, name in self.synsets]

    @property
    def num_classes(self) -> int:
        return len(self.synsets)

    # -- samples ---------------------------------------------------------------------------------
    def read_split(self, split: str, decode: bool = False) -> tuple[list[tuple[str, int, list]], Report]:
        """The split's ``(image file, class, boxes of that class)`` samples and the report of what was wrong.

        Errors (the image is left out of the samples): malformed or inverted-box XML, a class not in
        ``LOC_synset_mapping.txt``, a validation image with no label (no XML file and no solution row),
        a solution row whose image does not exist, and with ``decode`` an unreadable image. Warnings: boxes
        reaching outside the image (clipped), boxes of another class than the image's (ignored).
        """
        index = {wnid: k for k, (wnid, _) in enumerate(self.synsets)}
        subset = "train" if split == "train" else "val"
        data = self.ilsvrc / "Data" / "CLS-LOC" / subset
        annotations = self.ilsvrc / "Annotations" / "CLS-LOC" / subset
        solution = self._kaggle_file(f"LOC_{subset}_solution.csv")
        report = Report(f"CLS-LOC {subset}")
        problems: list[tuple[str, str]] = []  # rows that would change a label or a box: named, left out
        table = read_solution(solution, problems) if solution is not None else {}
        for where, problem in problems:
            report.error(where, problem)
        samples, seen = [], set()
        paths = list_images(data)
        statuses = image_statuses(paths, True, f"CLS-LOC {subset}: images") if decode else []
        for number, path in enumerate(paths):
            if number % 4096 == 0:
                report_progress(f"CLS-LOC {subset}: annotation files", number, len(paths))
            image = path.stem
            seen.add(image)
            report.checked["images"] += 1
            objects, size = table.get(image), None
            xml = annotations / path.relative_to(data).with_suffix(".xml")
            if xml.is_file():
                try:
                    parsed = read_xml(xml, base=0)
                except AnnotationError as err:
                    report.error(str(xml), str(err).split(": ", 1)[-1])
                    continue
                size = (parsed.width, parsed.height)
                if objects is None:
                    objects = [(o.name, o.box) for o in parsed.objects if o.box is not None]
            wnid = path.parent.name if subset == "train" else (objects[0][0] if objects else None)
            if wnid is None:
                report.error(str(path), f"no label: no {xml.name} and no row in LOC_val_solution.csv")
                continue
            unknown = {name for name, _ in objects or []} - set(index)
            if wnid not in index or unknown:
                report.error(str(path), f"class {wnid if wnid not in index else sorted(unknown)[0]} is not in "
                                        "LOC_synset_mapping.txt")  # fmt: skip
                continue
            if decode and (problem := status_problem(statuses[number], size, path)):
                report.error(str(path), problem)
                continue
            boxes = []
            for name, box in objects or []:
                if name != wnid:
                    report.warning(str(path), f"a box of {name}, not the image's class {wnid} (ignored)")
                    continue
                if size is not None and reaches_outside(box, *size):
                    report.warning(str(xml), outside_warning(box, *size, train=subset == "train"))
                    if subset == "train":
                        box = clipped(box, *size)
                boxes.append(list(box))
            report.checked["boxes"] += len(boxes)
            samples.append((str(path), index[wnid], boxes))
        for image in sorted(set(table) - seen):
            report.error(str(solution), f"{image}: listed, but no {image}.JPEG under {data}")
        if not samples and not report.errors:
            report.error(str(data), f"holds no images. {LAYOUT}")
        return samples, report

    def _samples(self, split: str) -> list[tuple[str, int, list]]:
        samples, report = self.read_split(split)
        stop_on_errors(report, self.hparams.drop_invalid, report.subject)
        return samples

    def check(self, decode: bool = True, fix: bool = False) -> Iterator[Report]:
        """The data check's reports (``python -m datamodules.check``): both splits, every image, each as it is done."""
        for split in ("train", "val"):
            yield self.read_split(split, decode)[1]

    def _transform(self, train: bool):
        hp = self.hparams
        if train:
            scale = tuple(hp.crop_scale) if hp.crop_scale else default_crop_scale(hp.image_size)
            return v2.Compose([v2.RandomResizedCrop(hp.image_size, scale=scale, antialias=True),
                               v2.RandomHorizontalFlip(), v2.SanitizeBoundingBoxes(labels_getter=None)])  # fmt: skip
        return v2.Compose([v2.Resize(hp.eval_resize, antialias=True), v2.CenterCrop(hp.image_size)])

    def _split(self, split: str) -> LocalizationDataset:
        train = split == "train"
        geometry = None if train else (self.hparams.eval_resize, self.hparams.image_size)
        unscored = frozenset() if train else self.blacklisted()
        return LocalizationDataset(self._samples(split), self._transform(train), geometry, self.hparams.skip_corrupt,
                                   unscored)  # fmt: skip

    def blacklisted(self) -> frozenset[str]:
        """The names of the validation images the blacklist leaves out of the localization errors."""
        if not self.hparams.blacklist:
            return frozenset()
        path = Path(self.hparams.blacklist).expanduser()
        path = path if path.is_absolute() or path.is_file() or self.root is None else self.root / path
        if not path.is_file():
            raise FileNotFoundError(f"data.blacklist={self.hparams.blacklist}: no such file (the devkit's "
                                    f"data/ILSVRC2015_clsloc_validation_blacklist.txt)")  # fmt: skip
        names = set()
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            if not line.strip().isdigit():
                raise ValueError(f"{path}:{number}: {line.strip()!r} is not a validation image number")
            names.add(f"ILSVRC2012_val_{int(line):08d}")
        return frozenset(names)

    def _predict_dataset(self, paths: list[Path]) -> Dataset:
        samples = [(str(p), -1, []) for p in paths]
        return LocalizationDataset(samples, self._transform(False), (self.hparams.eval_resize, self.hparams.image_size))

    def _loader(self, split: str, train: bool) -> DataLoader:
        return self.split_loader(split, train, collate_fn=localization_collate)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        if isinstance(batch, dict) and "image" in batch:
            batch["image"] = self.normalize(batch["image"])
        return batch
