"""CIFAR-10/100 from the official "python version" folders, as distributed by the dataset's authors.

``<root>/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}`` and
``<root>/cifar-100-python/{train, test, meta}`` (``root`` may also be that folder itself). Nothing is
downloaded. The batches are Python pickles; they are read with an unpickler that only rebuilds numpy
arrays and plain containers, so a tampered file cannot run code.

Augmentation is the ResNet paper's (Sec. 4.2): per-pixel mean subtraction, 4 pixels of zero padding on
each side, a random 32x32 crop and a random horizontal flip; evaluation uses the original image.
"""

from __future__ import annotations

import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from .loading import SplitLoaders
from .validation import Report

DOWNLOAD_HELP = (
    "Download the 'python version' from https://www.cs.toronto.edu/~kriz/cifar.html and extract it "
    "(tar xzf {archive}) into data.root."
)
_LAYOUT = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], "test_batch", "batches.meta"),
    "cifar100": ("cifar-100-python", ["train"], "test", "meta"),
}


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays and builtin containers only (what CIFAR batches hold)."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),  # how Python 3 writes bytes at protocol 2
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}: CIFAR batches hold only arrays")
        if module.startswith("numpy.core") and hasattr(np, "_core"):  # numpy 2 renamed numpy.core
            module = module.replace("numpy.core", "numpy._core", 1)
        return super().find_class(module, name)


def _load_batch(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            raw = _ArrayUnpickler(f, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError) as err:
        raise ValueError(f"{path}: not a CIFAR python batch ({err})") from None
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in raw.items()}


def cifar_folder(root: str | Path, dataset: Literal["cifar10", "cifar100"]) -> Path:
    """The folder holding the official batches (``root`` or ``root/<archive folder>``); an error naming the
    missing files and how to get them when they are not all there."""
    folder_name, train_files, test_file, meta_file = _LAYOUT[dataset]
    root = Path(root).expanduser()
    folder = root if (root / meta_file).is_file() else root / folder_name
    archive = "cifar-10-python.tar.gz" if dataset == "cifar10" else "cifar-100-python.tar.gz"
    needed = [*train_files, test_file, meta_file]
    missing = [name for name in needed if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{dataset}: {folder} lacks {', '.join(missing)}. Expected {root}/{folder_name}/"
            f"{{{', '.join(needed)}}}. {DOWNLOAD_HELP.format(archive=archive)}"
        )
    return folder


def read_cifar(root: str | Path, dataset: Literal["cifar10", "cifar100"]) -> dict:
    """Read the official batches: ``{"train": (images, labels), "test": (...), "classes": [...]}``.

    Images are ``N x 3 x 32 x 32`` uint8 tensors, labels int64 tensors.
    """
    _, train_files, test_file, meta_file = _LAYOUT[dataset]
    folder = cifar_folder(root, dataset)
    label_key = "labels" if dataset == "cifar10" else "fine_labels"

    meta = _load_batch(folder / meta_file)
    names = meta.get("label_names") or meta.get("fine_label_names")
    if not names:
        raise ValueError(f"{folder / meta_file}: no 'label_names' or 'fine_label_names': not CIFAR's meta batch")
    classes = [n.decode() if isinstance(n, bytes) else str(n) for n in names]

    def split(files: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        data, labels = [], []
        for name in files:
            path = folder / name
            batch = _load_batch(path)
            if "data" not in batch or label_key not in batch:
                raise ValueError(f"{path}: missing 'data' or '{label_key}' entries")
            rows = np.asarray(batch["data"])
            if rows.ndim != 2 or rows.shape[1] != 3 * 32 * 32:
                raise ValueError(f"{path}: 'data' is {'x'.join(map(str, rows.shape))}; CIFAR's batches hold one row "
                                 f"of 3072 values (3 x 32 x 32) per image")  # fmt: skip
            batch_labels = np.asarray(batch[label_key])
            if len(batch_labels) != len(rows):
                raise ValueError(f"{path}: {len(rows)} images but {len(batch_labels)} labels: every later label "
                                 f"would belong to another image")  # fmt: skip
            bad = np.flatnonzero((batch_labels < 0) | (batch_labels >= len(classes)))
            if len(bad):
                raise ValueError(f"{path}: image {int(bad[0])} has label {int(batch_labels[bad[0]])}, outside the "
                                 f"{len(classes)} classes of {meta_file} ({len(bad)} such labels)")  # fmt: skip
            data.append(rows.astype(np.uint8).reshape(-1, 3, 32, 32))
            labels.extend(batch_labels.tolist())
        return torch.from_numpy(np.concatenate(data)), torch.tensor(labels, dtype=torch.int64)

    return {"train": split(train_files), "test": split([test_file]), "classes": classes}


class CIFARDataset(Dataset):
    """In-memory uint8 CIFAR images, normalized on access, then optionally augmented.

    Normalizing first means the augmentation's zero padding is padding with the mean (ResNet Sec. 4.2
    pads the mean-subtracted image).
    """

    def __init__(
        self, images: torch.Tensor, labels: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, transform=None
    ) -> None:
        self.images = images
        self.labels = labels
        self.mean = mean
        self.std = std
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict:
        image = (self.images[index].float() / 255 - self.mean) / self.std
        if self.transform is not None:
            image = self.transform(image)
        return {"image": image, "label": int(self.labels[index]), "index": index, "path": f"#{index:05d}"}


class CIFARDataModule(SplitLoaders, pl.LightningDataModule):
    """CIFAR-10 or CIFAR-100 for ``tasks.classify``.

    Args:
        root: folder holding ``cifar-10-batches-py`` / ``cifar-100-python`` (or that folder itself).
        dataset: ``cifar10`` or ``cifar100``.
        batch_size: images per batch and process (the papers use 128 in total).
        num_workers: loader processes.
        val_split: hold out the last ``val_split`` training images as the validation set (ResNet Sec. 4.2
            chose its schedule on a 45k/5k split); 0 validates on the test batch, as the papers report.
        augment: the paper's pad-4 / crop-32 / flip augmentation for training.
        normalize: ``pixel_mean`` subtracts the training set's mean image (Sec. 4.2); ``channel`` also
            divides by the per-channel std.

    ``predict`` classifies the test batch; its rows are named ``#<index>`` (``#00000`` ...).
    """

    #: what ``data.root`` must hold (named by command-line errors)
    layout = "Expected CIFAR's python batches: <root>/cifar-10-batches-py/ or <root>/cifar-100-python/."
    #: the side of every image (what the tasks' default recipes read)
    image_size = 32

    def __init__(
        self,
        root: str,
        dataset: Literal["cifar10", "cifar100"] = "cifar10",
        batch_size: int = 128,
        num_workers: int = 4,
        val_split: int = 0,
        augment: bool = True,
        normalize: Literal["pixel_mean", "channel"] = "pixel_mean",
        pin_memory: bool = True,
        persistent_workers: bool = True,
    ) -> None:
        super().__init__()
        if dataset not in _LAYOUT:
            raise ValueError(f"data.dataset={dataset!r} must be 'cifar10' or 'cifar100'")
        self.save_hyperparameters()
        self.batch_size = self.eval_batch_size = batch_size
        self.datasets: dict[str, CIFARDataset] = {}
        self._data: dict | None = None

    @property
    def data(self) -> dict:
        if self._data is None:
            self._data = read_cifar(self.hparams.root, self.hparams.dataset)
        return self._data

    @property
    def classes(self) -> list[str]:
        return self.data["classes"]

    @property
    def class_names(self) -> list[str]:
        return self.classes

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def _check_split(self, split: str) -> None:
        cifar_folder(self.hparams.root, self.hparams.dataset)  # every split comes from the same batches

    def check(self, decode: bool = True, fix: bool = False) -> Iterator[Report]:
        """The data check's report (``python -m datamodules.check``): every batch read and checked (row sizes,
        as many labels as images, labels within the class list)."""
        report = Report(f"{self.hparams.dataset} at {self.hparams.root}")
        try:
            data = read_cifar(self.hparams.root, self.hparams.dataset)
        except (ValueError, FileNotFoundError) as err:
            report.error(str(self.hparams.root), str(err))
        else:
            report.checked["images"] = len(data["train"][1]) + len(data["test"][1])
            report.checked["classes"] = len(data["classes"])
        yield report

    def setup(self, stage: str) -> None:
        hp = self.hparams
        images, labels = self.data["train"]
        test_images, test_labels = self.data["test"]
        if hp.val_split:
            if not 0 < hp.val_split < len(labels):
                raise ValueError(f"data.val_split={hp.val_split} must be between 1 and {len(labels) - 1}")
            val_images, val_labels = images[-hp.val_split :], labels[-hp.val_split :]
            images, labels = images[: -hp.val_split], labels[: -hp.val_split]
        else:
            val_images, val_labels = test_images, test_labels
        mean = images.double().mean(dim=0).div(255).float()  # the per-pixel mean image, 3 x 32 x 32
        if hp.normalize == "channel":
            std = images.double().div(255).std(dim=(0, 2, 3)).float().view(3, 1, 1)
        else:
            std = torch.ones(3, 1, 1)
        augment = v2.Compose([v2.RandomCrop(32, padding=4, fill=0), v2.RandomHorizontalFlip()]) if hp.augment else None
        self.datasets = {
            "train": CIFARDataset(images, labels, mean, std, augment),
            "val": CIFARDataset(val_images, val_labels, mean, std),
            "test": CIFARDataset(test_images, test_labels, mean, std),
        }
        self.datasets["predict"] = self.datasets["test"]  # rows named #<index in the test batch>

    def _loader(self, split: str, train: bool) -> DataLoader:
        return self.split_loader(split, train)
