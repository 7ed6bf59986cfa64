"""ImageNet and any ImageFolder tree: ``<root>/train/<class>/*.JPEG``, ``<root>/val/<class>/*.JPEG``.

The layout is read by ``datamodules.folders`` and checked by ``datamodules.validation`` (the same
function ``python -m datamodules.check`` runs); images are decoded to uint8 tensors by
``datamodules.images.read_image`` and transformed by ``transforms.v2`` (``datamodules.transforms``), or,
with ``decode_device: cuda``, decoded and augmented on the GPU (``datamodules.gpu_decode``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from .folder_dataset import ImageFolderDataset
from .folders import LAYOUT_HELP, class_archives, find_classes, list_samples, loose_images, synset_names
from .gpu_decode import GPUAugment, GPUDecoding, collate_raw, is_packed
from .image_checks import report_progress
from .images import IMAGE_EXTENSIONS
from .loading import SplitLoaders, collate_skipping
from .prefetch import CUDAPrefetcher
from .statistics import cached_pixel_mean
from .transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    PAPER_SCALES,
    AutoAugment,
    EvalCrops,
    Normalize,
    TrainAugment,
    default_eval_resize,
    eval_transform,
    policy_transforms,
    resolve_augment,
    train_transform,
)
from .validation import Report, stop_on_errors, validate_imagefolder, without_reported

log = logging.getLogger(__name__)


class ImageFolderDataModule(SplitLoaders, pl.LightningDataModule):
    """ImageNet (or any ImageFolder tree) for ``tasks.classify``.

    Args:
        root: dataset folder holding ``train_dir`` and ``val_dir``; may be ``None`` for ``predict`` with a
            checkpoint, whose class names are stored in it.
        train_dir: training split folder under ``root``.
        val_dir: validation split folder under ``root``.
        test_dir: test split folder under ``root`` (defaults to ``val_dir``).
        predict_root: a folder of images (searched recursively) for ``predict``.
        batch_size: images per batch and process (32, torchvision reference's per-GPU batch: on 8 GPUs,
            ImageNet's 256).
        eval_batch_size: images per evaluation batch (defaults to ``batch_size``).
        num_workers: loader processes per training process.
        image_size: training and evaluation crop size.
        eval_size: evaluation crop size when it differs from ``image_size`` (Identity Mappings Table 5
            tests at 320x320).
        eval_resize: shorter side before the evaluation crop; ``None``: the crop / 0.875 (256 for 224, 37
            for 32), or the crop itself when training sees whole images (``pad_crop``, ``none``).
        eval_crops: for validation, test and prediction: ``center`` (one crop), ``ten`` (the ResNet
            paper's 10-crop testing, Sec. 3.4) or ``multiscale`` (its fully-convolutional testing: the
            whole image at each of ``eval_scales``); the task averages the views' softmax scores.
        eval_scales: shorter sides of ``multiscale`` testing (the paper's 224, 256, 384, 480, 640).
        train_augment: ``random_resized_crop`` (modern; areas from ``crop_scale``), ``scale`` (ResNet Sec.
            3.4), ``pad_crop`` (the CIFAR recipe: pad an eighth, random crop; Sec. 4.2), ``none``
            (resize and center crop), or ``auto`` (the default): ``pad_crop`` below 64 px, else
            ``random_resized_crop``.
        crop_scale: ``random_resized_crop``'s range of crop areas; ``None``: (0.08, 1) from 128 px up
            (Inception, torchvision), (0.25, 1) below.
        flip: random horizontal flips in training; ``None``: with ``random_resized_crop`` and ``scale``,
            not with ``pad_crop`` (small images are often digits or signs, which a mirror changes) or ``none``.
        scale_range: shorter-side range of the ``scale`` augmentation.
        color_jitter: brightness/contrast/saturation jitter strength (0 disables).
        pca_lighting: AlexNet PCA lighting std (0.1 in the ResNet recipe; 0 disables).
        auto_augment: an augmentation policy after the crop and flip: ``trivial_wide``, ``rand``,
            ``auto_imagenet`` or ``none`` (``datamodules.transforms.policy_transforms``).
        random_erase: probability of erasing a random rectangle of a training image (0 disables; 0.1 in
            torchvision's 80.9 % ResNet-50 recipe). With ``decode_device: cuda``, a policy or erasing makes
            the loader workers finish every training image (``cpu_share`` 1), as the GPU path has neither.
        repeated_augment: copies of each image an epoch draws, each augmented anew and spread over the
            processes; the epoch keeps its length, so it draws 1/N of the images (Hoffer et al. 2020;
            torchvision's ``--ra-sampler``, 4 in its recipe; ``datamodules.samplers``); 1 disables.
        mean: per-channel mean for normalization.
        std: per-channel std for normalization.
        normalize: ``channel`` subtracts ``mean`` and divides by ``std``; ``pixel_mean`` subtracts the
            training set's per-pixel mean image (the ResNet paper's, Sec. 3.4; computed once at the crop
            size from up to ``pixel_mean_images`` training images and cached, ``datamodules.statistics``)
            and divides by nothing, as the paper does.
        pixel_mean_images: training images the per-pixel mean is estimated from (all, when fewer).
        skip_corrupt: skip unreadable images (each logged, counted in ``data/skipped``) instead of failing.
        drop_invalid: leave out empty files and class folders without training images (counts logged)
            instead of stopping before training with a report (``datamodules.check``).
        decode_device: ``cuda`` decodes and augments on the GPU (``datamodules.gpu_decode``): workers
            only read files and draw each crop from the file's header (the same draws as the CPU path,
            so resuming stays exact), so a few cores feed thousands of images per second.
        gpu_prefetch: with ``decode_device: cuda``, prepare the next training batches on a side stream
            while the current one trains (``datamodules.prefetch.CUDAPrefetcher``).
        cpu_share: with ``decode_device: cuda``, the fraction of training images the loader workers
            decode and augment themselves (the same draws as on the GPU), taking that share of the
            decoding off the GPU; 0 sends every JPEG to the GPU.
        pin_memory: pin host memory when CUDA is used.
        persistent_workers: keep loader processes between epochs.
    """

    #: what ``data.root`` must hold (named by command-line errors)
    layout = LAYOUT_HELP.format(train="train")

    def __init__(
        self,
        root: str | None = None,
        train_dir: str = "train",
        val_dir: str = "val",
        test_dir: str | None = None,
        predict_root: str | None = None,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 8,
        image_size: int = 224,
        eval_size: int | None = None,
        eval_resize: int | None = None,
        eval_crops: EvalCrops = "center",
        eval_scales: tuple[int, ...] = PAPER_SCALES,
        train_augment: TrainAugment = "auto",
        crop_scale: tuple[float, float] | None = None,
        flip: bool | None = None,
        scale_range: tuple[int, int] = (256, 480),
        color_jitter: float = 0.0,
        pca_lighting: float = 0.0,
        auto_augment: AutoAugment = "none",
        random_erase: float = 0.0,
        repeated_augment: int = 1,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
        normalize: Literal["channel", "pixel_mean"] = "channel",
        pixel_mean_images: int = 10000,
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
        if not 0.0 <= random_erase <= 1.0:
            raise ValueError(f"data.random_erase={random_erase} must be a probability between 0 and 1")
        if repeated_augment < 1:
            raise ValueError(f"data.repeated_augment={repeated_augment} must be 1 (off) or more draws per image")
        policy_transforms(auto_augment)  # an unknown policy fails here, naming the choices
        if decode_device == "cuda" and (auto_augment != "none" or random_erase > 0) and cpu_share < 1.0:
            log.warning(
                "data.auto_augment=%s / data.random_erase=%s run in the loader workers: with data.decode_device=cuda "
                "every training image is finished there (cpu_share 1; was %s); validation still decodes on the GPU",
                auto_augment, random_erase, cpu_share,
            )  # fmt: skip
            cpu_share = 1.0
        self.cpu_share = cpu_share
        crop = eval_size or image_size
        augment = resolve_augment(train_augment, image_size)
        if decode_device == "cuda" and augment == "pad_crop":
            raise ValueError(
                f"data.train_augment=pad_crop ({'the default below 64 px' if train_augment == 'auto' else 'as set'}) "
                f"runs on the CPU path: set data.decode_device cpu (small images decode fast on the CPU), or "
                f"data.train_augment random_resized_crop"
            )
        eval_resize = eval_resize if eval_resize is not None else default_eval_resize(crop, augment)
        if eval_crops != "multiscale" and crop > eval_resize:
            raise ValueError(
                f"data.{'eval_size' if eval_size else 'image_size'}={crop} is larger than data.eval_resize="
                f"{eval_resize}: the evaluation crop would be padded with black borders. Set data.eval_resize to "
                f"at least {crop} (Identity Mappings tests 320x320 crops of images resized to 320)."
            )
        self.save_hyperparameters()
        self.hparams.update(eval_resize=eval_resize)  # resolved, as the pipelines use it
        self.root = Path(root).expanduser() if root else None
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self._classes: list[str] | None = None
        self.datasets: dict[str, ImageFolderDataset] = {}
        self.normalize = Normalize(mean, std, pca_lighting)
        self._pixel_mean: torch.Tensor | None = None
        self.gpu = GPUAugment(
            augment=train_augment,
            image_size=image_size,
            eval_size=eval_size,
            eval_resize=eval_resize,
            eval_crops=eval_crops,
            eval_scales=eval_scales,
            scale_range=scale_range,
            color_jitter=color_jitter,
            crop_scale=crop_scale,
            flip=flip,
        )
        self.decoding = GPUDecoding(self.gpu, skip_corrupt)

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
                tars = class_archives(train)
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
    def image_size(self) -> int:
        return self.hparams.image_size

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
                crop_scale=hp.crop_scale,
                flip=hp.flip,
                auto_augment=hp.auto_augment,
                random_erase=hp.random_erase,
                erase_value=hp.mean,
            )
        return eval_transform(
            image_size=hp.eval_size or hp.image_size,
            resize_size=hp.eval_resize,
            crops=hp.eval_crops,
            scales=hp.eval_scales,
        )

    def transfer_batch_to_device(self, batch, device: torch.device, dataloader_idx: int):
        move = super().transfer_batch_to_device
        return self.decoding.transfer(batch, device, lambda b, d: move(b, d, dataloader_idx))

    # -- the per-pixel mean (data.normalize: pixel_mean) ------------------------------------------
    def prepare_data(self) -> None:
        super().prepare_data()
        self._use_pixel_mean()  # once per node, before the ranks set up: they read the cache

    def setup(self, stage: str) -> None:
        super().setup(stage)
        self._use_pixel_mean()

    def _use_pixel_mean(self) -> None:
        hp = self.hparams
        if hp.normalize != "pixel_mean" or self.root is None:
            return
        if self._pixel_mean is None:
            paths = [path for path, _ in list_samples(self.split_path("train"), self.classes)]
            self._pixel_mean = cached_pixel_mean(paths, hp.image_size, hp.pixel_mean_images)
        self.normalize = Normalize(self._pixel_mean, (1.0, 1.0, 1.0), hp.pca_lighting)

    def state_dict(self) -> dict:
        """The per-pixel mean goes into checkpoints, so ``predict`` from one needs no training images."""
        return {"pixel_mean": self._pixel_mean} if self._pixel_mean is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if state.get("pixel_mean") is not None and self.hparams.normalize == "pixel_mean":
            self._pixel_mean = state["pixel_mean"]
            self.normalize = Normalize(self._pixel_mean, (1.0, 1.0, 1.0), self.hparams.pca_lighting)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """uint8 batches become normalized floats where they land (the GPU when there is one).

        With ``decode_device: cuda`` the batch's JPEG bytes are decoded and augmented there first.
        """
        if not isinstance(batch, dict) or "image" not in batch:
            return batch
        training = self.trainer is not None and self.trainer.training
        if is_packed(batch["image"]):  # JPEG bytes not yet decoded (no prefetcher)
            batch = self.decoding.prepare(batch, batch["label"].device, train=training)
            if "image" not in batch:  # nothing in it was readable (data.skip_corrupt)
                return batch
        batch["image"] = self.normalize(batch["image"], train=training)
        return batch

    def _directory(self, split: str) -> str:
        hp = self.hparams
        return {"train": hp.train_dir, "val": hp.val_dir, "test": hp.test_dir or hp.val_dir}[split]

    def _check_split(self, split: str) -> None:
        self.split_path(split)

    def check(self, decode: bool = True, fix: bool = False) -> Iterator[Report]:
        """The data check's reports (``python -m datamodules.check``): the training classes' folders, then the
        validation split's (when it is another folder), every file, each report as it is done."""
        report_progress("listing the training classes")
        classes = self.classes  # the training split's class folders (an error names a missing one)
        for split in ("train", "val"):
            path = self.split_path(split)
            if split == "train" or path != self.split_path("train"):
                yield validate_imagefolder(path, classes, train=split == "train", decode=decode)[0]

    def split_path(self, split: str) -> Path:
        """The folder of ``train``, ``val`` or ``test``; an error naming it and the layout when it is missing."""
        return self._split_dir(self._directory(split))

    def _split(self, split: str) -> ImageFolderDataset:
        """One split's samples, after the cheap checks of ``validate_imagefolder`` (no decoding).

        Class folders without images (training split) are errors that stop the run here, before training,
        with a report naming them -- or, with ``drop_invalid``, are left out and counted. Files are not
        opened (nor stat'ed) here: an empty or corrupt one is named when it is read, or skipped with
        ``skip_corrupt``; ``python -m datamodules.check`` finds them all beforehand.
        """
        path = self.split_path(split)
        train, drop = split == "train", self.hparams.drop_invalid
        report, samples = validate_imagefolder(path, self.classes, train=train, strict=not drop, sizes=False)
        stop_on_errors(report, drop, str(path), fix="Remove or replace these files and folders")
        if report.errors:
            samples, self._classes = without_reported(samples, report, self.classes, train)
            log.warning("%s: left out (data.drop_invalid):\n%s", path, report.text(limit=20))
        elif report.warnings:
            log.info("%s: %d warnings:\n%s", path, len(report.warnings), report.text(limit=10))
        ignored = [p for p in report.warnings if "not in a readable image format" in p.message]
        if ignored:  # said once, at setup: BMP or TIFF files are valid images the decoder does not read
            count = sum(int(p.message.split()[0]) for p in ignored)
            log.warning(
                "%s: %d files in %d class folders are in formats the decoder does not read (it reads %s) and are "
                "left out; convert them (e.g. to PNG) to train on them (python -m datamodules.check lists them)",
                path, count, len(ignored), ", ".join(IMAGE_EXTENSIONS),
            )  # fmt: skip
        if not samples:
            loose = loose_images(path)
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
            cpu_share=self.cpu_share if raw and train else 0.0,
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
        raw = getattr(self.datasets[split], "raw", False)
        return self.split_loader(
            split, train, collate_fn=collate_raw if raw else collate_skipping, repeats=self.hparams.repeated_augment,
            pin_memory=self.hparams.pin_memory and not raw,
        )  # fmt: skip

    def train_dataloader(self) -> DataLoader:
        loader = super().train_dataloader()
        if self.hparams.decode_device == "cuda" and self.hparams.gpu_prefetch:
            device = torch.device("cuda", torch.cuda.current_device())
            return CUDAPrefetcher(loader, lambda batch: self.decoding.prepare(batch, device, train=True), device)
        return loader
