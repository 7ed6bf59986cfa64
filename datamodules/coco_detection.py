"""COCO instance annotations as distributed, for detection (``tasks.detect``).

Layout (COCO 2017, the defaults)::

    <root>/train2017/*.jpg
    <root>/val2017/*.jpg
    <root>/annotations/instances_train2017.json
    <root>/annotations/instances_val2017.json

Detection targets follow torchvision's conventions: boxes ``x1, y1, x2, y2`` in pixels as
``tv_tensors.BoundingBoxes`` (converted from COCO's ``x, y, w, h`` and clipped to the image), labels as
the *COCO category ids* -- the task maps them to its contiguous labels and back, so the evaluation sees
the original ids. Crowd annotations are kept out of the training targets (COCOeval uses them from the
annotation file); boxes no wider or taller than one pixel are dropped and counted; images without any
usable box are skipped for training only. Augmentation is ``transforms.v2`` on ``tv_tensors``.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from .coco_files import COCOFiles, unlisted_categories
from .coco_format import xywh_to_xyxy_clipped
from .images import read_image_or_skip
from .loading import (
    EpochSeeded,
    ImageListDataset,
    ResumableDataLoader,
    SplitLoaders,
    check_enough_for_a_batch,
    make_loader,
    run_seed,
    trained_batches,
)
from .samplers import AspectRatioGroupedSampler, aspect_ratio_groups
from .validation import DataValidationError, check_image_size

log = logging.getLogger(__name__)


class COCODetectionDataset(Dataset):
    """Images of one COCO split with their boxes and category ids.

    Args:
        images_dir: folder of the split's image files.
        coco: the split's annotations (``load_coco``).
        train: training mode -- skip images without usable boxes and apply ``transform``.
        transform: a ``transforms.v2`` callable on ``(image, target)``.
        skip_corrupt: return ``None`` for unreadable images (dropped and counted by the collate).
    """

    def __init__(self, images_dir: str | Path, coco, train: bool, transform=None, skip_corrupt: bool = False) -> None:
        self.images_dir = Path(images_dir)
        self.coco = coco
        self.train = train
        self.transform = transform
        self.skip_corrupt = skip_corrupt
        known = set(coco.getCatIds())
        self.dropped: Counter = Counter()
        self.targets: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for image_id in sorted(coco.getImgIds()):
            info = coco.imgs[image_id]
            boxes, categories = [], []
            for ann in coco.imgToAnns.get(image_id, []):
                if ann.get("iscrowd", 0):
                    continue  # crowd regions are for evaluation only
                if ann.get("category_id") not in known:
                    self.dropped["unknown category"] += 1
                    continue
                x1, y1, x2, y2 = xywh_to_xyxy_clipped(ann["bbox"], info["width"], info["height"])
                if x2 - x1 <= 1 or y2 - y1 <= 1:
                    self.dropped["degenerate box"] += 1
                    continue
                boxes.append((x1, y1, x2, y2))
                categories.append(ann["category_id"])
            self.targets[image_id] = (
                torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                torch.tensor(categories, dtype=torch.int64),
            )
        self.ids = [i for i in sorted(self.targets) if not train or len(self.targets[i][1])]
        if self.dropped and train:
            summary = ", ".join(f"{n} x {kind}" for kind, n in sorted(self.dropped.items()))
            log.warning("%s: dropped from the training targets: %s", self.images_dir, summary)
        if train and len(self.ids) < len(self.targets):
            skipped = len(self.targets) - len(self.ids)
            log.info("%s: %d images without annotations skipped for training", self.images_dir, skipped)

    def __len__(self) -> int:
        return len(self.ids)

    def image_sizes(self) -> list[tuple[int, int]]:
        return [(self.coco.imgs[i]["width"], self.coco.imgs[i]["height"]) for i in self.ids]

    def path(self, image_id: int) -> Path:
        return self.images_dir / self.coco.imgs[image_id]["file_name"]

    def __getitem__(self, index: int) -> dict | None:
        image_id = self.ids[index]
        path = self.path(image_id)
        image = read_image_or_skip(path, self.skip_corrupt)
        if image is None:
            return None
        check_image_size(image, self.coco.imgs[image_id], path)
        boxes, categories = self.targets[image_id]
        target = {
            "boxes": tv_tensors.BoundingBoxes(boxes.clone(), format="XYXY", canvas_size=tuple(image.shape[-2:])),
            "labels": categories.clone(),
        }
        image = tv_tensors.Image(image)
        if self.transform is not None:
            image, target = self.transform(image, target)
        return {
            "image": image.as_subclass(torch.Tensor),
            "target": {"boxes": target["boxes"].as_subclass(torch.Tensor), "labels": target["labels"]},
            "image_id": image_id,
            "path": str(path),
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


class COCODetectionDataModule(SplitLoaders, pl.LightningDataModule):
    """COCO (or any COCO-format dataset) for ``tasks.detect``.

    Args:
        root: dataset folder; the other paths are relative to it.
        train_images: training image folder.
        train_annotations: training instances file.
        val_images: validation image folder.
        val_annotations: validation instances file (COCOeval's ground truth).
        test_images: test image folder (defaults to the validation split).
        test_annotations: test instances file (defaults to the validation split).
        predict_root: a folder of images (searched recursively) for ``predict``.
        batch_size: images per batch and process (the 1x schedule uses 16 in total).
        eval_batch_size: images per evaluation batch (defaults to ``batch_size``).
        num_workers: loader processes.
        flip_prob: horizontal flip probability for training.
        aspect_ratio_group_factor: ``k`` of the aspect-ratio grouping (``2k + 1`` bins); -1 disables it.
        skip_corrupt: skip unreadable images (logged and counted) instead of failing.
        drop_invalid: drop images and annotations with errors (``datamodules.check``; counts logged)
            instead of stopping before training with the report.
    """

    def __init__(
        self,
        root: str,
        train_images: str = "train2017",
        train_annotations: str = "annotations/instances_train2017.json",
        val_images: str = "val2017",
        val_annotations: str = "annotations/instances_val2017.json",
        test_images: str | None = None,
        test_annotations: str | None = None,
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
        self.files = COCOFiles(
            root, train_images, train_annotations, val_images, val_annotations, test_images, test_annotations
        )
        self.root = self.files.root
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.datasets: dict[str, Dataset] = {}

    # -- files and categories ---------------------------------------------------------------------
    def split_files(self, split: str) -> tuple[Path, Path]:
        """``(images folder, annotation file)`` of ``train``, ``val`` or ``test``."""
        return self.files.split_files(split)

    def annotation_file(self, split: str) -> Path:
        """The split's annotation file: COCOeval's ground truth."""
        return self.files.annotation_file(split)

    def _check_split(self, split: str) -> None:
        self.files.check_split(split)

    @property
    def categories(self) -> list[dict]:
        """COCO categories (``id``, ``name``) sorted by id, from the validation (else training) file."""
        return self.files.categories

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

    # -- datasets -----------------------------------------------------------------------------------
    def _transform(self, train: bool) -> v2.Compose:
        steps: list = [v2.RandomHorizontalFlip(self.hparams.flip_prob)] if train else []
        return v2.Compose([*steps, v2.ToDtype(torch.float32, scale=True)])

    def _split(self, split: str) -> COCODetectionDataset:
        coco = self.files.load(split, drop_invalid=self.hparams.drop_invalid)
        images, annotations = self.split_files(split)
        train = split == "train"
        unknown = unlisted_categories(coco, self.category_ids)
        if train and unknown:  # the model's classes are the validation file's categories
            raise DataValidationError(
                f"{annotations} annotates categories {unknown[:10]} that {self.annotation_file('val')} does not "
                f"list; the detector's classes come from the validation file's list. Give both files the same "
                f"'categories' (COCO's share theirs)."
            )
        return COCODetectionDataset(images, coco, train, self._transform(train), self.hparams.skip_corrupt)

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
        return make_loader(
            dataset,
            batch_size=batch_size,
            num_workers=hp.num_workers,
            train=train,
            pin_memory=hp.pin_memory,
            persistent_workers=hp.persistent_workers,
            collate_fn=detection_collate,
            trainer=self.trainer,
        )
