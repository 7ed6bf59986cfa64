"""Whole-model export (tasks.export): ONNX Runtime's and torch.export's outputs equal eager PyTorch's for
a classifier, C4 and FPN detectors and an FCN; the metadata names the classes and the preprocessing."""

from __future__ import annotations

import re

import lightning
import numpy as np
import pytest
import torch
from datasets import classify_checkpoint

from backbones.weights import WeightsError
from tasks.export import ExportError, export, main, read_metadata
from tasks.inference.loading import load_task
from tasks.registry import task_class

ort = pytest.importorskip("onnxruntime", reason='ONNX export is an extra: pip install -e ".[export]"')

#: each task as a test builds it (random weights), with the datamodule arguments a checkpoint records
SPECS = {
    "classify": (
        "classify",
        {"backbone": "resnet18", "num_classes": 5},
        {"_class_path": "datamodules.ImageFolderDataModule", "image_size": 64, "eval_resize": 73,
         "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
    ),
    "fcn": (
        "segment",
        {"backbone": "resnet18", "num_classes": 4, "head": "dilated"},
        {"_class_path": "datamodules.COCOSegmentationDataModule", "base_size": 64, "crop_size": 48},
    ),
    "fpn": (
        "detect",
        {"backbone": "resnet18", "num_classes": 3, "head": "fpn", "norm": "bn", "freeze_at": 0, "min_size": 96,
         "max_size": 96, "fpn_channels": 32, "box_score_thresh": 0.0},
        {"_class_path": "datamodules.COCODetectionDataModule"},
    ),
    "c4": (
        "detect",
        {"backbone": "resnet18", "num_classes": 3, "head": "c4", "norm": "bn", "freeze_at": 0, "min_size": 96,
         "max_size": 96, "box_score_thresh": 0.0, "detector_args": {"rpn_post_nms_top_n_test": 100}},
        {"_class_path": "datamodules.COCODetectionDataModule"},
    ),
    "localize": (
        "localize",
        {"backbone": "resnet18", "num_classes": 7},
        {"_class_path": "datamodules.ILSVRCLocalizationDataModule", "image_size": 64, "eval_resize": 73},
    ),
    "localize_rpn_rcnn": (  # Appendix C's two stages: the R-CNN's crops, scores and boxes in the graph
        "localize",
        {"backbone": "resnet18", "num_classes": 7, "head": "rpn_rcnn", "rcnn_crop": 32, "rcnn_proposals": 8},
        {"_class_path": "datamodules.ILSVRCLocalizationDataModule", "image_size": 64, "eval_resize": 73},
    ),
}  # fmt: skip
EXPORTED = ["classify", "fcn", "fpn", "c4", "localize", "localize_rpn_rcnn"]


class Payload:
    """An object of a class of ours: ``weights_only`` loading refuses to rebuild it."""


def write_checkpoint(name: str, folder) -> tuple:
    """A checkpoint as a fit writes it (state dict, hyperparameters, the datamodule's arguments and the
    task's own records), of a task with random weights; returns it and the task."""
    kind, hparams, data = SPECS[name]
    torch.manual_seed(0)
    task = task_class(kind)(**hparams).eval()
    task.class_names = [f"{name}{k}" for k in range(hparams["num_classes"])]
    checkpoint = {
        "state_dict": task.state_dict(), "hyper_parameters": dict(task.hparams), "datamodule_hyper_parameters": data,
        "pytorch-lightning_version": lightning.__version__,
    }  # fmt: skip
    task.on_save_checkpoint(checkpoint)
    path = folder / f"{name}.ckpt"
    torch.save(checkpoint, path)
    return path, task


def run_onnx(path, image: torch.Tensor) -> list[np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"image": image.numpy()})


def eager(task, kind: str, image: torch.Tensor) -> list[torch.Tensor]:
    network = getattr(task, task.network_attr)
    with torch.no_grad():
        if kind == "detect":
            found = network([image])[0]
            return [found["boxes"], found["labels"], found["scores"]]
        if kind == "localize":  # the five best guesses, as the predictor reads them
            out = network(image)
            scores, classes = out["logits"].softmax(1).topk(5, dim=1)
            return [out["logits"], classes, scores, network.boxes_for(out, classes, tuple(image.shape[-2:]))]
        out = network(image)
        return [out["out"] if isinstance(out, dict) else out]


def assert_same(kind: str, got, want) -> None:
    if kind == "detect":
        boxes, labels, scores = (np.asarray(x) for x in got)
        assert len(boxes) == len(want[0]) > 0  # the same number of detections
        np.testing.assert_allclose(boxes, want[0].numpy(), atol=1e-3)
        np.testing.assert_array_equal(labels, want[1].numpy())
        np.testing.assert_allclose(scores, want[2].numpy(), atol=1e-3)
    elif kind == "localize":
        logits, classes, scores, boxes = (np.asarray(x) for x in got)
        np.testing.assert_allclose(logits, want[0].numpy(), atol=1e-4, rtol=0)
        np.testing.assert_array_equal(classes, want[1].numpy())
        np.testing.assert_allclose(scores, want[2].numpy(), atol=1e-5, rtol=0)
        np.testing.assert_allclose(boxes, want[3].numpy(), atol=1e-3, rtol=0)
    else:
        np.testing.assert_allclose(np.asarray(got[0]), want[0].numpy(), atol=1e-4, rtol=0)


def inputs(kind: str, size: tuple[int, int]) -> torch.Tensor:
    generator = torch.Generator().manual_seed(sum(size))
    return torch.rand((3, *size) if kind == "detect" else (2, 3, *size), generator=generator)


@pytest.mark.parametrize(
    "name",
    [
        *(n for n in EXPORTED if SPECS[n][0] != "detect"),
        *(pytest.param(n, marks=pytest.mark.slow) for n in ("c4", "fpn")),
    ],
    # (the dynamic detectors: 30-90 s to trace here; the fast tier exports FPN at one size below, and C4 with
    # H and W free to a torch.export program, the same tracing)
)
def test_onnx_runtime_equals_pytorch_at_the_export_size_and_another_with_dynamic(name, tmp_path):
    kind = SPECS[name][0]
    ckpt, task = write_checkpoint(name, tmp_path)
    fixed = export(ckpt, tmp_path / f"{name}.onnx", "onnx", size=(64, 64))
    image = inputs(kind, (64, 64))
    assert_same(kind, run_onnx(fixed, image), eager(task, kind, image))
    if kind == "localize":  # the RPN head's anchors follow the input's size: one size, and --dynamic refused
        with pytest.raises(ExportError, match="--dynamic: the RPN head's anchors are sized from the input"):
            export(ckpt, tmp_path / f"{name}_dynamic.onnx", "onnx", size=(64, 64), dynamic=True)
        assert_same(kind, run_onnx(fixed, image[:1]), eager(task, kind, image[:1]))  # the batch still varies
        dynamic = fixed
    else:
        dynamic = export(ckpt, tmp_path / f"{name}_dynamic.onnx", "onnx", size=(64, 64), dynamic=True)
        other = inputs(kind, (80, 56))  # not the traced size
        assert_same(kind, run_onnx(dynamic, other), eager(task, kind, other))
    meta = read_metadata(dynamic)
    assert meta["zoo.task"] == kind and meta["zoo.backbone"] == "resnet18"
    names = [f"{name}{k}" for k in range(SPECS[name][1]["num_classes"])]
    assert meta["zoo.class_names"] == (["background", *names] if kind == "detect" else names)
    if kind == "detect":
        assert meta["zoo.outputs"] == ["boxes", "labels", "scores"] and meta["zoo.preprocessing"]["in_graph"]
    if kind == "localize":
        assert meta["zoo.outputs"] == ["logits", "classes", "scores", "boxes"]
    if name == "classify":  # the evaluation preprocessing the checkpoint's datamodule recorded
        assert meta["zoo.preprocessing"] == {**{k: v for k, v in SPECS[name][2].items() if k != "_class_path"},
                                             "datamodule": "datamodules.ImageFolderDataModule"}  # fmt: skip
    assert not list(tmp_path.glob(".*.partial"))  # written under a staging name, then renamed


@pytest.mark.parametrize(
    "name",
    ["classify", "fcn", pytest.param("c4", marks=pytest.mark.slow), pytest.param("fpn", marks=pytest.mark.slow)],
    # (dynamic detectors: 40-80 s to trace here; the fast tier exports FPN at one size below)
)
def test_torch_export_program_equals_eager(name, tmp_path):
    """With H and W free (``--dynamic``): a detector's graph keeps Faster R-CNN's resize (the resized size
    computed as eager computes it), and its data-dependent numbers of proposals and detections
    (tasks.heads.exportable.traceable_detector), so another size and another image give their own boxes."""
    kind = SPECS[name][0]
    ckpt, task = write_checkpoint(name, tmp_path)
    path = export(ckpt, tmp_path / f"{name}.pt2", "torch", size=(64, 64), dynamic=True)
    program = torch.export.load(str(path))
    for size in [(64, 64), (96, 80)]:
        image = inputs(kind, size)
        with torch.no_grad():
            got = program.module()(image)
        want = eager(task, kind, image)
        if kind == "detect":
            assert_same(kind, [g.numpy() for g in got], want)
        else:
            torch.testing.assert_close(got, want[0], atol=1e-5, rtol=0)
    meta = read_metadata(path)
    names = [f"{name}{k}" for k in range(SPECS[name][1]["num_classes"])]
    assert meta["zoo.class_names"] == (["background", *names] if kind == "detect" else names)


def test_exported_detector_follows_the_image_not_the_traced_one(tmp_path):
    """The program (and the ONNX graph) is not a recording of the example's detections: a blank image, whose
    proposals and scores differ from the example's, gives what the eager detector gives, even when that is
    fewer boxes."""
    spec = SPECS["fpn"]
    SPECS["strict"] = ("detect", {**spec[1], "box_score_thresh": 0.3}, spec[2])
    try:
        ckpt, task = write_checkpoint("strict", tmp_path)
    finally:
        del SPECS["strict"]
    program = torch.export.load(str(export(ckpt, tmp_path / "strict.pt2", "torch", size=(64, 64))))
    onnx_file = export(ckpt, tmp_path / "strict.onnx", "onnx", size=(64, 64))
    counts = set()
    for image in [inputs("detect", (64, 64)), torch.zeros(3, 64, 64), torch.ones(3, 64, 64)]:
        with torch.no_grad():
            boxes, labels, scores = program.module()(image)
        want = eager(task, "detect", image)
        assert len(boxes) == len(want[0])
        torch.testing.assert_close(boxes, want[0], atol=1e-3, rtol=0)
        torch.testing.assert_close(labels, want[1])
        torch.testing.assert_close(scores, want[2], atol=1e-3, rtol=0)
        if len(boxes):  # ONNX Runtime's graph too (assert_same wants detections)
            assert_same("detect", run_onnx(onnx_file, image), want)
        else:
            assert len(run_onnx(onnx_file, image)[0]) == 0
        counts.add(len(boxes))
    assert len(counts) > 1, counts  # the images gave different numbers of detections


def test_sizes_under_the_network_stride_are_refused_in_one_line(tmp_path):
    ckpt, _ = write_checkpoint("classify", tmp_path)
    with pytest.raises(ExportError, match=r"--size 16 64: the input must be at least the network's stride \(32 px"):
        export(ckpt, tmp_path / "small.onnx", size=(16, 64))
    assert not (tmp_path / "small.onnx").exists()


def test_a_checkpoint_holding_pickled_code_is_refused(tmp_path):
    ckpt, _ = write_checkpoint("classify", tmp_path)
    checkpoint = torch.load(ckpt, weights_only=True)
    checkpoint["extra"] = Payload()  # unpickling it would import and run this module's code
    torch.save(checkpoint, tmp_path / "code.ckpt")
    with pytest.raises(WeightsError, match="code.ckpt"):
        export(tmp_path / "code.ckpt", tmp_path / "out.onnx")
    assert not (tmp_path / "out.onnx").exists()


def test_the_command_exports_a_trained_checkpoint_with_its_data_class_names(tmp_path, capsys):
    """A checkpoint written by ``tasks.classify fit``: the command line, the suffix choosing the format,
    and the names of the ImageFolder's classes in the file."""
    ckpt, _ = classify_checkpoint(tmp_path, "resnet18")
    main([ckpt, str(tmp_path / "model.onnx")])
    said = capsys.readouterr()
    assert f"wrote {tmp_path / 'model.onnx'}" in said.out
    # the quiet minutes are announced and timed
    assert re.search(r"tracing and translating to ONNX \(opset 18\) \.\.\.\n.*: done in \d+\.\d s", said.err), said.err
    meta = read_metadata(tmp_path / "model.onnx")
    assert meta["zoo.class_names"] == ["circle", "ring", "square", "star", "triangle"]
    assert meta["zoo.preprocessing"]["image_size"] == 32 and meta["zoo.preprocessing"]["eval_resize"] == 32
    trained = load_task(ckpt)
    image = torch.rand(1, 3, 32, 32)
    assert_same("classify", run_onnx(tmp_path / "model.onnx", image), eager(trained.task, "classify", image))
    main([ckpt, str(tmp_path / "model.pt2")])
    assert read_metadata(tmp_path / "model.pt2")["zoo.task"] == "classify"


def test_the_traceable_nms_keeps_what_batched_nms_keeps_and_is_undone_after_export():
    """Over 4,000 boxes (torchvision's per-class loop on CPU), a few, and none: the same boxes kept in the
    same order; torchvision's functions are back once the export is over."""
    from torchvision.models.detection import transform as rcnn_transform
    from torchvision.ops import batched_nms
    from torchvision.ops import boxes as box_ops

    from tasks.heads.exportable import _one_nms_for_all_classes, traceable_detector

    generator = torch.Generator().manual_seed(0)
    for count in (1500, 12, 0):  # 1500 x 4 coordinates > 4000: the vanilla branch
        corner = torch.rand(count, 2, generator=generator) * 200
        boxes = torch.cat([corner, corner + 5 + torch.rand(count, 2, generator=generator) * 60], dim=1)
        scores = torch.rand(count, generator=generator)
        classes = torch.randint(0, 5, (count,), generator=generator)
        want = batched_nms(boxes, scores, classes, 0.5)
        torch.testing.assert_close(_one_nms_for_all_classes(boxes, scores, classes, 0.5), want)
    originals = (box_ops.batched_nms, rcnn_transform._resize_image_and_masks,
                 rcnn_transform.GeneralizedRCNNTransform.batch_images)  # fmt: skip
    with traceable_detector():
        assert box_ops.batched_nms is _one_nms_for_all_classes
    assert originals == (box_ops.batched_nms, rcnn_transform._resize_image_and_masks,
                         rcnn_transform.GeneralizedRCNNTransform.batch_images)  # fmt: skip


@pytest.mark.parametrize("height,width", [(281, 300), (300, 281), (1109, 400), (64, 64), (90, 1000)])
def test_the_traceable_resize_gives_torchvisions_pixels(height, width):
    """Sizes where ``floor(h * (600 / h))`` is 599, a wide and a tall image: the same resized image."""
    from torchvision.models.detection.transform import _resize_image_and_masks

    from tasks.heads.exportable import _resize_by_symbolic_scale

    image = torch.rand(3, height, width, generator=torch.Generator().manual_seed(height))
    got, _ = _resize_by_symbolic_scale(image, 600, 1000)
    want, _ = _resize_image_and_masks(image, 600, 1000)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=0, rtol=0)
