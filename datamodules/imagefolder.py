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
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset

from .gpu_decode import (
    JPEG_MAGIC,
    CUDAPrefetcher,
    GPUAugment,
    decode_batch,
    header_size,
    is_packed,
    pack_encoded,
    select_samples,
    unpack_encoded,
)
from .images import is_image_file, read_image_or_skip
from .loading import SplitLoaders, collate_skipping, make_loader
from .transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    PAPER_SCALES,
    EvalCrops,
    Normalize,
    TrainAugment,
    eval_transform,
    train_transform,
)

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


def unreadable_files(folder: Path) -> Counter:
    """How many files below ``folder`` are not images in a readable format, by suffix (hidden files aside)."""
    return Counter(
        Path(name).suffix.lower() or name
        for _, _, names in os.walk(folder, followlinks=True)
        for name in names
        if not name.startswith(".") and not is_image_file(name)
    )


def no_images_problem(folder: Path) -> str:
    """What to say about a class folder without readable images: empty, or holding files of other types."""
    from .images import IMAGE_EXTENSIONS

    others = unreadable_files(folder)
    if not others:
        return "class folder without images"
    kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(others.items()))
    return (
        f"class folder without images it can read: it holds {kinds} files; the readable formats are "
        f"{', '.join(IMAGE_EXTENSIONS)} (convert the files, e.g. to PNG)"
    )


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

    def __init__(
        self,
        samples: Sequence[tuple[str, int]],
        transform,
        skip_corrupt: bool = False,
        raw: bool = False,
        draw: Callable[[int, int], dict[str, torch.Tensor]] | None = None,
        cpu_share: float = 0.0,
    ) -> None:
        self.samples = list(samples)
        self.transform = transform
        self.skip_corrupt = skip_corrupt
        self.raw = raw
        self.draw = draw
        self.cpu_share = cpu_share

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict | None:
        path, label = self.samples[index]
        if self.raw:
            return self._raw_item(path, label, index)
        image = read_image_or_skip(path, self.skip_corrupt)
        if image is None:
            return None
        return {"image": self.transform(image), "label": label, "index": index, "path": path}

    def on_cpu(self, index: int) -> bool:
        """Whether training sample ``index`` is decoded and cropped by the worker (``cpu_share`` of them,
        spread evenly over the indices by the golden-ratio sequence)."""
        return self.draw is not None and (index * 0.6180339887498949) % 1.0 < self.cpu_share

    def _raw_item(self, path: str, label: int, index: int) -> dict | None:
        """GPU decoding: the JPEG's bytes (anything else decoded here, on the CPU) and, for training, the
        crop box and flip drawn from the header's size (``GPUAugment.sample``).

        Training samples picked by :meth:`on_cpu` are instead finished here by the CPU pipeline (marked
        ``done``), which draws the same crop, flip and jitter: the two halves of a batch are the same
        augmentation, split between the host's cores and the GPU.
        """
        if self.on_cpu(index):
            image = read_image_or_skip(path, self.skip_corrupt)
            if image is None:
                return None
            item = {"image": self.transform(image), "label": label, "index": index, "path": path}
            item.update({k: torch.zeros_like(v) for k, v in self.draw(*image.shape[-2:]).items()})
            item["done"] = torch.tensor(True)
            return item
        data = bytearray(Path(path).read_bytes())
        image: torch.Tensor | None = None
        if data.startswith(JPEG_MAGIC):
            try:
                height, width = header_size(data)
                image = torch.frombuffer(data, dtype=torch.uint8)
            except OSError:  # not even a readable header: the CPU decoder names the file (or skips it)
                pass
        if image is None:
            image = read_image_or_skip(path, self.skip_corrupt)
            if image is None:
                return None
            height, width = image.shape[-2:]
        item = {"image": image, "label": label, "index": index, "path": path}
        if self.draw is not None:
            item.update(self.draw(height, width))
            item["done"] = torch.tensor(False)
        return item


def collate_raw(batch: Sequence[dict | None]) -> dict:
    """Batches of undecoded images: the files' bytes packed in one buffer (``gpu_decode.pack_encoded``),
    the rest collated as usual (unreadable samples, ``None``, dropped and counted)."""
    images = [sample["image"] for sample in batch if sample is not None]
    rest = [None if sample is None else {k: v for k, v in sample.items() if k != "image"} for sample in batch]
    out = collate_skipping(rest)  # drops and counts the unreadable samples
    if images:
        out["image"] = pack_encoded(images)
    return out


class ImageFolderDataModule(SplitLoaders, pl.LightningDataModule):
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
        eval_size: evaluation crop size when it differs from ``image_size`` (Identity Mappings Table 5
            tests at 320x320).
        eval_resize: shorter side before the evaluation crop.
        eval_crops: for validation, test and prediction: ``center`` (one crop), ``ten`` (the ResNet
            paper's 10-crop testing, Sec. 3.4) or ``multiscale`` (its fully-convolutional testing: the
            whole image at each of ``eval_scales``); the task averages the views' softmax scores.
        eval_scales: shorter sides of ``multiscale`` testing (the paper's 224, 256, 384, 480, 640).
        train_augment: ``random_resized_crop`` (modern), ``scale`` (ResNet Sec. 3.4) or ``none``.
        scale_range: shorter-side range of the ``scale`` augmentation.
        color_jitter: brightness/contrast/saturation jitter strength (0 disables).
        pca_lighting: AlexNet PCA lighting std (0.1 in the ResNet recipe; 0 disables).
        mean: per-channel mean for normalization.
        std: per-channel std for normalization.
        skip_corrupt: skip unreadable images (each logged, counted in ``data/skipped``) instead of failing.
        drop_invalid: leave out empty files and class folders without training images (counts logged)
            instead of stopping before training with a report (``datamodules.check``).
        decode_device: ``cuda`` decodes and augments on the GPU (``datamodules.gpu_decode``): workers
            only read files and draw each crop from the file's header (the same draws as the CPU path,
            so resuming stays exact), so a few cores feed thousands of images per second.
        gpu_prefetch: with ``decode_device: cuda``, prepare the next training batches on a side stream
            while the current one trains (``datamodules.gpu_decode.CUDAPrefetcher``).
        cpu_share: with ``decode_device: cuda``, the fraction of training images the loader workers
            decode and augment themselves (the same draws as on the GPU), taking that share of the
            decoding off the GPU; 0 sends every JPEG to the GPU.
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
        eval_size: int | None = None,
        eval_resize: int = 256,
        eval_crops: EvalCrops = "center",
        eval_scales: tuple[int, ...] = PAPER_SCALES,
        train_augment: TrainAugment = "random_resized_crop",
        scale_range: tuple[int, int] = (256, 480),
        color_jitter: float = 0.0,
        pca_lighting: float = 0.0,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
        skip_corrupt: bool = False,
        drop_invalid: bool = False,
        decode_device: Literal["cpu", "cuda"] = "cpu",
        gpu_prefetch: bool = True,
        cpu_share: float = 0.0,
        pin_memory: bool = True,
        persistent_workers: bool = True,
    ) -> None:
        super().__init__()
        if decode_device not in ("cpu", "cuda"):
            raise ValueError(f"data.decode_device={decode_device!r} must be 'cpu' or 'cuda'")
        if not 0.0 <= cpu_share <= 1.0:
            raise ValueError(f"data.cpu_share={cpu_share} must be a fraction between 0 and 1")
        crop = eval_size or image_size
        if eval_crops != "multiscale" and crop > eval_resize:
            raise ValueError(
                f"data.{'eval_size' if eval_size else 'image_size'}={crop} is larger than data.eval_resize="
                f"{eval_resize}: the evaluation crop would be padded with black borders. Set data.eval_resize to "
                f"at least {crop} (Identity Mappings tests 320x320 crops of images resized to 320)."
            )
        self.save_hyperparameters()
        self.root = Path(root).expanduser() if root else None
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self._classes: list[str] | None = None
        self.datasets: dict[str, ImageFolderDataset] = {}
        self.normalize = Normalize(mean, std, pca_lighting)
        self.gpu = GPUAugment(
            augment=train_augment,
            image_size=image_size,
            eval_size=eval_size,
            eval_resize=eval_resize,
            eval_crops=eval_crops,
            eval_scales=eval_scales,
            scale_range=scale_range,
            color_jitter=color_jitter,
        )

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
                tars = [entry.name for entry in os.scandir(train) if entry.name.endswith(".tar")]
                hint = (
                    f" It holds {len(tars)} .tar files: ImageNet's training archive holds one tar per class; extract "
                    f"each into a folder of its name (mkdir n01440764 && tar xf n01440764.tar -C n01440764)."
                    if tars
                    else ""
                )
                raise ValueError(
                    f"{train} has no class folders.{hint} {LAYOUT_HELP.format(train=self.hparams.train_dir)}"
                )
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
            )
        return eval_transform(
            image_size=hp.eval_size or hp.image_size,
            resize_size=hp.eval_resize,
            crops=hp.eval_crops,
            scales=hp.eval_scales,
        )

    def transfer_batch_to_device(self, batch, device: torch.device, dataloader_idx: int):
        if isinstance(batch, dict) and is_packed(batch.get("image")):  # JPEG bytes stay on the host
            images = batch.pop("image")
            batch = super().transfer_batch_to_device(batch, device, dataloader_idx)
            batch["image"] = images
            return batch
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """uint8 batches become normalized floats where they land (the GPU when there is one).

        With ``decode_device: cuda`` the batch's JPEG bytes are decoded and augmented there first.
        """
        if not isinstance(batch, dict) or "image" not in batch:
            return batch
        training = self.trainer is not None and self.trainer.training
        if is_packed(batch["image"]):  # JPEG bytes not yet decoded (no prefetcher)
            batch = self._prepare_on_gpu(batch, batch["label"].device, train=training)
            if "image" not in batch:  # nothing in it was readable (data.skip_corrupt)
                return batch
        batch["image"] = self.normalize(batch["image"], train=training)
        return batch

    def _directory(self, split: str) -> str:
        hp = self.hparams
        return {"train": hp.train_dir, "val": hp.val_dir, "test": hp.test_dir or hp.val_dir}[split]

    def _check_split(self, split: str) -> None:
        self._split_dir(self._directory(split))

    def _split(self, split: str) -> ImageFolderDataset:
        """One split's samples, after the cheap checks (``datamodules.check``) that need no decoding.

        Class folders without images (training split) and empty files are errors that stop the run here,
        before training, with a report naming them -- or, with ``drop_invalid``, are dropped and counted.
        """
        from .check import DataValidationError, Report

        path = self._split_dir(self._directory(split))
        train = split == "train"
        drop = self.hparams.drop_invalid
        if drop:  # evaluation folders of dropped classes are ignored, not errors
            samples = []
            for i, name in enumerate(self.classes):
                if (path / name).is_dir():
                    samples.extend((str(p), i) for p in list_images(path / name))
        else:
            samples = list_samples(path, self.classes)
        report = Report(str(path))
        report.checked["images"] = len(samples)
        for file, _ in samples:
            if os.stat(file).st_size == 0:
                report.error(file, "the file is empty (0 bytes)")
        counts = Counter(label for _, label in samples)
        empty = [c for i, c in enumerate(self.classes) if not counts[i]] if train else []
        for name in empty:
            report.error(str(path / name), no_images_problem(path / name))
        if report.errors and not drop:
            raise DataValidationError(
                f"{path} has errors that would break training:\n{report.text()}\nRemove or replace these "
                f"files and folders, or set data.drop_invalid: true to leave them out."
            )
        if report.errors:
            bad = {p.where for p in report.errors}
            samples = [(f, label) for f, label in samples if f not in bad]
            if empty:  # a class without training images leaves the label set
                keep = [c for c in self.classes if c not in empty]
                remap = {self.classes.index(c): k for k, c in enumerate(keep)}
                samples = [(f, remap[label]) for f, label in samples if label in remap]
                self._classes = keep
            log.warning("%s: left out (data.drop_invalid):\n%s", path, report.text(limit=20))
        if not samples:
            loose = [entry.name for entry in os.scandir(path) if entry.is_file() and is_image_file(entry.name)]
            if loose:
                raise ValueError(
                    f"{path} holds {len(loose)} images but not in class folders: an ImageFolder split is "
                    f"<split>/<class>/<images>. ImageNet's validation archive (ILSVRC2012_img_val.tar) extracts "
                    f"flat; move each image into its class folder with the devkit's labels (e.g. the widely used "
                    f"valprep.sh) first."
                )
            raise ValueError(f"{path} holds no image files ({', '.join(('.JPEG', '.jpg', '.png'))}...).")
        raw = self._raw()
        return ImageFolderDataset(
            samples,
            self._transform(train),
            skip_corrupt=self.hparams.skip_corrupt,
            raw=raw,
            draw=self.gpu.sample if raw and train else None,
            cpu_share=self.hparams.cpu_share if raw and train else 0.0,
        )

    def _raw(self) -> bool:
        """Whether loaders ship JPEG bytes for GPU decoding (never for prediction, which keeps paths only)."""
        if self.hparams.decode_device != "cuda":
            return False
        if not torch.cuda.is_available():
            raise ValueError(
                "data.decode_device=cuda but this process sees no CUDA device; "
                "use --data.decode_device cpu (or run on a GPU machine)"
            )
        return True

    def _predict_dataset(self, paths: list[Path]) -> ImageFolderDataset:
        """Prediction decodes on the CPU (``label`` -1), whatever ``decode_device`` says."""
        return ImageFolderDataset(
            [(str(p), -1) for p in paths], self._transform(False), skip_corrupt=self.hparams.skip_corrupt
        )

    def _loader(self, split: str, train: bool) -> DataLoader:
        hp = self.hparams
        raw = getattr(self.datasets[split], "raw", False)
        return make_loader(
            self.datasets[split],
            batch_size=self.batch_size if train else self.eval_batch_size,
            num_workers=hp.num_workers,
            train=train,
            pin_memory=hp.pin_memory and not raw,
            persistent_workers=hp.persistent_workers,
            collate_fn=collate_raw if raw else collate_skipping,
            trainer=self.trainer,
        )

    def train_dataloader(self) -> DataLoader:
        loader = super().train_dataloader()
        if self.hparams.decode_device == "cuda" and self.hparams.gpu_prefetch:
            device = torch.device("cuda", torch.cuda.current_device())
            return CUDAPrefetcher(loader, lambda batch: self._prepare_on_gpu(batch, device, train=True), device)
        return loader

    def _prepare_on_gpu(self, batch: dict, device: torch.device, train: bool) -> dict:
        """Copy a host batch of JPEG bytes to ``device``, decode and crop it there (uint8 out)."""
        if "image" not in batch:  # every sample was unreadable and skipped
            return batch
        images = unpack_encoded(batch.pop("image"))
        jitter = batch.pop("jitter", None)  # read on the host, image by image
        done = batch.pop("done", None)  # finished by the worker (cpu_share)
        out = {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        decoded = decode_batch(images, device, batch.get("path"), skip=self.hparams.skip_corrupt)
        keep = [i for i, image in enumerate(decoded) if image is not None]
        if len(keep) < len(decoded):  # files only the decoder found unreadable (data.skip_corrupt)
            skipped = int(out.get("skipped", 0)) + len(decoded) - len(keep)
            if not keep:
                return {"skipped": skipped}
            out = select_samples(out, keep, len(decoded))
            out["skipped"] = skipped
            decoded = [decoded[i] for i in keep]
            jitter = jitter[keep] if jitter is not None else None
            done = done[keep] if done is not None else None
        if train:
            out["image"] = self._train_crops(decoded, out.pop("box"), out.pop("flip"), jitter, done)
        else:
            out["image"] = self.gpu.eval(decoded)
        return out

    def _train_crops(
        self,
        decoded: list[torch.Tensor],
        boxes: torch.Tensor,
        flips: torch.Tensor,
        jitter: torch.Tensor | None,
        done: torch.Tensor | None,
    ) -> torch.Tensor:
        """The GPU's crops of the samples the workers left to it, and the workers' crops of the rest."""
        if done is None or not bool(done.any()):
            return self.gpu.train(decoded, boxes, flips, jitter)
        finished, pending = done.nonzero().flatten(), (~done).nonzero().flatten()
        first = decoded[int(finished[0])]
        images = first.new_empty((len(decoded), *first.shape))
        images[finished.to(first.device)] = torch.stack([decoded[i] for i in finished.tolist()])
        if len(pending):
            rows = pending.to(boxes.device)
            images[rows] = self.gpu.train(
                [decoded[i] for i in pending.tolist()],
                boxes[rows],
                flips[rows],
                None if jitter is None else jitter[pending],
            )
        return images
