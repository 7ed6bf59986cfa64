"""ImageNet and any ImageFolder tree: ``<root>/train/<class>/*.JPEG``, ``<root>/val/<class>/*.JPEG``.

Class indices are the sorted folder names of the training split (for ImageNet, the WordNet ids
``n01440764`` ...); human-readable names come from ImageNet's ``LOC_synset_mapping.txt`` when it is in
``root`` or its parent. Images are decoded to uint8 tensors by ``datamodules.images.read_image`` and
transformed by ``transforms.v2`` (``datamodules.transforms``).
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import lightning.pytorch as pl
from torch.utils.data import DataLoader, Dataset

from .images import CorruptImageError, is_image_file, read_image
from .loading import make_loader
from .transforms import IMAGENET_MEAN, IMAGENET_STD, TrainAugment, eval_transform, train_transform

log = logging.getLogger(__name__)

LAYOUT_HELP = (
    "Expected an ImageFolder tree: <root>/{train}/<class name>/<image files> and the same for the "
    "validation folder (ImageNet: train/n01440764/n01440764_10026.JPEG, val/n01440764/*.JPEG)."
)


def find_classes(directory: Path) -> list[str]:
    """Sorted names of the class folders in ``directory``."""
    return sorted(entry.name for entry in os.scandir(directory) if entry.is_dir() and not entry.name.startswith("."))


def list_images(directory: Path) -> list[Path]:
    """Every image file below ``directory``, sorted."""
    found = []
    for dirpath, dirnames, filenames in os.walk(directory, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found.extend(Path(dirpath) / name for name in sorted(filenames) if is_image_file(name))
    return found


def list_samples(directory: Path, classes: Sequence[str]) -> list[tuple[str, int]]:
    """``(path, class index)`` for every image of ``directory/<class>/``; unknown class folders are errors."""
    index = {name: i for i, name in enumerate(classes)}
    extra = [name for name in find_classes(directory) if name not in index]
    if extra:
        raise ValueError(
            f"{directory}: class folders {extra[:5]} do not exist in the training split; every evaluation "
            f"class must be one of the {len(classes)} training classes."
        )
    samples: list[tuple[str, int]] = []
    for name in classes:
        folder = directory / name
        if folder.is_dir():
            samples.extend((str(path), index[name]) for path in list_images(folder))
    return samples


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


class ImageFolderDataset(Dataset):
    """``(path, label)`` samples decoded and transformed on access.

    Args:
        samples: ``(path, label)`` pairs; ``label`` is -1 for unlabeled (prediction) images.
        transform: a callable on ``3 x H x W`` uint8 tensors.
        skip_corrupt: return ``None`` for an unreadable file (logged with its path, dropped by the
            collate function and counted) instead of raising :class:`CorruptImageError`.
    """

    def __init__(self, samples: Sequence[tuple[str, int]], transform, skip_corrupt: bool = False) -> None:
        self.samples = list(samples)
        self.transform = transform
        self.skip_corrupt = skip_corrupt

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict | None:
        path, label = self.samples[index]
        try:
            image = read_image(path)
        except CorruptImageError as err:
            if not self.skip_corrupt:
                raise
            log.warning("skipping unreadable image: %s", err)
            return None
        return {"image": self.transform(image), "label": label, "index": index, "path": path}


class ImageFolderDataModule(pl.LightningDataModule):
    """ImageNet (or any ImageFolder tree) for ``tasks.classify``.

    Args:
        root: dataset folder holding ``train_dir`` and ``val_dir``; may be ``None`` for ``predict`` with a
            checkpoint, whose class names are stored in it.
        train_dir: training split folder under ``root``.
        val_dir: validation split folder under ``root``.
        test_dir: test split folder under ``root`` (defaults to ``val_dir``).
        predict_root: a folder of images (searched recursively) for ``predict``.
        batch_size: images per batch and process.
        eval_batch_size: images per evaluation batch (defaults to ``batch_size``).
        num_workers: loader processes per training process.
        image_size: training and evaluation crop size.
        eval_resize: shorter side before the evaluation center crop.
        train_augment: ``random_resized_crop`` (modern), ``scale`` (ResNet Sec. 3.4) or ``none``.
        scale_range: shorter-side range of the ``scale`` augmentation.
        color_jitter: brightness/contrast/saturation jitter strength (0 disables).
        pca_lighting: AlexNet PCA lighting std (0.1 in the ResNet recipe; 0 disables).
        mean: per-channel mean for normalization.
        std: per-channel std for normalization.
        skip_corrupt: skip unreadable images (each logged, counted in ``data/skipped``) instead of failing.
        pin_memory: pin host memory when CUDA is used.
        persistent_workers: keep loader processes between epochs.
    """

    def __init__(
        self,
        root: str | None = None,
        train_dir: str = "train",
        val_dir: str = "val",
        test_dir: str | None = None,
        predict_root: str | None = None,
        batch_size: int = 256,
        eval_batch_size: int | None = None,
        num_workers: int = 8,
        image_size: int = 224,
        eval_resize: int = 256,
        train_augment: TrainAugment = "random_resized_crop",
        scale_range: tuple[int, int] = (256, 480),
        color_jitter: float = 0.0,
        pca_lighting: float = 0.0,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
        skip_corrupt: bool = False,
        pin_memory: bool = True,
        persistent_workers: bool = True,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.root = Path(root).expanduser() if root else None
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self._classes: list[str] | None = None
        self.datasets: dict[str, ImageFolderDataset] = {}

    # -- classes ------------------------------------------------------------------------------
    def _split_dir(self, name: str) -> Path:
        if self.root is None:
            raise ValueError(f"data.root is not set. {LAYOUT_HELP.format(train=self.hparams.train_dir)}")
        path = self.root / name
        if not path.is_dir():
            raise FileNotFoundError(f"{path} does not exist. {LAYOUT_HELP.format(train=self.hparams.train_dir)}")
        return path

    @property
    def classes(self) -> list[str]:
        """Class folder names, sorted (the label order)."""
        if self._classes is None:
            train = self._split_dir(self.hparams.train_dir)
            classes = find_classes(train)
            if not classes:
                raise ValueError(f"{train} has no class folders. {LAYOUT_HELP.format(train=self.hparams.train_dir)}")
            self._classes = classes
        return self._classes

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def class_names(self) -> list[str]:
        """Human-readable names (ImageNet synset names when available, else the folder names)."""
        names = synset_names(self.root) if self.root else {}
        return [names.get(c, c) for c in self.classes]

    # -- datasets -----------------------------------------------------------------------------
    def _transform(self, train: bool):
        hp = self.hparams
        if train:
            return train_transform(
                augment=hp.train_augment,
                image_size=hp.image_size,
                scale_range=hp.scale_range,
                color_jitter=hp.color_jitter,
                pca_lighting=hp.pca_lighting,
                mean=hp.mean,
                std=hp.std,
            )
        return eval_transform(image_size=hp.image_size, resize_size=hp.eval_resize, mean=hp.mean, std=hp.std)

    def _split(self, directory: str, train: bool) -> ImageFolderDataset:
        path = self._split_dir(directory)
        samples = list_samples(path, self.classes)
        if not samples:
            raise ValueError(f"{path} holds no image files ({', '.join(('.JPEG', '.jpg', '.png'))}...).")
        counts = Counter(label for _, label in samples)
        empty = [c for i, c in enumerate(self.classes) if not counts[i]]
        if train and empty:
            raise ValueError(
                f"{path}: class folders without images: {', '.join(empty[:10])}"
                f"{' ...' if len(empty) > 10 else ''}. Every training class needs images; remove the empty folders."
            )
        return ImageFolderDataset(samples, self._transform(train), skip_corrupt=self.hparams.skip_corrupt)

    def setup(self, stage: str) -> None:
        hp = self.hparams
        if stage == "fit":
            self.datasets["train"] = self._split(hp.train_dir, train=True)
        if stage in ("fit", "validate"):
            self.datasets["val"] = self._split(hp.val_dir, train=False)
        if stage == "test":
            self.datasets["test"] = self._split(hp.test_dir or hp.val_dir, train=False)
        if stage == "predict":
            if not hp.predict_root:
                raise ValueError("predict needs data.predict_root: a folder of images to classify")
            folder = Path(hp.predict_root).expanduser()
            if not folder.is_dir():
                raise FileNotFoundError(f"data.predict_root={folder} is not a folder")
            paths = list_images(folder)
            if not paths:
                raise ValueError(f"data.predict_root={folder} holds no image files")
            self.datasets["predict"] = ImageFolderDataset(
                [(str(p), -1) for p in paths], self._transform(False), skip_corrupt=hp.skip_corrupt
            )

    def _loader(self, split: str, train: bool) -> DataLoader:
        hp = self.hparams
        return make_loader(
            self.datasets[split],
            batch_size=self.batch_size if train else self.eval_batch_size,
            num_workers=hp.num_workers,
            train=train,
            pin_memory=hp.pin_memory,
            persistent_workers=hp.persistent_workers,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", train=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict", train=False)
