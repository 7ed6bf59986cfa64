"""Classification pipelines on uint8 tensors with ``torchvision.transforms.v2``.

* ``random_resized_crop`` -- the modern recipe (Inception-style scale + aspect-ratio augmentation; the
  ResNeXt paper, Sec. 4, and torchvision's references);
* ``scale`` -- the ResNet paper's (Sec. 3.4): shorter side resized to a random ``s`` in [256, 480], a
  random 224 crop of the image or its flip, optional AlexNet-style color augmentation (PCA lighting);
* evaluation: shorter side 256, center crop 224 (ResNeXt Sec. 5.1's single-crop protocol).

Geometry runs on uint8 images (torchvision's fast path), then the image becomes float and is normalized.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TrainAugment = Literal["random_resized_crop", "scale", "none"]

# ImageNet RGB covariance eigen-decomposition used by AlexNet's and fb.resnet.torch's lighting noise.
_PCA_EIGVAL = torch.tensor([0.2175, 0.0188, 0.0045])
_PCA_EIGVEC = torch.tensor([[-0.5675, 0.7192, 0.4009], [-0.5808, -0.0045, -0.8140], [-0.5836, -0.6948, 0.4203]])


class PCALighting:
    """AlexNet's lighting noise (Krizhevsky et al. 2012, Sec. 4.1) on a float image in [0, 1].

    Adds ``eigvec @ (alpha * eigval)`` to every pixel, ``alpha ~ N(0, std)`` per image; ResNet Sec. 3.4
    uses it ("the standard color augmentation in [21]").
    """

    def __init__(self, std: float = 0.1) -> None:
        self.std = std

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        if self.std <= 0:
            return image
        alpha = torch.randn(3) * self.std
        rgb = _PCA_EIGVEC @ (alpha * _PCA_EIGVAL)
        return image + rgb.to(image.dtype).view(3, 1, 1)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(std={self.std})"


def train_transform(
    *,
    augment: TrainAugment = "random_resized_crop",
    image_size: int = 224,
    scale_range: Sequence[int] = (256, 480),
    color_jitter: float = 0.0,
    pca_lighting: float = 0.0,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> v2.Compose:
    """The training pipeline for uint8 ``3 x H x W`` images (see the module docstring)."""
    if augment == "random_resized_crop":
        geometry: list = [v2.RandomResizedCrop(image_size, antialias=True), v2.RandomHorizontalFlip()]
    elif augment == "scale":
        low, high = scale_range
        geometry = [
            v2.RandomShortestSize(min_size=list(range(low, high + 1)), antialias=True),
            v2.RandomCrop(image_size),
            v2.RandomHorizontalFlip(),
        ]
    elif augment == "none":
        geometry = [v2.Resize(image_size, antialias=True), v2.CenterCrop(image_size)]
    else:
        raise ValueError(f"train_augment={augment!r} is not one of 'random_resized_crop', 'scale', 'none'")
    color: list = []
    if color_jitter > 0:
        color.append(v2.ColorJitter(brightness=color_jitter, contrast=color_jitter, saturation=color_jitter))
    to_float: list = [v2.ToDtype(torch.float32, scale=True)]
    if pca_lighting > 0:
        to_float.append(PCALighting(pca_lighting))
    return v2.Compose([*geometry, *color, *to_float, v2.Normalize(mean=list(mean), std=list(std))])


def eval_transform(
    *,
    image_size: int = 224,
    resize_size: int = 256,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> v2.Compose:
    """Shorter side to ``resize_size``, center crop ``image_size``, normalize."""
    return v2.Compose(
        [
            v2.Resize(resize_size, antialias=True),
            v2.CenterCrop(image_size),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean=list(mean), std=list(std)),
        ]
    )
