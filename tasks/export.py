"""``python -m tasks.export CHECKPOINT OUT [--format onnx|torch] [--size H W] [--dynamic]``: a whole trained
model as an ONNX file (run with ONNX Runtime) or a ``torch.export`` program (``torch.export.load``).

    python -m tasks.export runs/demo_detect/version_0/checkpoints/best.ckpt detector.onnx --dynamic
    python -m tasks.export runs/imagenet_resnet50/version_0/checkpoints/best.ckpt resnet50.pt2 --format torch

Each task says what its graph takes and gives (``TaskContract.export_spec``); the file's metadata records it:

- classify: ``image`` float32 ``N x 3 x H x W``, RGB scaled to [0, 1] and normalized as the metadata's
  ``preprocessing`` says (mean/std, or the per-pixel mean), resized and cropped as it says; ``logits``
  ``N x classes``.
- detect: ``image`` float32 ``3 x H x W``, RGB in [0, 1]: the Faster R-CNN's own resizing
  (``min_size``/``max_size``) and normalization are in the graph; ``boxes`` ``K x 4`` (x1, y1, x2, y2 in the
  input's pixels), ``labels`` ``K`` (indexes into ``class_names``, 0 is the background) and ``scores`` ``K``.
  Without ``--dynamic`` the graph takes images of the traced size only.
- segment: ``image`` float32 ``N x 3 x H x W``, normalized as recorded; ``logits`` ``N x classes x H x W``.
- localize: ``image`` as for classify; ``logits`` ``N x classes``, the five best ``classes`` and ``scores``
  (softmax) per image and their ``boxes`` ``N x 5 x 4`` in the input's pixels.

Metadata (ONNX ``metadata_props``; in a ``.pt2`` the extra file ``zoo.json``): ``zoo.task``,
``zoo.class_names`` (JSON list), ``zoo.preprocessing`` (JSON: the datamodule and its evaluation
arguments), ``zoo.input``, ``zoo.outputs``, ``zoo.backbone``. The batch N may vary; ``--dynamic`` lets H
and W vary too, without it the graph is for ``--size`` (default: the evaluation size the checkpoint's
datamodule used).

Both formats are traced by ``torch.export`` (ONNX by ``torch.onnx.export(dynamo=True)``, which translates the
exported program with onnxscript); a detector is traced under its task's ``export_context``
(``tasks.heads.exportable``: batched NMS, resize and padding without branches on data-dependent sizes, the
same boxes and pixels), and the graph keeps the numbers of proposals and detections free. Each stage prints
its start and its time on standard error: with ``--dynamic`` a detector's tracing takes about a minute on a
CPU.

ONNX export needs the optional extra: ``pip install -e ".[export]"`` (``onnx``, ``onnxscript``,
``onnxruntime``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .core.contract import ExportSpec, NotSupportedError
from .inference.loading import TrainedTask, load_task


class ExportError(ValueError):
    """An export that cannot be made as asked, with what to do instead."""


def metadata(trained: TrainedTask, spec: ExportSpec) -> dict[str, str]:
    """What a user of the file needs besides the graph: the task, class names, preprocessing, outputs."""
    return {
        "zoo.task": trained.kind,
        "zoo.class_names": json.dumps(trained.class_names),
        "zoo.preprocessing": json.dumps(spec.preprocessing),
        "zoo.input": spec.input,
        "zoo.outputs": json.dumps(list(spec.outputs)),
        "zoo.backbone": str(trained.task.hparams.backbone),
        "zoo.checkpoint": trained.path.name if trained.path else "",
    }


def example_input(size: tuple[int, int], batched: bool) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    shape = (2, 3, *size) if batched else (3, *size)
    return torch.rand(shape, generator=generator)


def dynamic_shapes(batched: bool, dynamic: bool) -> tuple:
    """``torch.export``'s ``dynamic_shapes`` for the one input: the batch always varies, the height and width
    with ``--dynamic``; export finds each one's range (``Dim.AUTO``)."""
    auto = torch.export.Dim.AUTO
    if batched:
        return ({0: auto, 2: auto, 3: auto} if dynamic else {0: auto},)
    return ({1: auto, 2: auto} if dynamic else None,)


@contextlib.contextmanager
def stage(text: str):
    """``text ...`` on standard error, then how long it took: tracing a dynamic detector takes minutes."""
    print(f"{text} ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    yield
    print(f"{text}: done in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)


def export_onnx(module: nn.Module, example: torch.Tensor, out: Path, outputs, batched: bool, dynamic: bool,
                meta: dict[str, str], opset: int = 18) -> Path:  # fmt: skip
    """The module as ONNX through ``torch.export`` (``torch.onnx.export(dynamo=True)``), its metadata added."""
    try:
        import onnx
        import onnxscript  # noqa: F401  (the dynamo exporter's translation library)
    except ImportError:
        raise ExportError('ONNX export needs the optional extra: pip install -e ".[export]"') from None
    staging = out.with_name(f".{out.name}.partial")
    with torch.no_grad(), stage(f"tracing and translating to ONNX (opset {opset})"):
        program = torch.onnx.export(
            module, (example,), input_names=["image"], output_names=list(outputs),
            dynamic_shapes=dynamic_shapes(batched, dynamic), opset_version=opset, dynamo=True, verbose=False,
        )  # fmt: skip
    model = program.model_proto
    for key, value in meta.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(model, str(staging))
    staging.replace(out)  # never a half-written file under the final name
    return out


def export_program(module: nn.Module, example: torch.Tensor, out: Path, batched: bool, dynamic: bool,
                   meta: dict[str, str]) -> Path:  # fmt: skip
    """The module as a ``torch.export`` program with the metadata as the extra file ``zoo.json``."""
    with torch.no_grad(), stage("tracing with torch.export"):
        program = torch.export.export(module, (example,), dynamic_shapes=dynamic_shapes(batched, dynamic), strict=False)
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
    task = trained.task
    try:
        spec = task.export_spec(trained.data)
    except NotSupportedError as err:
        raise ExportError(f"{checkpoint}: {err}") from None
    if dynamic and spec.fixed_size:
        raise ExportError(f"--dynamic: {spec.fixed_size}; export it at one size (--size H W)")
    size = tuple(size) if size else task.export_size(trained.data)
    body = task.backbone_module()
    stride = body.native_stride if body is not None else 1
    if len(size) != 2 or min(size) < stride:
        raise ExportError(
            f"--size {' '.join(map(str, size))}: the input must be at least the network's stride ({stride} px, "
            f"{task.hparams.backbone}) on each side"
        )
    example = example_input(size, spec.batched)
    meta = metadata(trained, spec)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    module = spec.module.eval()
    if spec.warm_up:
        with torch.no_grad():
            module(example)  # e.g. the RoI pooler's level scales, fixed by the first image, stay constants
    with task.export_context(), warnings.catch_warnings():
        # torchvision's NMS shape rule uses a name torch deprecated: its note, not the user's to act on
        warnings.filterwarnings("ignore", message="`create_unbacked_symint` is deprecated", category=FutureWarning)
        if format == "onnx":
            return export_onnx(module, example, out, spec.outputs, spec.batched, dynamic, meta)
        return export_program(module, example, out, spec.batched, dynamic, meta)


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
    description = __doc__.split("\n\n")[0].replace("\n", " ")  # the first paragraph, whole
    parser = argparse.ArgumentParser(prog="python -m tasks.export", description=description)
    parser.add_argument("checkpoint", help="a checkpoint of any task (tasks.classify, detect, segment, localize)")
    parser.add_argument("out", help="the file to write (.onnx or .pt2)")
    parser.add_argument("--format", choices=("onnx", "torch"), default=None,
                        help="onnx (ONNX Runtime) or torch (torch.export); default: from OUT's suffix")  # fmt: skip
    parser.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), help="input size of the traced graph")
    parser.add_argument("--dynamic", action="store_true", help="let the input's height and width (and batch) vary")
    args = parser.parse_args(argv)
    fmt = args.format or ("torch" if Path(args.out).suffix in (".pt2", ".pt") else "onnx")
    print(f"wrote {export(args.checkpoint, args.out, fmt, args.size, args.dynamic)}")


if __name__ == "__main__":
    from zoo_common.command import run_command

    run_command(main)  # a user's mistake (a missing or foreign checkpoint, a bad size) is one line
