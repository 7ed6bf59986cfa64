"""What every detection datamodule shares, whatever its format (COCO, PASCAL VOC, ILSVRC DET).

A format reads its splits into :class:`~datamodules.records.DetectionRecords`; :class:`DetectionDataset`
turns them into torchvision's detection samples (a float image and a target of ``tv_tensors``
``BoundingBoxes`` and labels, the *dataset's category ids*: the task maps them to its classes and back),
and :class:`DetectionDataModule` holds the loaders: aspect-ratio-grouped, seeded and resumable training
batches, exact evaluation under DDP, images for ``predict``. Augmentation is ``transforms.v2`` on
``tv_tensors`` (a horizontal flip; the detector resizes).

A format's datamodule implements ``_records(split)``, ``images_dir(split)`` and ``categories`` (``id`` and
``name``, the label set), and says how it is scored: ``protocol`` (``coco``, ``voc07``, ``voc``,
``ilsvrc``) and, for the devkit metrics, ``ground_truth(split)``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from .images import read_image_or_skip
from .loading import (
    EpochSeeded,
    ImageListDataset,
    ResumableDataLoader,
    SplitLoaders,
    check_enough_for_a_batch,
    run_seed,
    trained_batches,
)
from .records import DetectionRecords
from .samplers import AspectRatioGroupedSampler, aspect_ratio_groups
from .validation import check_image_size

log = logging.getLogger(__name__)


class _Targets(Mapping):
    """``{image id: (boxes, category ids)}`` of a dataset's records, as tensors, read on demand."""

    def __init__(self, records: DetectionRecords) -> None:
        self.records = records
        self.index = {int(i): k for k, i in enumerate(records.ids)}

    def __getitem__(self, image_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        boxes, labels, _ = self.records.objects(self.index[int(image_id)])
        return torch.from_numpy(boxes.copy()), torch.from_numpy(labels.copy())

    def __iter__(self):
        return iter(self.index)

    def __len__(self) -> int:
        return len(self.index)


class DetectionDataset(Dataset):
    """Images of one split with their boxes and category ids.

    Args:
        images_dir: folder the records' file names are relative to.
        records: the split's images and objects.
        train: training mode: ``difficult`` objects leave the targets, images left without any box are
            skipped (they are still evaluated), and ``transform`` augments.
        transform: a ``transforms.v2`` callable on ``(image, target)``.
        skip_corrupt: return ``None`` for unreadable images (dropped and counted by the collate).
    """

    def __init__(
        self, images_dir: str | Path, records: DetectionRecords, train: bool, transform=None, skip_corrupt: bool = False
    ) -> None:
        self.images_dir = str(images_dir)
        if train:
            keep_objects = ~records.difficult
            if not keep_objects.all():
                records = DetectionRecords(**{**records.__dict__, **_without(records, keep_objects)})
            counts = records.box_offsets[1:] - records.box_offsets[:-1]
            if (counts == 0).any():
                log.info("%s: %d images without objects skipped for training", images_dir, int((counts == 0).sum()))
                records = records.select(counts > 0)
        self.records = records
        self.train = train
        self.transform = transform
        self.skip_corrupt = skip_corrupt

    @property
    def ids(self) -> list[int]:
        return self.records.ids.tolist()

    @property
    def targets(self) -> Mapping:
        return _Targets(self.records)

    def __len__(self) -> int:
        return len(self.records)

    def image_sizes(self) -> list[tuple[int, int]]:
        return list(zip(self.records.widths.tolist(), self.records.heights.tolist()))

    def path(self, index: int) -> Path:
        return Path(self.images_dir) / self.records.name(index)

    def object_targets(self, index: int, height: int, width: int) -> dict[str, torch.Tensor]:
        """More per-object targets of image ``index`` (as ``tv_tensors``, so that the transforms move them
        with the boxes): none here; instance segmentation adds each object's mask."""
        return {}

    def __getitem__(self, index: int) -> dict | None:
        path = self.path(index)
        image = read_image_or_skip(path, self.skip_corrupt)
        if image is None:
            return None
        image_id = int(self.records.ids[index])
        width, height = self.records.size(index)
        if width:  # (a negative image without an annotation file has no recorded size)
            check_image_size(image, {"id": image_id, "width": width, "height": height}, path)
        boxes, labels, _ = self.records.objects(index)
        target = {
            "boxes": tv_tensors.BoundingBoxes(
                torch.from_numpy(boxes.copy()), format="XYXY", canvas_size=tuple(image.shape[-2:])
            ),
            "labels": torch.from_numpy(labels.copy()),
            **self.object_targets(index, *image.shape[-2:]),
        }
        image = tv_tensors.Image(image)
        if self.transform is not None:
            image, target = self.transform(image, target)
        return {
            "image": image.as_subclass(torch.Tensor),
            "target": {key: value.as_subclass(torch.Tensor) for key, value in target.items()},
            "image_id": image_id,
            "path": str(path),
        }


def _without(records: DetectionRecords, keep: np.ndarray) -> dict:
    """The object arrays and offsets of ``records`` with only the objects ``keep`` (a mask over objects)."""
    counts = records.box_offsets[1:] - records.box_offsets[:-1]
    image_of = np.repeat(np.arange(len(records)), counts)
    offsets = np.zeros(len(records) + 1, dtype=np.int64)
    np.cumsum(np.bincount(image_of[keep], minlength=len(records)), out=offsets[1:])
    return {
        "box_offsets": offsets,
        "boxes": records.boxes[keep],
        "labels": records.labels[keep],
        "difficult": records.difficult[keep],
        "sources": None if records.sources is None else records.sources[keep],
    }


_NO_TARGET = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}


def detection_collate(batch: list[dict | None]) -> dict:
    """Lists of variable-size images and their targets (the detector resizes and batches them)."""
    kept = [sample for sample in batch if sample is not None]
    return {
        "images": [s["image"] for s in kept],
        "targets": [s.get("target") or _NO_TARGET for s in kept],  # unlabeled (predict) images have none
        "image_ids": [s["image_id"] for s in kept],
        "paths": [s["path"] for s in kept],
        "skipped": len(batch) - len(kept),
    }


class DetectionDataModule(SplitLoaders, pl.LightningDataModule):
    """The loaders of a detection datamodule; a format subclasses it (see the module docstring).

    Args:
        predict_root: a folder of images (searched recursively) for ``predict``.
        batch_size: images per batch and process (detectron2's and torchvision's schedules use 16 in all).
        eval_batch_size: images per evaluation batch (defaults to ``batch_size``).
        num_workers: loader processes.
        flip_prob: horizontal flip probability for training.
        aspect_ratio_group_factor: ``k`` of the aspect-ratio grouping (``2k + 1`` bins); -1 disables it.
        skip_corrupt: skip unreadable images (logged and counted) instead of failing.
        drop_invalid: drop images and annotations with errors (``datamodules.check``; counts logged)
            instead of stopping before training with the report.
        pin_memory: pin host memory when CUDA is used.
        persistent_workers: keep loader processes between epochs.
    """

    #: how the split is scored: ``coco`` (COCOeval on the annotation file), ``voc07`` (VOC 2007's 11-point
    #: AP), ``voc`` (VOC 2010+'s area under the curve), ``ilsvrc`` (ILSVRC DET's small-object IoU rule)
    protocol: str = "coco"

    def __init__(
        self,
        predict_root: str | None = None,
        batch_size: int = 2,
        eval_batch_size: int | None = None,
        num_workers: int = 4,
        flip_prob: float = 0.5,
        aspect_ratio_group_factor: int = 3,
        skip_corrupt: bool = False,
        drop_invalid: bool = False,
        pin_memory: bool = True,
        persistent_workers: bool = True,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.datasets: dict[str, Dataset] = {}

    # -- what a format provides --------------------------------------------------------------------
    @property
    def categories(self) -> list[dict]:
        """The label set: ``{"id", "name"}`` per category, in the order of the model's classes."""
        raise NotImplementedError

    def images_dir(self, split: str) -> Path:
        raise NotImplementedError

    def _records(self, split: str) -> DetectionRecords:
        raise NotImplementedError

    def ground_truth(self, split: str) -> dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """``{image id: (boxes, category ids, difficult)}`` of the split, for the devkit metrics."""
        dataset = self.datasets.get(split)
        records = dataset.records if isinstance(dataset, DetectionDataset) and not dataset.train else None
        return (records or self._records(split)).ground_truth()

    def annotation_file(self, split: str) -> Path:
        """The split's COCO annotation file (the ``coco`` protocol's ground truth)."""
        raise ValueError(f"{type(self).__name__} is scored by the {self.protocol} protocol, not from a COCO file")

    def evaluation_blacklist(self, split: str) -> set[tuple[int, int]] | None:
        """``(image id, category id)`` pairs the split's official evaluation leaves out (ILSVRC DET's validation
        blacklist); ``None``: nothing is left out."""
        return None

    # -- the label set -----------------------------------------------------------------------------
    @property
    def category_ids(self) -> list[int]:
        return [c["id"] for c in self.categories]

    @property
    def class_names(self) -> list[str]:
        return [c["name"] for c in self.categories]

    @property
    def num_classes(self) -> int:
        """Foreground classes."""
        return len(self.categories)

    # -- datasets and loaders ------------------------------------------------------------------------
    def _transform(self, train: bool) -> v2.Compose:
        steps: list = [v2.RandomHorizontalFlip(self.hparams.flip_prob)] if train else []
        return v2.Compose([*steps, v2.ToDtype(torch.float32, scale=True)])

    def _split(self, split: str) -> DetectionDataset:
        train = split == "train"
        return DetectionDataset(
            self.images_dir(split), self._records(split), train, self._transform(train), self.hparams.skip_corrupt
        )

    def _predict_dataset(self, paths: list[Path]) -> Dataset:
        return ImageListDataset(paths, self._transform(False))

    def _loader(self, split: str, train: bool) -> DataLoader:
        hp = self.hparams
        dataset = self.datasets[split]
        batch_size = self.batch_size if train else self.eval_batch_size
        if train and hp.aspect_ratio_group_factor >= 0:
            check_enough_for_a_batch(dataset, batch_size)
            seed = run_seed()
            groups = aspect_ratio_groups(dataset.image_sizes(), hp.aspect_ratio_group_factor)
            return ResumableDataLoader(
                EpochSeeded(dataset, seed),
                batch_size=batch_size,
                sampler=AspectRatioGroupedSampler(dataset, groups, batch_size, seed=seed),
                drop_last=True,
                num_workers=hp.num_workers,
                collate_fn=detection_collate,
                pin_memory=hp.pin_memory and torch.cuda.is_available(),
                persistent_workers=hp.persistent_workers and hp.num_workers > 0,
                progress=trained_batches(self.trainer),
            )
        return self.split_loader(split, train, collate_fn=detection_collate)
