"""LightningDataModules that read the datasets' own on-disk formats (ImageFolder/ImageNet, CIFAR, COCO)."""

from .cifar import CIFARDataModule
from .coco import COCODetectionDataModule
from .imagefolder import ImageFolderDataModule

__all__ = ["CIFARDataModule", "COCODetectionDataModule", "ImageFolderDataModule"]
