"""Predictions in Python from a trained checkpoint, with the preprocessing its datamodule evaluated with.

    from tasks import load_predictor

    predict = load_predictor("runs/demo_detect/version_0/checkpoints/best.ckpt", device="cuda")
    found = predict("street.jpg")            # a dict for one image
    batch = predict([pil_image, uint8_chw, "other.png"])   # a list, in the order given

Each image may be a file path, a PIL image, a ``3 x H x W`` uint8 RGB tensor (or an ``N x 3 x H x W``
batch of them) or an ``H x W x 3`` uint8 numpy array. What comes back, per image:

- classify: ``classes`` (the ``top_k`` names, best first), ``indices`` and ``scores`` (probabilities);
- detect: ``boxes`` (``K x 4``, x1 y1 x2 y2 in the input image's pixels), ``labels``, ``classes`` (names)
  and ``scores``, best first;
- segment: ``mask`` (``H x W`` uint8 class indexes at the input's size) and ``classes`` (the names of
  the classes present).

The images go through the datamodule's own ``predict`` dataset and collate function (the ones
``python -m tasks.<task> predict`` uses), and the task's ``predictions``, which the CLI's ``predict``
writes to files; so the two give the same numbers. On CUDA the network runs in bfloat16 autocast (and
channels-last where the task uses it), as the tasks train and evaluate there. The checkpoint is read with
``weights_only=True``: a file holding pickled code is refused.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device

from datamodules.images import MemoryImage

from .trained import TrainedTask, load_task


class Predictor:
    """A trained task and its datamodule's evaluation preprocessing, called on images (see the module)."""

    def __init__(self, trained: TrainedTask, device: str | torch.device = "cpu", top_k: int = 5, tta: bool = False,
                 tta_scales: list[float] | None = None, tta_flip: bool = True) -> None:  # fmt: skip
        if trained.kind not in ("classify", "detect", "segment"):
            raise ValueError(
                f"{trained.path}: a tasks.{trained.kind} checkpoint; the predictor covers classify, detect and segment"
            )
        self.trained, self.kind, self.top_k = trained, trained.kind, top_k
        if tta and self.kind == "classify":
            raise ValueError("tta: classification's test-time views are the datamodule's eval_crops option")
        if self.kind != "classify":
            trained.task.tta = (tta_scales or [1.0], tta_flip) if tta else None
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.task = trained.task.to(self.device).eval()
        self.task._apply_speedups()  # channels-last on CUDA where the task uses it, as its runs do
        self.datamodule = _datamodule(trained)

    @property
    def class_names(self) -> list[str]:
        return self.trained.class_names

    def __call__(self, images: Any) -> dict | list[dict]:
        single = not isinstance(images, (list, tuple)) and not (isinstance(images, torch.Tensor) and images.ndim == 4)
        items = _as_images([images] if single else images)
        found: list[dict] = []
        autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda")
        with torch.inference_mode(), autocast:
            for batch in self.datamodule.predict_on(items):
                batch = self.datamodule.on_after_batch_transfer(move_data_to_device(batch, self.device), 0)
                found.extend(self._predictions(batch))
        return found[0] if single else found

    def _predictions(self, batch: dict) -> list[dict]:
        if self.kind == "classify":
            return self.task.predictions(batch, top_k=self.top_k)
        rows = self.task.predictions(batch)
        if self.kind == "segment":
            for row in rows:
                row["mask"] = row["mask"][0]
                row["classes"] = [self.task.class_name(int(k)) for k in row["mask"].unique()]
        return rows


def load_predictor(checkpoint: str | Path, device: str | torch.device = "cpu", top_k: int = 5, tta: bool = False,
                   tta_scales: list[float] | None = None, tta_flip: bool = True) -> Predictor:  # fmt: skip
    """A :class:`Predictor` for ``checkpoint`` (a ``tasks.classify``, ``detect`` or ``segment`` one) on
    ``device`` (``cpu``, ``cuda``, ``cuda:1``, or ``auto``); ``top_k`` classes for a classifier;
    ``tta``, ``tta_scales``, ``tta_flip``: test-time augmentation for detection and segmentation, as the
    tasks' options of those names (``tasks.tta``)."""
    return Predictor(load_task(checkpoint), device, top_k, tta, tta_scales, tta_flip)


def _datamodule(trained: TrainedTask):
    """The checkpoint's datamodule, built from its recorded arguments (its folders need not exist here)."""
    args = {k: v for k, v in trained.data.items() if not k.startswith("_")}
    class_path = trained.data.get("_class_path")
    if not class_path:
        raise ValueError(f"{trained.path}: records no datamodule, so its preprocessing is unknown")
    module, name = class_path.rsplit(".", 1)
    cls = getattr(importlib.import_module(module), name)
    if not hasattr(cls, "predict_on"):
        raise ValueError(f"{trained.path}: {name} has no predict dataset of image files; the predictor needs one")
    args["num_workers"] = 0  # images given in the call are read in this process
    args.update({k: False for k in ("pin_memory", "persistent_workers") if k in args})
    datamodule = cls(**args)
    if trained.data_state:
        datamodule.load_state_dict(trained.data_state)
    return datamodule


def _as_images(images) -> list:
    """File paths stay paths; everything else becomes a named :class:`MemoryImage`."""
    items: list = []
    for image in images:
        if isinstance(image, torch.Tensor) and image.ndim == 4:
            items.extend(MemoryImage(f"<image {len(items)}>", x) for x in image)
        elif isinstance(image, (str, Path)):
            path = Path(image)
            if not path.is_file():
                raise FileNotFoundError(f"{path}: no such image file")
            items.append(str(path))
        else:
            items.append(MemoryImage(f"<image {len(items)}>", _pixels(image)))
    return items


def _pixels(image) -> torch.Tensor:
    if isinstance(image, torch.Tensor):
        return image
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"a numpy image must be H x W x 3 uint8 RGB, got {image.shape}")
        return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - pillow is a dependency
        Image = None
    if Image is not None and isinstance(image, Image.Image):
        from torchvision.transforms.v2.functional import pil_to_tensor

        return pil_to_tensor(image.convert("RGB"))
    raise TypeError(f"cannot predict on a {type(image).__name__}: give paths, PIL images or uint8 tensors")
