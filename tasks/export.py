"""``python -m tasks.export CHECKPOINT OUT [--format onnx|torch] [--size H W] [--dynamic]``: a whole trained
model as an ONNX file (run with ONNX Runtime) or a ``torch.export`` program (``torch.export.load``).

    python -m tasks.export runs/demo_detect/version_0/checkpoints/best.ckpt detector.onnx --dynamic
    python -m tasks.export runs/imagenet_resnet50/version_0/checkpoints/best.ckpt resnet50.pt2 --format torch

What the graph takes and gives, per task (the datamodule's evaluation preprocessing is *not* in the graph
except where said; the file's metadata records it):

- classify: ``image`` float32 ``N x 3 x H x W``, RGB scaled to [0, 1] and normalized as the metadata's
  ``preprocessing`` says (mean/std, or the per-pixel mean), resized and cropped as it says; ``logits``
  ``N x classes``.
- detect: ``image`` float32 ``3 x H x W``, RGB in [0, 1], any size: the Faster
  R-CNN's own resizing (``min_size``/``max_size``) and normalization are in the graph; ``boxes`` ``K x 4``
  (x1, y1, x2, y2 in the input's pixels), ``labels`` ``K`` (indexes into ``class_names``, 0 is the
  background) and ``scores`` ``K``.
- segment: ``image`` float32 ``N x 3 x H x W``, normalized as recorded; ``logits`` ``N x classes x H x W``.
- localize: not exported yet (its boxes are decoded outside the network); ``backbones.export`` writes its
  backbone.

Metadata (ONNX ``metadata_props``; in a ``.pt2`` the extra file ``zoo.json``): ``zoo.task``,
``zoo.class_names`` (JSON list), ``zoo.preprocessing`` (JSON: the datamodule and its evaluation
arguments), ``zoo.input``, ``zoo.outputs``, ``zoo.backbone``. The batch N may vary; ``--dynamic`` lets H
and W vary too, without it the graph is for ``--size`` (default: the evaluation size the checkpoint's
datamodule used).

``torch.export`` of a detector runs under :func:`traceable_detector` (batched NMS, resize and padding without
branches on data-dependent sizes, the same boxes and pixels); the program keeps the numbers of proposals and
detections free. With ``--dynamic`` its tracing takes minutes on a CPU.

ONNX export needs the optional extra: ``pip install -e ".[export]"`` (``onnx``, ``onnxruntime``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import torch
from torch import nn
from torch.nn import functional as F
from torchvision.models.detection import transform as rcnn_transform
from torchvision.ops import boxes as box_ops
from torchvision.ops import nms

from .trained import TrainedTask, load_task

#: the datamodule arguments that say how an image becomes the network's input
PREPROCESSING_KEYS = (
    "image_size", "eval_size", "eval_resize", "eval_crops", "normalize", "mean", "std", "base_size", "crop_size",
)  # fmt: skip


class ExportError(ValueError):
    """An export that cannot be made as asked, with what to do instead."""


class _Logits(nn.Module):
    """A network whose output (a tensor, or a dict with ``out``) becomes plain tensors for export."""

    def __init__(self, network: nn.Module, keys: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.network, self.keys = network, keys

    def forward(self, image: torch.Tensor):
        out = self.network(image)
        if self.keys:
            return tuple(out[k] for k in self.keys) if len(self.keys) > 1 else out[self.keys[0]]
        return out


class _Detector(nn.Module):
    """torchvision's Faster R-CNN on one image: pre-processing, network and post-processing."""

    def __init__(self, detector: nn.Module) -> None:
        super().__init__()
        self.detector = detector

    def forward(self, image: torch.Tensor):
        found = self.detector([image])[0]
        return found["boxes"], found["labels"], found["scores"]


def _one_nms_for_all_classes(boxes: torch.Tensor, scores: torch.Tensor, classes: torch.Tensor, iou: float):
    """``torchvision.ops.batched_nms`` without its two branches on the number of boxes (none left; over 4,000
    on CPU), which ``torch.export`` cannot trace: always its own offset strategy (each class's boxes moved
    past every other class's, then one NMS), which keeps the same boxes; a zero joins the maximum so that
    an empty set needs no branch."""
    top = torch.cat([boxes.flatten(), boxes.new_zeros(1)]).max()
    return nms(boxes + (classes.to(boxes) * (top + 1))[:, None], scores, iou)


_resize_with_targets = rcnn_transform._resize_image_and_masks


def _resize_by_symbolic_scale(image: torch.Tensor, min_size: float, max_size: float, target=None, fixed_size=None):
    """``GeneralizedRCNNTransform``'s resize (shorter side to ``min_size`` unless the longer would pass
    ``max_size``) with the smaller of the two scales taken by ``torch.sym_min``, so that an input whose height
    and width vary is not tied to the case the example image fell in; the same numbers in eager mode."""
    if target is not None or fixed_size is not None:
        return _resize_with_targets(image, min_size, max_size, target, fixed_size)
    height, width = image.shape[-2:]
    scale = torch.sym_min(min_size / torch.sym_min(height, width), max_size / torch.sym_max(height, width))
    if isinstance(height, int) and isinstance(width, int):  # a fixed size: interpolate's own arithmetic
        new_h, new_w = math.floor(height * scale), math.floor(width * scale)
    else:  # the same double-precision product as data, so the graph carries two plain symbols, not formulas
        shape = torch.tensor([height, width], dtype=torch.float64)
        new_h, new_w = (shape * torch.tensor(scale, dtype=torch.float64)).floor().long().tolist()
        torch._check(new_h >= 1)
        torch._check(new_w >= 1)
    resized = F.interpolate(image[None], size=(new_h, new_w), mode="bilinear")
    return resized[0], None


def _pad_one_image(transform: rcnn_transform.GeneralizedRCNNTransform, images: list[torch.Tensor],
                   size_divisible: int = 32) -> torch.Tensor:  # fmt: skip
    """``GeneralizedRCNNTransform.batch_images`` for the one image the exported graph takes: zeros on the right
    and bottom up to the next multiple of ``size_divisible``, computed in integers (no float ``ceil``, which
    would fix the traced size)."""
    (image,) = images
    height, width = image.shape[-2:]
    pad_h, pad_w = (-height) % size_divisible, (-width) % size_divisible
    return F.pad(image, (0, pad_w, 0, pad_h))[None]


@contextlib.contextmanager
def traceable_detector() -> Iterator[None]:
    """While exporting a Faster R-CNN with ``torch.export``: the RPN's and box head's per-class NMS (both call
    ``torchvision.ops.boxes.batched_nms``) without data-dependent branches, and the input resize without a
    branch on the image's shape. (The RoI pooler, ``tasks.detection_models.RoIAlignPooler``, is traceable as
    it is.)"""
    with (
        mock.patch.object(box_ops, "batched_nms", _one_nms_for_all_classes),
        mock.patch.object(rcnn_transform, "_resize_image_and_masks", _resize_by_symbolic_scale),
        mock.patch.object(rcnn_transform.GeneralizedRCNNTransform, "batch_images", _pad_one_image),
    ):
        yield


def graph(trained: TrainedTask) -> tuple[nn.Module, tuple[str, ...], bool]:
    """The module to export, its output names, and whether it takes a batch (``N x 3 x H x W``)."""
    network = trained.network.eval()
    if trained.kind == "detect":
        return _Detector(network).eval(), ("boxes", "labels", "scores"), False
    if trained.kind == "segment":
        return _Logits(network, ("out",)).eval(), ("logits",), True
    return _Logits(network).eval(), ("logits",), True


def default_size(trained: TrainedTask) -> tuple[int, int]:
    """The evaluation input size the checkpoint's datamodule used (classification's crop, segmentation's
    base size, detection's ``min_size``)."""
    data, hp = trained.data, trained.task.hparams
    if trained.kind == "detect":
        side = hp.min_size if isinstance(hp.min_size, int) else max(hp.min_size)
    elif trained.kind == "segment":
        side = data.get("base_size") or data.get("crop_size") or 512
    else:
        side = data.get("eval_size") or data.get("image_size") or 224
    return int(side), int(side)


def metadata(trained: TrainedTask, outputs: tuple[str, ...]) -> dict[str, str]:
    """What a user of the file needs besides the graph: the task, class names, preprocessing, outputs."""
    data = trained.data
    preprocessing: dict[str, Any] = {"datamodule": data.get("_class_path")}
    preprocessing.update({k: data[k] for k in PREPROCESSING_KEYS if k in data})
    hp = trained.task.hparams
    if trained.kind == "detect":
        preprocessing = {"in_graph": True, "min_size": hp.min_size, "max_size": hp.max_size}
        described = "float32 3 x H x W, RGB in [0, 1]; resized and normalized inside the graph"
    else:
        described = "float32 N x 3 x H x W, RGB in [0, 1], then resized and normalized as zoo.preprocessing says"
    return {
        "zoo.task": trained.kind,
        "zoo.class_names": json.dumps(trained.class_names),
        "zoo.preprocessing": json.dumps(preprocessing),
        "zoo.input": described,
        "zoo.outputs": json.dumps(list(outputs)),
        "zoo.backbone": str(hp.backbone),
        "zoo.checkpoint": trained.path.name if trained.path else "",
    }


def example_input(size: tuple[int, int], batched: bool) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    shape = (2, 3, *size) if batched else (3, *size)
    return torch.rand(shape, generator=generator)


def export_onnx(module: nn.Module, example: torch.Tensor, out: Path, outputs, batched: bool, dynamic: bool,
                meta: dict[str, str], opset: int = 17) -> Path:  # fmt: skip
    try:
        import onnx
    except ImportError:
        raise ExportError('ONNX export needs the optional extra: pip install -e ".[export]"') from None
    # the batch (or the number of detections) always varies; the height and width with --dynamic
    axes = {name: {0: "batch" if batched else "detections"} for name in outputs}
    if batched:
        axes["image"] = {0: "batch", 2: "height", 3: "width"} if dynamic else {0: "batch"}
    elif dynamic:
        axes["image"] = {1: "height", 2: "width"}
    staging = out.with_name(f".{out.name}.partial")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's notes on torchvision's code, not the user's to act on
        torch.onnx.export(
            module, (example,), str(staging), input_names=["image"], output_names=list(outputs),
            dynamic_axes=axes, opset_version=opset, dynamo=False,
        )  # fmt: skip
    model = onnx.load(str(staging))
    for key, value in meta.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(model, str(staging))
    staging.replace(out)  # never a half-written file under the final name
    return out


def export_program(module: nn.Module, example: torch.Tensor, out: Path, batched: bool, dynamic: bool,
                   meta: dict[str, str]) -> Path:  # fmt: skip
    # the batch always varies, the height and width with --dynamic; export finds each one's range
    auto = torch.export.Dim.AUTO
    shapes = {"image": ({0: auto, 2: auto, 3: auto} if dynamic else {0: auto}) if batched else None}
    if dynamic and not batched:
        shapes = {"image": {1: auto, 2: auto}}
    with torch.no_grad():
        program = torch.export.export(module, (example,), dynamic_shapes=shapes, strict=False)
    staging = out.with_name(f".{out.name}.partial")
    torch.export.save(program, str(staging), extra_files={"zoo.json": json.dumps(meta)})
    staging.replace(out)
    return out


def export(checkpoint: str | Path, out: str | Path, format: str = "onnx", size: tuple[int, int] | None = None,
           dynamic: bool = False) -> Path:  # fmt: skip
    """Export the model of ``checkpoint`` to ``out`` (see the module's docstring for the graph's contract)."""
    if format not in ("onnx", "torch"):
        raise ExportError(f"--format {format!r}: use onnx or torch")
    trained = load_task(checkpoint)
    if trained.kind == "localize":
        raise ExportError(
            f"{checkpoint} is a tasks.localize checkpoint: whole-model export covers classify, detect and segment "
            "(its boxes are decoded outside the network); python -m backbones.export writes its backbone"
        )
    module, outputs, batched = graph(trained)
    example = example_input(tuple(size) if size else default_size(trained), batched)
    meta = metadata(trained, outputs)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if format == "onnx":
        return export_onnx(module, example, out, outputs, batched, dynamic, meta)
    if trained.kind != "detect":
        return export_program(module, example, out, batched, dynamic, meta)
    with torch.no_grad():
        module(example)  # the RoI pooler's level scales, fixed by the first image, stay constants
    with traceable_detector():
        return export_program(module, example, out, batched, dynamic, meta)


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The ``zoo.*`` metadata of an exported file, JSON values decoded."""
    path = Path(path)
    if path.suffix == ".onnx":
        import onnx

        raw = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    else:
        files = {"zoo.json": ""}
        torch.export.load(str(path), extra_files=files)
        raw = json.loads(files["zoo.json"])
    decoded = {}
    for key, value in raw.items():
        try:
            decoded[key] = json.loads(value)
        except json.JSONDecodeError:
            decoded[key] = value
    return decoded


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tasks.export", description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", help="a checkpoint of tasks.classify, detect, segment or localize")
    parser.add_argument("out", help="the file to write (.onnx or .pt2)")
    parser.add_argument("--format", choices=("onnx", "torch"), default=None,
                        help="onnx (ONNX Runtime) or torch (torch.export); default: from OUT's suffix")  # fmt: skip
    parser.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), help="input size of the traced graph")
    parser.add_argument("--dynamic", action="store_true", help="let the input's height and width (and batch) vary")
    args = parser.parse_args(argv)
    fmt = args.format or ("torch" if Path(args.out).suffix in (".pt2", ".pt") else "onnx")
    try:
        written = export(args.checkpoint, args.out, fmt, args.size, args.dynamic)
    except (ExportError, FileNotFoundError) as err:
        parser.exit(2, f"error: {err}\n")
    print(f"wrote {written}")


if __name__ == "__main__":
    main()
