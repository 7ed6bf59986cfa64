"""Classification pipelines: geometry on uint8 tensors in the loader, normalization on the device.

* ``random_resized_crop`` -- the modern recipe (Inception-style scale + aspect-ratio augmentation; the
  ResNeXt paper, Sec. 4, and torchvision's references), areas from 8% of the image at 128 px and up,
  from 25% below (a crop of 8% of a small image keeps too little of the object);
* ``pad_crop`` -- the CIFAR recipe (ResNet Sec. 4.2): the whole image at the crop size, zero-padded by an
  eighth of it on each side, a random crop of the original size; ``auto`` (the default) picks it below
  64 px and ``random_resized_crop`` otherwise;
* horizontal flips with the crops, except after ``pad_crop`` unless asked for (``flip``): small images
  are as often digits, signs or glyphs, which a mirror makes another class (SVHN, GTSRB and MNIST train
  without flips; on handwritten digits flipping cost 3-4 points of top-1 here), as natural images;
* ``scale`` -- the ResNet paper's (Sec. 3.4): shorter side resized to a random ``s`` in [256, 480], a
  random 224 crop of the image or its flip, optional AlexNet-style color augmentation (PCA lighting);
* evaluation: shorter side 256, center crop 224 (ResNeXt Sec. 5.1's single-crop protocol: the crop is
  0.875 of the resized side, whatever the size; after ``pad_crop`` or ``none`` training, the whole image
  at the crop size, as CIFAR is evaluated), or the
  ResNet paper's 10-crop testing (Sec. 3.4, after AlexNet: the four corners and the center, and their
  mirror images), or its fully-convolutional multi-scale testing ("for best results", Sec. 3.4: the
  whole image with its shorter side at 224, 256, 384, 480 and 640); the task scores several views by
  averaging their softmax outputs.

Loader workers decode, crop, resize and flip uint8 images with ``transforms.v2`` (torchvision's fast
uint8 path) and hand over uint8 batches -- a quarter of the bytes of float batches to collate, pin and
copy. :class:`Normalize` then turns a batch into normalized floats (plus PCA lighting when training)
where it lands, on the GPU when there is one, as DALI and FFCV do.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TrainAugment = Literal["auto", "random_resized_crop", "scale", "pad_crop", "none"]
AutoAugment = Literal["none", "trivial_wide", "rand", "auto_imagenet"]
EvalCrops = Literal["center", "ten", "multiscale"]
#: the ResNet paper's test scales (Sec. 3.4): shorter sides of the whole image
PAPER_SCALES = (224, 256, 384, 480, 640)

# ImageNet RGB covariance eigen-decomposition used by AlexNet's and fb.resnet.torch's lighting noise.
_PCA_EIGVAL = torch.tensor([0.2175, 0.0188, 0.0045])
_PCA_EIGVEC = torch.tensor([[-0.5675, 0.7192, 0.4009], [-0.5808, -0.0045, -0.8140], [-0.5836, -0.6948, 0.4203]])


def resolve_augment(augment: TrainAugment, image_size: int) -> str:
    """``auto``: the CIFAR recipe's ``pad_crop`` below 64 px, ``random_resized_crop`` from 64 px up."""
    if augment == "auto":
        return "pad_crop" if image_size < 64 else "random_resized_crop"
    if augment not in ("random_resized_crop", "scale", "pad_crop", "none"):
        raise ValueError(
            f"train_augment={augment!r} is not one of 'auto', 'random_resized_crop', 'scale', 'pad_crop', 'none'"
        )
    return augment


def default_crop_scale(image_size: int) -> tuple[float, float]:
    """Random-resized-crop's area range: Inception's (0.08, 1) from 128 px up, (0.25, 1) for smaller crops."""
    return (0.08, 1.0) if image_size >= 128 else (0.25, 1.0)


def default_eval_resize(image_size: int, augment: str) -> int:
    """The shorter side before the evaluation crop: the crop / 0.875 (256 for 224, 37 for 32), or the crop
    itself after ``pad_crop``/``none`` training, which sees whole images (the evaluation then does too)."""
    if augment in ("pad_crop", "none"):
        return image_size
    return round(image_size / 0.875)


def policy_transforms(policy: AutoAugment) -> list:
    """An automatic augmentation policy as torchvision's classification reference builds it
    (``references/classification/presets.py``: bilinear interpolation, RandAugment's magnitude 9):
    ``trivial_wide`` (TrivialAugment, Muller & Hutter 2021; torchvision's 80.9 % ResNet-50 recipe),
    ``rand`` (RandAugment, Cubuk et al. 2020) or ``auto_imagenet`` (AutoAugment's ImageNet policy)."""
    bilinear = v2.InterpolationMode.BILINEAR
    if policy == "none":
        return []
    if policy == "trivial_wide":
        return [v2.TrivialAugmentWide(interpolation=bilinear)]
    if policy == "rand":
        return [v2.RandAugment(interpolation=bilinear, magnitude=9)]
    if policy == "auto_imagenet":
        return [v2.AutoAugment(v2.AutoAugmentPolicy.IMAGENET, interpolation=bilinear)]
    raise ValueError(f"auto_augment={policy!r} is not one of 'none', 'trivial_wide', 'rand', 'auto_imagenet'")


def train_transform(
    *,
    augment: TrainAugment = "auto",
    image_size: int = 224,
    scale_range: Sequence[int] = (256, 480),
    color_jitter: float = 0.0,
    crop_scale: Sequence[float] | None = None,
    flip: bool | None = None,
    auto_augment: AutoAugment = "none",
    random_erase: float = 0.0,
    erase_value: Sequence[float] = IMAGENET_MEAN,
) -> v2.Compose:
    """Training geometry, color jitter, an augmentation policy and random erasing for uint8 ``3 x H x W``
    images; the output stays uint8.

    ``flip``: random horizontal flips; ``None`` flips with ``random_resized_crop`` and ``scale``, not with
    ``pad_crop`` (see the module docstring) nor ``none``. ``auto_augment`` (:func:`policy_transforms`)
    follows the geometry, as in torchvision's reference; ``random_erase`` is the probability of erasing a
    random rectangle (Zhong et al. 2020, torchvision's ``RandomErasing``), last. torchvision erases the
    normalized image with zeros, i.e. the mean color: here, on uint8, the rectangle is filled with
    ``erase_value`` (the normalization mean, in [0, 1]) x 255, rounded.
    """
    augment = resolve_augment(augment, image_size)
    if flip is None:
        flip = augment in ("random_resized_crop", "scale")
    mirror = [v2.RandomHorizontalFlip()] if flip else []
    if augment == "random_resized_crop":
        scale = tuple(crop_scale) if crop_scale else default_crop_scale(image_size)
        geometry: list = [v2.RandomResizedCrop(image_size, scale=scale, antialias=True), *mirror]
    elif augment == "scale":
        low, high = scale_range
        geometry = [
            v2.RandomShortestSize(min_size=list(range(low, high + 1)), antialias=True),
            v2.RandomCrop(image_size),
            *mirror,
        ]
    elif augment == "pad_crop":
        geometry = [
            v2.Resize(image_size, antialias=True),
            v2.CenterCrop(image_size),
            v2.RandomCrop(image_size, padding=max(1, image_size // 8), fill=0),
            *mirror,
        ]
    else:  # "none"
        geometry = [v2.Resize(image_size, antialias=True), v2.CenterCrop(image_size), *mirror]
    color: list = []
    if color_jitter > 0:
        color.append(v2.ColorJitter(brightness=color_jitter, contrast=color_jitter, saturation=color_jitter))
    erase: list = []
    if random_erase > 0:
        erase.append(v2.RandomErasing(p=random_erase, value=[round(255 * m) for m in erase_value]))
    return v2.Compose([*geometry, *color, *policy_transforms(auto_augment), *erase])


def eval_transform(
    *, image_size: int = 224, resize_size: int = 256, crops: EvalCrops = "center", scales: Sequence[int] = PAPER_SCALES
):
    """uint8 in, uint8 out: shorter side to ``resize_size``, then a center crop of ``image_size``
    (``3 x S x S``) or the ten crops of ``transforms.v2.TenCrop`` stacked (``10 x 3 x S x S``); or, for
    ``multiscale``, a list of the whole image resized to each shorter side in ``scales``."""
    if crops == "center":
        return v2.Compose([v2.Resize(resize_size, antialias=True), v2.CenterCrop(image_size)])
    if crops == "ten":
        return v2.Compose([v2.Resize(resize_size, antialias=True), StackedTenCrop(image_size)])
    if crops == "multiscale":
        return MultiScale(scales)
    raise ValueError(f"eval_crops={crops!r} is not one of 'center', 'ten', 'multiscale'")


class MultiScale:
    """The whole image at several scales (shorter side ``s`` for each of ``scales``), as a list."""

    def __init__(self, scales: Sequence[int]) -> None:
        if not scales:
            raise ValueError("eval_scales must name at least one shorter-side size")
        self.resizes = [v2.Resize(int(s), antialias=True) for s in scales]

    def __call__(self, image: torch.Tensor) -> list[torch.Tensor]:
        return [resize(image) for resize in self.resizes]


class StackedTenCrop:
    """``transforms.v2.TenCrop`` with its ten crops stacked into one tensor (views first, then channels)."""

    def __init__(self, size: int) -> None:
        self.crop = v2.TenCrop(size)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return torch.stack(self.crop(image))


def check_std(std: Sequence[float]) -> None:
    """A normalization std must be positive: a zero divides every image by zero (inf or NaN inputs, which a
    run would only notice as a non-finite loss)."""
    values = [float(v) for v in std]
    if len(values) != 3 or not all(v > 0 for v in values):
        raise ValueError(f"data.std={values} must be three positive numbers (one per RGB channel), e.g. "
                         f"{list(IMAGENET_STD)}: a zero would divide every image by zero")  # fmt: skip


class Normalize:
    """uint8 batches to normalized float batches, with AlexNet's PCA lighting noise when training.

    ``mean`` is per channel (3 numbers) or per pixel (a ``3 x S x S`` mean image, the ResNet paper's
    "per-pixel mean", resized bilinearly to views of another size). Lighting (Krizhevsky et al. 2012,
    Sec. 4.1; ResNet Sec. 3.4's "standard color augmentation") adds ``eigvec @ (alpha * eigval)`` to every
    pixel of an image in [0, 1], ``alpha ~ N(0, pca_lighting)`` per image.
    """

    def __init__(
        self,
        mean: Sequence[float] | torch.Tensor = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        pca_lighting: float = 0.0,
    ) -> None:
        check_std(std)
        mean = torch.as_tensor(mean, dtype=torch.float32)
        self.mean = mean.view(1, 3, 1, 1) if mean.ndim == 1 else mean.view(1, *mean.shape[-3:])
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        self.pca_lighting = pca_lighting

    def _mean_for(self, x: torch.Tensor) -> torch.Tensor:
        mean = self.mean.to(x.device)
        if mean.shape[-1] > 1 and mean.shape[-2:] != x.shape[-2:]:
            mean = torch.nn.functional.interpolate(mean, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return mean

    def __call__(self, images, train: bool = False):
        if isinstance(images, list):  # per-image lists of views of different sizes (multi-scale testing)
            return [self(image, train) if isinstance(image, list) else self(image[None], train)[0] for image in images]
        if images.dtype != torch.uint8:
            return images  # already normalized
        x = images.float().div_(255)
        if train and self.pca_lighting > 0:
            alpha = torch.randn(len(x), 3, device=x.device) * self.pca_lighting
            rgb = (alpha * _PCA_EIGVAL.to(x.device)) @ _PCA_EIGVEC.to(x.device).T  # B x 3
            x = x + rgb.view(-1, 3, 1, 1)
        return x.sub_(self._mean_for(x)).div_(self.std.to(x.device))
