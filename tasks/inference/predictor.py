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
  the classes present);
- localize: the five best ``classes``, ``indices`` and ``scores``, and each one's box (``boxes``, ``5 x 4``
  in the input image's pixels).

Each task says what it returns (``TaskContract.predictions`` and ``predictor_result``); nothing here knows
which task it holds.

The images go through the datamodule's own ``predict`` dataset and collate function (the ones
``python -m tasks.<task> predict`` uses), and the task's ``predictions``, which the CLI's ``predict``
writes to files; so the two give the same numbers. The datamodule is the one the checkpoint records, built
only if it is one of this project's classes (``datamodules.resolve``) or lives in a module given in
``trusted_modules``: a checkpoint never decides what is imported. On CUDA the network runs in bfloat16 autocast (and
channels-last where the task uses it), as the tasks train and evaluate there. The checkpoint is read with
``weights_only=True``: a file holding pickled code is refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device

import datamodules
from datamodules.contract import PredictableData
from datamodules.images import MemoryImage

from ..core.contract import NotSupportedError
from .loading import TrainedTask, load_task


class Predictor:
    """A trained task and its datamodule's evaluation preprocessing, called on images (see the module)."""

    def __init__(self, trained: TrainedTask, device: str | torch.device = "cpu", top_k: int = 5, tta: bool = False,
                 tta_scales: list[float] | None = None, tta_flip: bool = True,
                 trusted_modules: tuple[str, ...] = (), **options: Any) -> None:  # fmt: skip
        self.trained = trained
        try:
            trained.task.set_prediction_options(top_k, (tta_scales or [1.0], tta_flip) if tta else None, **options)
        except NotSupportedError as err:
            raise ValueError(f"{trained.path}: {err}") from None
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.task = trained.task.to(self.device).eval()
        self.task.apply_speedups()  # channels-last on CUDA where the task uses it, as its runs do
        self.datamodule = _datamodule(trained, trusted_modules)

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
                try:
                    rows = self.task.predictions(batch)
                except NotSupportedError as err:
                    raise ValueError(f"{self.trained.path}: {err}") from None
                found.extend(self.task.predictor_result(row) for row in rows)
        return found[0] if single else found


def load_predictor(checkpoint: str | Path | Sequence[str | Path], device: str | torch.device = "cpu", top_k: int = 5,
                   tta: bool = False,
                   tta_scales: list[float] | None = None, tta_flip: bool = True,
                   trusted_modules: tuple[str, ...] = (), **options: Any) -> Predictor:  # fmt: skip
    """A :class:`Predictor` for ``checkpoint`` (any task's) on ``device`` (``cpu``, ``cuda``, ``cuda:1``, or
    ``auto``); ``top_k`` classes for a classifier; ``tta``, ``tta_scales``, ``tta_flip``: test-time
    augmentation for detection and segmentation, as the tasks' options of those names
    (``tasks.heads.tta``); ``trusted_modules``: modules of your own whose datamodule classes a checkpoint
    may name (the project's own are always accepted); ``options``: a task's own inference options, as its
    arguments of those names (detection's ``box_refinement=True``, ``ensemble=[...]``). A list of checkpoints
    is an ensemble of them (``tasks.inference.ensemble``), with the first one's preprocessing."""
    if not isinstance(checkpoint, (str, Path)):
        members = [str(c) for c in checkpoint]
        if not members:
            raise ValueError("load_predictor: an empty list of checkpoints")
        checkpoint, options = members[0], {**options, "ensemble": members}
    return Predictor(load_task(checkpoint), device, top_k, tta, tta_scales, tta_flip, tuple(trusted_modules), **options)


def _datamodule(trained: TrainedTask, trusted_modules: tuple[str, ...] = ()):
    """The checkpoint's datamodule, built from its recorded arguments (its folders need not exist here)."""
    args = {k: v for k, v in trained.data.items() if not k.startswith("_")}
    class_path = trained.data.get("_class_path")
    if not class_path:
        raise ValueError(f"{trained.path}: records no datamodule, so its preprocessing is unknown")
    cls = datamodules.resolve(str(class_path), trusted_modules, what=f"{trained.path}'s datamodule")
    args["num_workers"] = 0  # images given in the call are read in this process
    args.update({k: False for k in ("pin_memory", "persistent_workers") if k in args})
    datamodule = cls(**args)
    if not isinstance(datamodule, PredictableData):
        raise ValueError(f"{trained.path}: {cls.__name__} has no predict dataset of image files (predict_on)")
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
        from torchvision.transforms.v2.functional import pil_to_tensor, to_dtype

        if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
            # 16-bit grayscale (PIL's convert("RGB") would clip it to 255): scaled to 8 bits as the file
            # decoder scales a 16-bit PNG (datamodules.images.read_image), then the gray repeated as RGB
            values = np.asarray(image, dtype=np.int64).clip(0, 65535).astype(np.uint16)
            gray = to_dtype(torch.from_numpy(values)[None], torch.uint8, scale=True)
            return gray.expand(3, -1, -1).contiguous()
        return pil_to_tensor(image.convert("RGB"))
    raise TypeError(f"cannot predict on a {type(image).__name__}: give paths, PIL images or uint8 tensors")
