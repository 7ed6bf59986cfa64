"""COCO instance annotations as semantic segmentation masks (``tasks.segment``).

The files are COCO's (``datamodules.coco_files``); each image's instances become one class-index mask
(``datamodules.masks``: the VOC label set torchvision's FCN models use, or every category), cached as a
PNG. Training augmentation is torchvision's segmentation reference: random resize of the shorter side,
flip, crop (masks padded with the ignore index); evaluation resizes the shorter side.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from .coco_files import COCOSplits, unlisted_categories
from .images import read_image_or_skip
from .loading import ImageListDataset, SplitLoaders
from .masks import (
    IGNORE_INDEX,
    InstanceRegions,
    MaskCache,
    MaskRules,
    cache_folder,
    category_classes,
    check_voc_categories,
)
from .transforms import IMAGENET_MEAN, IMAGENET_STD, check_std
from .validation import DataValidationError, check_image_size

log = logging.getLogger(__name__)


class COCOSegmentationDataset(Dataset):
    """Images of one COCO split with class-index masks, rasterized once and cached as PNG files.

    Args:
        images_dir: folder of the split's image files.
        regions: the split's images and instances (flat arrays, ``datamodules.masks.InstanceRegions``).
        classes: category id to class index (``category_classes``).
        train: training mode (image filtering).
        transform: ``transforms.v2`` callable on ``(tv_tensors.Image, tv_tensors.Mask)``.
        cache_dir: folder of the cached masks (one ``<image id>.png`` each).
        min_area: training keeps images whose annotations of the label set cover more than this many
            pixels in total (torchvision's reference uses 1000).
        skip_corrupt: return ``None`` for unreadable images.
        rules: how overlaps and crowds are labeled (``semantic_mask``).
    """

    def __init__(
        self,
        images_dir: str | Path,
        regions: InstanceRegions,
        classes: dict[int, int],
        train: bool,
        transform,
        cache_dir: Path,
        min_area: float = 1000,
        skip_corrupt: bool = False,
        rules: MaskRules = "default",
    ) -> None:
        self.images_dir = Path(images_dir)
        self.regions = regions
        self.classes = classes
        self.transform = transform
        self.mask = MaskCache(cache_dir, regions, classes, rules)
        self.skip_corrupt = skip_corrupt
        rows = np.arange(len(regions))
        if train:
            rows = np.flatnonzero(regions.annotated_areas(classes) > min_area)
            if len(rows) < len(regions):
                log.info("%s: %d of %d images skipped for training (annotated area <= %s pixels)",
                         self.images_dir, len(regions) - len(rows), len(regions), min_area)  # fmt: skip
        self.rows = rows  # the images this split serves, as indices into ``regions``

    @property
    def ids(self) -> list[int]:
        return self.regions.ids[self.rows].tolist()

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict | None:
        row = int(self.rows[index])
        info = self.regions.info(row)
        path = self.images_dir / info["file_name"]
        image = read_image_or_skip(path, self.skip_corrupt)
        if image is None:
            return None
        check_image_size(image, info, path)
        image, mask = self.transform(tv_tensors.Image(image), tv_tensors.Mask(self.mask(row)))
        return {
            "image": image.as_subclass(torch.Tensor),
            "mask": mask.as_subclass(torch.Tensor)[0].long(),
            "image_id": info["id"],
            "path": str(path),
        }


def segmentation_collate(batch: list[dict | None]) -> dict:
    """Stack samples, padding differently sized evaluation images (image with 0, mask with 255)."""
    kept = [sample for sample in batch if sample is not None]
    out: dict = {"skipped": len(batch) - len(kept)}
    if not kept:
        return out
    height = max(s["image"].shape[-2] for s in kept)
    width = max(s["image"].shape[-1] for s in kept)

    def pad(t: torch.Tensor, value: float) -> torch.Tensor:
        return torch.nn.functional.pad(t, (0, width - t.shape[-1], 0, height - t.shape[-2]), value=value)

    out["image"] = torch.stack([pad(s["image"], 0.0) for s in kept])
    if "mask" in kept[0]:
        out["mask"] = torch.stack([pad(s["mask"], IGNORE_INDEX) for s in kept])
    if "original_size" in kept[0]:
        out["original_size"] = torch.stack([s["original_size"] for s in kept])
        out["input_size"] = torch.tensor([list(s["image"].shape[-2:]) for s in kept])
    out["image_id"] = [s["image_id"] for s in kept]
    out["path"] = [s["path"] for s in kept]
    return out


class COCOSegmentationDataModule(COCOSplits, SplitLoaders, pl.LightningDataModule):
    """COCO instance annotations as semantic segmentation masks, for ``tasks.segment``.

    Args:
        root: the dataset folder; it and the other files are :class:`datamodules.coco_files.COCOSplits`'s
            arguments (``train_images``, ``train_annotations``, ...), as for ``COCODetectionDataModule``.
        predict_root: a folder of images (searched recursively) for ``predict``.
        categories: ``voc`` -- the 20 PASCAL VOC classes + background (21, torchvision's COCO
            segmentation label set); ``all`` -- every category + background.
        base_size: training scales are 0.5-2.0 x ``base_size`` (shorter side); evaluation resizes the
            shorter side to ``base_size``.
        crop_size: training crop (masks padded with 255 where the image is smaller).
        scale_range: random scale range relative to ``base_size``.
        flip_prob: horizontal flip probability.
        min_area: minimum annotated area of a training image (pixels).
        mask_rules: ``default`` (different-class overlaps and crowds ignored) or ``torchvision`` (its
            reference scripts' rules, to reproduce its published numbers); see ``semantic_mask``.
        cache_dir: where rasterized masks are cached (default: ``~/.cache/residual-zoo/coco_masks``).
        batch_size: training images per batch and process.
        eval_batch_size: evaluation images per batch (1 evaluates every image at its own size; more
            pads to the largest in the batch).
        mean, std: normalization.
        num_workers, skip_corrupt, drop_invalid, pin_memory, persistent_workers: as for
            ``COCODetectionDataModule``.
    """

    def __init__(
        self,
        root: str,
        predict_root: str | None = None,
        categories: Literal["voc", "all"] = "voc",
        base_size: int = 520,
        crop_size: int = 480,
        scale_range: tuple[float, float] = (0.5, 2.0),
        flip_prob: float = 0.5,
        min_area: float = 1000,
        mask_rules: MaskRules = "default",
        cache_dir: str | None = None,
        batch_size: int = 4,
        eval_batch_size: int = 1,
        num_workers: int = 4,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
        skip_corrupt: bool = False,
        drop_invalid: bool = False,
        pin_memory: bool = True,
        persistent_workers: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(root, **kwargs)  # the files: COCOSplits' arguments
        check_std(std)
        self.save_hyperparameters()
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.datasets: dict[str, Dataset] = {}
        self._classes: tuple[dict[int, int], list[str]] | None = None

    @property
    def label_set(self) -> tuple[dict[int, int], list[str]]:
        if self._classes is None:
            categories = self.files.categories if self.hparams.categories == "all" else []
            if self.hparams.categories == "voc":
                try:
                    check_voc_categories(self.files.categories, f"{self.root}'s annotation file")
                except FileNotFoundError:  # predicting from a checkpoint: no annotations to check
                    pass
            self._classes = category_classes(categories, self.hparams.categories)
        return self._classes

    @property
    def class_names(self) -> list[str]:
        return self.label_set[1]

    @property
    def num_classes(self) -> int:
        """Classes including the background."""
        return len(self.class_names)

    def _transform(self, train: bool) -> v2.Compose:
        hp = self.hparams
        normalize = [
            v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True),
            v2.Normalize(mean=list(hp.mean), std=list(hp.std)),
        ]
        if not train:
            return v2.Compose([v2.Resize(hp.base_size, antialias=True), *normalize])
        low, high = hp.scale_range
        return v2.Compose(
            [
                v2.RandomResize(int(low * hp.base_size), int(high * hp.base_size), antialias=True),
                v2.RandomHorizontalFlip(hp.flip_prob),
                v2.RandomCrop(hp.crop_size, pad_if_needed=True, fill={tv_tensors.Mask: IGNORE_INDEX, "others": 0}),
                *normalize,
            ]
        )

    def _split(self, split: str) -> COCOSegmentationDataset:
        dataset = self.files.read(split, drop_invalid=self.hparams.drop_invalid)
        images, annotations = self.files.split_files(split)
        if self._classes is None:  # the class list from the first file read (not the validation file parsed again)
            if self.hparams.categories == "voc":
                check_voc_categories(dataset["categories"], str(annotations))
            self._classes = category_classes(dataset["categories"], self.hparams.categories)
        unknown = unlisted_categories(dataset, self.label_set[0])
        if self.hparams.categories == "all" and unknown:  # they would become background without a word
            raise DataValidationError(
                f"{annotations} annotates categories {unknown[:10]} that the class list (from the first annotation "
                f"file read) lacks. Give the training and validation files the same 'categories'."
            )
        train = split == "train"
        hp = self.hparams
        cache = cache_folder(annotations, hp.cache_dir, hp.categories, hp.mask_rules)
        return COCOSegmentationDataset(
            images, InstanceRegions.from_dataset(dataset), self.label_set[0], train, self._transform(train), cache,
            min_area=self.hparams.min_area, skip_corrupt=self.hparams.skip_corrupt, rules=self.hparams.mask_rules,
        )  # fmt: skip

    def _predict_dataset(self, paths: list[Path]) -> Dataset:
        return ImageListDataset(paths, self._transform(False))

    def _loader(self, split: str, train: bool) -> DataLoader:
        return self.split_loader(split, train, collate_fn=segmentation_collate)
