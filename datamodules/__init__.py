"""LightningDataModules that read the datasets' own on-disk formats (ImageFolder/ImageNet, CIFAR, COCO).

Floors, from the ground up (each module imports only from the floors below it):

1. formats and images -- ``images`` (decoding files), ``folders`` (the ImageFolder layout),
   ``coco_format`` (COCO's JSON), ``voc_format`` (PASCAL VOC's and ILSVRC's XML), ``records`` (flat
   per-image detection records), ``transforms``, ``samplers``, ``statistics`` (the per-pixel mean),
   ``image_checks`` (reading every image file for the checks: a thread pool, progress);
2. validation -- ``validation`` (reports of what would break a run, the rules every format shares, COCO's and
   ImageFolder's checks), ``xml_validation`` (the VOC/ILSVRC XML splits');
3. dataset files and masks -- ``coco_files`` (a COCO dataset's splits and categories), ``masks``
   (semantic masks from instances, and their cache);
4. datasets and datamodules -- ``loading`` (loaders, samplers, the stage logic), ``gpu_decode``,
   ``imagefolder``, ``cifar``, ``detection`` (what every detection format shares), ``coco_detection``,
   ``coco_instances`` (COCO's instances with their masks), ``voc_detection`` (PASCAL VOC, ILSVRC DET),
   ``coco_segmentation``, ``localization`` (ILSVRC CLS-LOC), ``shapes``, ``shapes_xml`` (the embedded data
   in every format);
5. the command -- ``check`` (``python -m datamodules.check``).
"""

import importlib

#: where each datamodule lives: imported when first asked for (``python -m datamodules.check`` says it has
#: started before PyTorch and Lightning are loaded)
_HOMES = {
    "CIFARDataModule": "cifar",
    "COCODetectionDataModule": "coco_detection",
    "COCOInstanceDataModule": "coco_instances",
    "COCOSegmentationDataModule": "coco_segmentation",
    "ILSVRCDetectionDataModule": "voc_detection",
    "ILSVRCLocalizationDataModule": "localization",
    "ImageFolderDataModule": "imagefolder",
    "ShapesClassificationDataModule": "shapes",
    "ShapesDetectionDataModule": "shapes",
    "ShapesInstanceDataModule": "shapes",
    "ShapesLocalizationDataModule": "shapes_xml",
    "ShapesSegmentationDataModule": "shapes",
    "ShapesVOCDataModule": "shapes_xml",
    "VOCDetectionDataModule": "voc_detection",
}


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'datamodules' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)


def load_all() -> list[type]:
    """Every datamodule class, imported: what a command that names them by their short names
    (``--data COCODetectionDataModule``) calls first, so that ``LightningCLI`` finds them."""
    return [getattr(importlib.import_module(f".{home}", __name__), name) for name, home in _HOMES.items()]


def resolve(class_path: str, trusted_modules: tuple[str, ...] | list[str] = (), what: str = "the datamodule") -> type:
    """The datamodule class a file names (a checkpoint's ``_class_path``), without importing anything else:
    one of this package's classes (``datamodules.COCODetectionDataModule``, or its full module path), or a
    ``LightningDataModule`` in one of the modules ``trusted_modules`` names (yours). Anything else is refused
    before it is imported, naming the class path."""
    module, _, name = class_path.rpartition(".")
    if name in _HOMES and module in ("datamodules", f"datamodules.{_HOMES[name]}"):
        return getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
    if module and module in trusted_modules:
        import lightning.pytorch as pl

        cls = getattr(importlib.import_module(module), name, None)
        if isinstance(cls, type) and issubclass(cls, pl.LightningDataModule):
            return cls
        raise ValueError(f"{what}: {class_path} is not a LightningDataModule")
    raise ValueError(
        f"{what} is {class_path}, which is not one of this project's datamodules: it is not imported (a file must "
        f"not decide what code runs). If it is yours, name its module: trusted_modules=[{module!r}]"
    )


def __dir__() -> list[str]:
    return sorted([*globals(), *_HOMES])


__all__ = [*sorted(_HOMES), "load_all", "resolve"]
