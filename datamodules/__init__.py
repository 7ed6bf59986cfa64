"""LightningDataModules that read the datasets' own on-disk formats (ImageFolder/ImageNet, CIFAR, COCO).

Floors, from the ground up (each module imports only from the floors below it):

1. formats and images -- ``images`` (decoding files), ``folders`` (the ImageFolder layout),
   ``coco_format`` (COCO's JSON), ``voc_format`` (PASCAL VOC's and ILSVRC's XML), ``records`` (flat
   per-image detection records), ``transforms``, ``samplers``, ``statistics`` (the per-pixel mean);
2. validation -- ``validation`` (reports of what would break a run, one function per format);
3. dataset files and masks -- ``coco_files`` (a COCO dataset's splits and categories), ``masks``
   (semantic masks from instances, and their cache);
4. datasets and datamodules -- ``loading`` (loaders, samplers, the stage logic), ``gpu_decode``,
   ``imagefolder``, ``cifar``, ``detection`` (what every detection format shares), ``coco_detection``,
   ``voc_detection`` (PASCAL VOC, ILSVRC DET), ``coco_segmentation``, ``localization`` (ILSVRC CLS-LOC),
   ``shapes``, ``shapes_xml`` (the embedded data in every format);
5. the command -- ``check`` (``python -m datamodules.check``).
"""

from .cifar import CIFARDataModule
from .coco_detection import COCODetectionDataModule
from .coco_segmentation import COCOSegmentationDataModule
from .imagefolder import ImageFolderDataModule
from .localization import ILSVRCLocalizationDataModule
from .shapes import ShapesClassificationDataModule, ShapesDetectionDataModule, ShapesSegmentationDataModule
from .shapes_xml import ShapesLocalizationDataModule, ShapesVOCDataModule
from .voc_detection import ILSVRCDetectionDataModule, VOCDetectionDataModule

__all__ = [
    "CIFARDataModule",
    "COCODetectionDataModule",
    "COCOSegmentationDataModule",
    "ILSVRCDetectionDataModule",
    "ILSVRCLocalizationDataModule",
    "ImageFolderDataModule",
    "ShapesClassificationDataModule",
    "ShapesDetectionDataModule",
    "ShapesLocalizationDataModule",
    "ShapesSegmentationDataModule",
    "ShapesVOCDataModule",
    "VOCDetectionDataModule",
]
