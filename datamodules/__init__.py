"""LightningDataModules that read the datasets' own on-disk formats (ImageFolder/ImageNet, CIFAR, COCO)."""

from .cifar import CIFARDataModule
from .coco import COCODetectionDataModule, COCOSegmentationDataModule
from .imagefolder import ImageFolderDataModule
from .shapes import ShapesClassificationDataModule, ShapesDetectionDataModule, ShapesSegmentationDataModule

__all__ = [
    "CIFARDataModule",
    "COCODetectionDataModule",
    "COCOSegmentationDataModule",
    "ImageFolderDataModule",
    "ShapesClassificationDataModule",
    "ShapesDetectionDataModule",
    "ShapesSegmentationDataModule",
]
