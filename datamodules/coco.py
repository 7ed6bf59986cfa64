"""COCO instance annotations, read with pycocotools exactly as distributed, for detection (and segmentation).

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

import contextlib
import io
import json
import logging
import os
from collections import Counter
from pathlib import Path
from typing import Literal

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from .images import read_image, read_image_or_skip
from .loading import (
    EpochSeeded,
    ResumableDataLoader,
    SplitLoaders,
    check_enough_for_a_batch,
    make_loader,
    run_seed,
    trained_batches,
)
from .samplers import AspectRatioGroupedSampler, aspect_ratio_groups

log = logging.getLogger(__name__)

LAYOUT_HELP = (
    "Expected COCO's layout: <root>/train2017/*.jpg, <root>/val2017/*.jpg and "
    "<root>/annotations/instances_{train,val}2017.json (or set data.train_images, data.train_annotations, ...)."
)


def read_coco_json(path: str | Path) -> dict:
    """The parsed annotation file, with errors that name the file and the problem."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"annotation file {path} does not exist. {LAYOUT_HELP}")
    try:
        dataset = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err}); re-download or regenerate the annotation file") from None
    if not isinstance(dataset, dict):
        raise ValueError(f"{path}: a COCO annotation file is a JSON object, not a {type(dataset).__name__}")
    missing = [key for key in ("images", "annotations", "categories") if key not in dataset]
    if missing:
        raise ValueError(f"{path}: not a COCO instances file, it lacks the {', '.join(missing)} field(s)")
    return dataset


def load_coco(path: str | Path, images_dir: str | Path | None = None, drop_invalid: bool = False):
    """A validated ``pycocotools.coco.COCO`` for the annotation file ``path``.

    The file is checked (``datamodules.check.validate_coco``; image files too when ``images_dir`` is
    given, without decoding them) before pycocotools indexes it. Errors stop here with the report --
    before any training -- unless ``drop_invalid``, which drops the offending images and annotations and
    logs how many. Warnings (degenerate or out-of-image boxes, handled later) are logged.
    """
    from pycocotools.coco import COCO

    from .check import DataValidationError, validate_coco

    path = Path(path)
    dataset = read_coco_json(path)
    report, cleaned = validate_coco(dataset, path, Path(images_dir) if images_dir is not None else None)
    lacking = sum(isinstance(a, dict) and not ("area" in a and "iscrowd" in a) for a in dataset["annotations"])
    if lacking and drop_invalid:  # COCOeval reads them from the file itself: dropping cannot mend that
        raise DataValidationError(
            f"{path}: {lacking} annotations lack 'area' or 'iscrowd', which COCOeval reads from this file "
            f"(data.drop_invalid cannot mend the file). python -m datamodules.check --config <config> --fix "
            f"writes a copy with them filled in; point data.*_annotations at it."
        )
    if report.errors:
        if not drop_invalid:
            raise DataValidationError(
                f"{path} has errors that would break training:\n{report.text()}\nFix the file (python -m "
                f"datamodules.check --config <config> --fix writes a cleaned copy) or set data.drop_invalid: true."
            )
        log.warning(
            "%s: dropped %d images and %d annotations with errors (data.drop_invalid):\n%s",
            path, len(dataset["images"]) - len(cleaned["images"]),
            len(dataset["annotations"]) - len(cleaned["annotations"]), report.text(limit=20),
        )  # fmt: skip
        dataset = cleaned
    elif report.warnings:
        log.info("%s: %d warnings:\n%s", path, len(report.warnings), report.text(limit=10))
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        coco.createIndex()
    return coco


def xywh_to_xyxy_clipped(bbox, width: int, height: int) -> tuple[float, float, float, float]:
    """COCO's ``[x, y, w, h]`` as ``(x1, y1, x2, y2)`` clipped to the image."""
    x, y, w, h = (float(v) for v in bbox)
    x1, y1 = min(max(x, 0.0), width), min(max(y, 0.0), height)
    x2, y2 = min(max(x + w, 0.0), width), min(max(y + h, 0.0), height)
    return x1, y1, x2, y2


def unlisted_categories(coco, listed) -> list[int]:
    """Category ids the file's annotations use that ``listed`` (the model's classes) lacks, sorted."""
    return sorted({a["category_id"] for a in coco.dataset["annotations"]} - set(listed))


def check_image_size(image: torch.Tensor, info: dict, path: Path) -> None:
    """Annotations are in the pixel coordinates of the image they were made on: a resized or different file
    would misplace every box and mask silently, so the decoded size must be the one the file records."""
    from .check import DataValidationError, size_problem

    problem = size_problem(image, info["width"], info["height"])
    if problem:
        raise DataValidationError(
            f"{path}: {problem} (image id {info['id']}). Use the images the annotations were made for, or rescale "
            f"the annotations and their 'width'/'height' to these images."
        )


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


class ImageListDataset(Dataset):
    """Unlabeled images for ``predict`` (detection and segmentation).

    ``image_id`` is the 1-based position in the sorted file list; ``original_size`` is the image's size
    before ``transform``, so predictions can be mapped back to it.
    """

    def __init__(self, paths: list[Path], transform) -> None:
        self.paths = paths
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict:
        image = read_image(self.paths[index])
        return {
            "image": self.transform(tv_tensors.Image(image)).as_subclass(torch.Tensor),
            "original_size": torch.tensor(image.shape[-2:]),
            "image_id": index + 1,
            "path": str(self.paths[index]),
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
        self.root = Path(root).expanduser()
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.datasets: dict[str, Dataset] = {}
        self._categories: list[dict] | None = None

    # -- files and categories ---------------------------------------------------------------------
    def split_files(self, split: str) -> tuple[Path, Path]:
        """``(images folder, annotation file)`` of ``train``, ``val`` or ``test``."""
        hp = self.hparams
        if split == "train":
            images, annotations = hp.train_images, hp.train_annotations
        elif split == "val":
            images, annotations = hp.val_images, hp.val_annotations
        elif split == "test":
            images, annotations = hp.test_images or hp.val_images, hp.test_annotations or hp.val_annotations
        else:
            raise ValueError(f"unknown split {split!r}")
        return self.root / images, self.root / annotations

    def annotation_file(self, split: str) -> Path:
        return self.split_files(split)[1]

    def _check_split(self, split: str) -> None:
        images, annotations = self.split_files(split)
        if not images.is_dir():
            raise FileNotFoundError(f"image folder {images} does not exist. {LAYOUT_HELP}")
        if not annotations.is_file():
            raise FileNotFoundError(f"annotation file {annotations} does not exist. {LAYOUT_HELP}")

    @property
    def categories(self) -> list[dict]:
        """COCO categories (``id``, ``name``) sorted by id, from the validation (else training) file."""
        if self._categories is None:
            for split in ("val", "train"):
                path = self.annotation_file(split)
                if path.is_file():
                    self._categories = sorted(read_coco_json(path)["categories"], key=lambda c: c["id"])
                    break
            else:
                raise FileNotFoundError(f"no annotation file under {self.root}. {LAYOUT_HELP}")
        return self._categories

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
        self._check_split(split)
        images, annotations = self.split_files(split)
        train = split == "train"
        coco = load_coco(annotations, images, drop_invalid=self.hparams.drop_invalid)
        unknown = unlisted_categories(coco, self.category_ids)
        if train and unknown:  # the model's classes are the validation file's categories
            from .check import DataValidationError

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


# -- semantic segmentation from instance annotations ------------------------------------------------
#: COCO category ids of the 20 PASCAL VOC classes, in VOC's class order (class 0 is the background):
#: the label set of torchvision's COCO-trained FCN and DeepLab models.
VOC_CATEGORY_IDS: tuple[int, ...] = (5, 2, 16, 9, 44, 6, 3, 17, 62, 21, 67, 18, 19, 4, 1, 64, 20, 63, 7, 72)
VOC_CLASS_NAMES: tuple[str, ...] = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip
IGNORE_INDEX = 255
#: COCO's own names of those ids (instances_{train,val}2017.json), to recognize COCO's category list.
VOC_COCO_NAMES: dict[int, str] = {
    5: "airplane", 2: "bicycle", 16: "bird", 9: "boat", 44: "bottle", 6: "bus", 3: "car", 17: "cat", 62: "chair",
    21: "cow", 67: "dining table", 18: "dog", 19: "horse", 4: "motorcycle", 1: "person", 64: "potted plant",
    20: "sheep", 63: "couch", 7: "train", 72: "tv",
}  # fmt: skip


def check_voc_categories(categories: list[dict], source: str) -> None:
    """``voc`` picks COCO's VOC categories by id: refuse a file whose ids mean something else (a dataset
    with its own categories would have them relabeled as VOC classes without a word)."""
    from .check import DataValidationError

    present = [c for c in categories if c.get("id") in VOC_COCO_NAMES]
    wrong = [c for c in present if str(c.get("name", "")).strip().lower() != VOC_COCO_NAMES[c["id"]]]
    if present and not wrong:
        return
    found = (
        f"names id {wrong[0]['id']} {wrong[0].get('name')!r} (COCO's is {VOC_COCO_NAMES[wrong[0]['id']]!r})"
        if wrong
        else "has none of their ids"
    )
    raise DataValidationError(
        f"data.categories=voc takes COCO's 20 PASCAL VOC categories by their COCO ids (1 person, 2 bicycle, "
        f"3 car, ...), but {source} {found}: these are not COCO's categories. Set data.categories: all to "
        f"segment the file's own categories."
    )


def category_classes(categories: list[dict], label_set: str) -> tuple[dict[int, int], list[str]]:
    """``(category id -> class index, class names)`` for ``voc`` (21 classes) or ``all`` (categories + 1)."""
    if label_set == "voc":
        return {cid: i + 1 for i, cid in enumerate(VOC_CATEGORY_IDS)}, list(VOC_CLASS_NAMES)
    if label_set == "all":
        ordered = sorted(categories, key=lambda c: c["id"])
        return {c["id"]: i + 1 for i, c in enumerate(ordered)}, ["background", *[c["name"] for c in ordered]]
    raise ValueError(f"data.categories={label_set!r} must be 'voc' or 'all'")


MaskRules = Literal["default", "torchvision"]


def is_polygon(points) -> bool:
    """A COCO polygon: x, y pairs of at least 3 points (pycocotools reads a list of 4 numbers as a box)."""
    return isinstance(points, list) and len(points) >= 6 and len(points) % 2 == 0


def instance_mask(coco, ann: dict):
    """The annotation's region (``H x W`` bool numpy array) by ``pycocotools``' ``annToMask``, without its
    degenerate polygons (fewer than 3 points), which pycocotools would read as a box or reject with a
    ``TypeError`` when they come first."""
    import numpy as np

    segmentation = ann.get("segmentation")
    if isinstance(segmentation, list):
        polygons = [p for p in segmentation if is_polygon(p)]
        if not polygons:
            info = coco.imgs[ann["image_id"]]
            return np.zeros((info["height"], info["width"]), dtype=bool)
        ann = {**ann, "segmentation": polygons}
    return coco.annToMask(ann).astype(bool)


def semantic_mask(coco, image_id: int, classes: dict[int, int], rules: MaskRules = "default"):
    """Rasterize an image's instances into one class-index mask (``H x W`` uint8 numpy array).

    Polygons, RLE and crowd RLE all go through ``pycocotools``' ``annToMask`` (``instance_mask``);
    instances of categories outside the label set are background. ``default`` rules: pixels covered by
    instances of *different* classes, and crowd regions of a class in the label set, become 255 (ignored
    by the loss and the metrics). ``torchvision`` rules (its reference scripts, which produced its
    published FCN numbers): crowd regions count as instances of their class, and any pixel covered by
    two or more instances becomes 255.
    """
    import numpy as np

    info = coco.imgs[image_id]
    class_map = np.zeros((info["height"], info["width"]), dtype=np.uint8)
    ignore = np.zeros(class_map.shape, dtype=bool)
    if rules == "torchvision":
        coverage = np.zeros(class_map.shape, dtype=np.uint16)
        for ann in coco.imgToAnns.get(image_id, []):
            cls = classes.get(ann["category_id"])
            if cls is not None:
                region = instance_mask(coco, ann)
                coverage += region
                np.maximum(class_map, np.where(region, cls, 0).astype(np.uint8), out=class_map)
        class_map[coverage > 1] = IGNORE_INDEX
        return class_map
    for ann in coco.imgToAnns.get(image_id, []):
        cls = classes.get(ann["category_id"])
        if cls is None:
            continue
        region = instance_mask(coco, ann)
        if ann.get("iscrowd", 0):
            ignore |= region
            continue
        ignore |= region & (class_map > 0) & (class_map != cls)
        class_map[region & (class_map == 0)] = cls
    class_map[ignore] = IGNORE_INDEX
    return class_map


class COCOSegmentationDataset(Dataset):
    """Images of one COCO split with class-index masks, rasterized once and cached as PNG files.

    Args:
        images_dir: folder of the split's image files.
        coco: the split's annotations.
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
        coco,
        classes: dict[int, int],
        train: bool,
        transform,
        cache_dir: Path,
        min_area: float = 1000,
        skip_corrupt: bool = False,
        rules: MaskRules = "default",
    ) -> None:
        self.images_dir = Path(images_dir)
        self.coco = coco
        self.classes = classes
        self.rules = rules
        self.transform = transform
        self.cache_dir = Path(cache_dir)
        self.skip_corrupt = skip_corrupt
        ids = sorted(coco.getImgIds())
        if train:

            def annotated_area(image_id: int) -> float:
                anns = coco.imgToAnns.get(image_id, [])
                return sum(a.get("area", 0.0) for a in anns if a["category_id"] in classes)

            kept = [i for i in ids if annotated_area(i) > min_area]
            if len(kept) < len(ids):
                log.info("%s: %d of %d images skipped for training (annotated area <= %s pixels)",
                         self.images_dir, len(ids) - len(kept), len(ids), min_area)  # fmt: skip
            ids = kept
        self.ids = ids

    def __len__(self) -> int:
        return len(self.ids)

    def mask(self, image_id: int) -> torch.Tensor:
        """The class-index mask (``1 x H x W`` uint8), from the cache or rasterized and cached now."""
        from torchvision.io import ImageReadMode, decode_png, encode_png, read_file

        path = self.cache_dir / f"{image_id}.png"
        if path.is_file():
            try:
                return decode_png(read_file(str(path)), mode=ImageReadMode.GRAY)
            except RuntimeError:
                path.unlink(missing_ok=True)  # a damaged cache entry is rebuilt
        mask = torch.from_numpy(semantic_mask(self.coco, image_id, self.classes, self.rules))[None]
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.tmp")
        partial.write_bytes(encode_png(mask).numpy().tobytes())
        os.replace(partial, path)  # atomic: concurrent workers never see half a file
        return mask

    def __getitem__(self, index: int) -> dict | None:
        image_id = self.ids[index]
        path = self.images_dir / self.coco.imgs[image_id]["file_name"]
        image = read_image_or_skip(path, self.skip_corrupt)
        if image is None:
            return None
        check_image_size(image, self.coco.imgs[image_id], path)
        image, mask = self.transform(tv_tensors.Image(image), tv_tensors.Mask(self.mask(image_id)))
        return {
            "image": image.as_subclass(torch.Tensor),
            "mask": mask.as_subclass(torch.Tensor)[0].long(),
            "image_id": image_id,
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


class COCOSegmentationDataModule(SplitLoaders, pl.LightningDataModule):
    """COCO instance annotations as semantic segmentation masks, for ``tasks.segment``.

    Args:
        root, train_images, train_annotations, val_images, val_annotations, test_images,
            test_annotations, predict_root: as for ``COCODetectionDataModule``.
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
        train_images: str = "train2017",
        train_annotations: str = "annotations/instances_train2017.json",
        val_images: str = "val2017",
        val_annotations: str = "annotations/instances_val2017.json",
        test_images: str | None = None,
        test_annotations: str | None = None,
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
        mean: tuple[float, float, float] = (0.485, 0.456, 0.406),
        std: tuple[float, float, float] = (0.229, 0.224, 0.225),
        skip_corrupt: bool = False,
        drop_invalid: bool = False,
        pin_memory: bool = True,
        persistent_workers: bool = True,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.files = COCODetectionDataModule(
            root, train_images, train_annotations, val_images, val_annotations, test_images, test_annotations
        )
        self.root = self.files.root
        self.batch_size = batch_size
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

    def annotation_file(self, split: str) -> Path:
        return self.files.annotation_file(split)

    def _check_split(self, split: str) -> None:
        self.files._check_split(split)

    def _cache_dir(self, annotations: Path) -> Path:
        import hashlib

        if self.hparams.cache_dir:
            base = Path(self.hparams.cache_dir).expanduser()
        else:
            base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "residual-zoo" / "coco_masks"
        stat = annotations.stat()
        hp = self.hparams
        key = f"{annotations.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{hp.categories}|{hp.mask_rules}"
        return base / f"{annotations.stem}-{hashlib.sha1(key.encode()).hexdigest()[:12]}"

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
        self._check_split(split)
        images, annotations = self.files.split_files(split)
        coco = load_coco(annotations, images, drop_invalid=self.hparams.drop_invalid)
        if self.hparams.categories == "all" and self._classes is None:
            self._classes = category_classes(coco.dataset["categories"], "all")
        unknown = unlisted_categories(coco, self.label_set[0])
        if self.hparams.categories == "all" and unknown:  # they would become background without a word
            from .check import DataValidationError

            raise DataValidationError(
                f"{annotations} annotates categories {unknown[:10]} that the class list (from the first annotation "
                f"file read) lacks. Give the training and validation files the same 'categories'."
            )
        train = split == "train"
        return COCOSegmentationDataset(
            images, coco, self.label_set[0], train, self._transform(train), self._cache_dir(annotations),
            min_area=self.hparams.min_area, skip_corrupt=self.hparams.skip_corrupt, rules=self.hparams.mask_rules,
        )  # fmt: skip

    def _predict_dataset(self, paths: list[Path]) -> Dataset:
        return ImageListDataset(paths, self._transform(False))

    def _loader(self, split: str, train: bool) -> DataLoader:
        hp = self.hparams
        return make_loader(
            self.datasets[split],
            batch_size=hp.batch_size if train else hp.eval_batch_size,
            num_workers=hp.num_workers,
            train=train,
            pin_memory=hp.pin_memory,
            persistent_workers=hp.persistent_workers,
            collate_fn=segmentation_collate,
            trainer=self.trainer,
        )
