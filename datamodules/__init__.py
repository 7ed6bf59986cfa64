"""LightningDataModules that read the datasets' own on-disk formats (ImageFolder/ImageNet, CIFAR, COCO).

Floors, from the ground up (each module imports only from the floors below it):

1. formats and images -- ``images`` (decoding files), ``folders`` (the ImageFolder layout),
   ``coco_format`` (COCO's JSON), ``transforms``, ``samplers``;
2. validation -- ``validation`` (reports of what would break a run, one function per format);
3. dataset files and masks -- ``coco_files`` (a COCO dataset's splits and categories), ``masks``
   (semantic masks from instances, and their cache);
4. datasets and datamodules -- ``loading`` (loaders, samplers, the stage logic), ``gpu_decode``,
   ``imagefolder``, ``cifar``, ``coco_detection``, ``coco_segmentation``, ``shapes``;
5. the command -- ``check`` (``python -m datamodules.check``).
"""

from .cifar import CIFARDataModule
from .coco_detection import COCODetectionDataModule
from .coco_segmentation import COCOSegmentationDataModule
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
