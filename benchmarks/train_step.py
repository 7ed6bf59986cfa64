"""Training-step throughput and peak memory: our tasks' models against torchvision's, in one process.

    python -m benchmarks.train_step --task classify --models resnet50 resnet101 resnext50_32x4d \\
        --device cuda --batch 256 --precision bf16 --channels-last [--compile]
    python -m benchmarks.train_step --task detect --device cuda --batch 16
    python -m benchmarks.train_step --task segment --device cuda --batch 16

Each measurement is one JSON line: images/s (median over timed steps) and peak memory for ``ours`` and
``torchvision``, and their ratios (``speed_ratio`` = ours / torchvision, > 1 is faster;
``memory_ratio`` = ours / torchvision, < 1 is leaner). Inputs are synthetic. Peak memory is
``torch.cuda.max_memory_allocated`` on CUDA; on CPU it is the bytes of the tensors autograd keeps for
the backward pass (activations, counted once per storage), the part of training memory that differs
between implementations of the same network.

The step is what the task does: forward, loss (cross-entropy; the detector's four losses; FCN's main +
0.5 aux), backward, SGD (momentum 0.9, fused on CUDA as the tasks use it). Steps run back to back
(one synchronization per timed round, not per step). Both implementations get the same settings.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
import torchvision
from torch import nn


# -- the two implementations of each task's model -------------------------------------------------------
def classify_models(name: str, size: int, num_classes: int = 1000) -> tuple[nn.Module, nn.Module]:
    from backbones import build_backbone

    return build_backbone(name, num_classes=num_classes), getattr(torchvision.models, name)(num_classes=num_classes)


def detect_models(name: str, size: int) -> tuple[nn.Module, nn.Module]:
    """Faster R-CNN R50-FPN as fine-tuned from ImageNet: frozen BN, stem and res2 frozen (torchvision's default).

    Both detectors resize the shorter side to ``size`` (800 in the COCO recipe), the longer to at most 1333.
    """
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
    from torchvision.ops import FrozenBatchNorm2d

    from tasks.detect import DetectionTask

    ours = DetectionTask(
        backbone=name, head="fpn", num_classes=90, norm="frozen_bn", freeze_at=2, min_size=size, max_size=1333
    ).detector
    trunk = getattr(torchvision.models, name)(norm_layer=FrozenBatchNorm2d)
    reference = FasterRCNN(
        _resnet_fpn_extractor(trunk, trainable_layers=3), num_classes=91, min_size=size, max_size=1333
    )
    return ours, reference


def segment_models(name: str, size: int) -> tuple[nn.Module, nn.Module]:
    from tasks.segment import SegmentationTask

    ours = SegmentationTask(backbone=name, head="dilated", num_classes=21, aux_loss=True).model
    builder = getattr(torchvision.models.segmentation, f"fcn_{name}")
    return ours, builder(weights=None, weights_backbone=None, aux_loss=True, num_classes=21)


# -- one training step per task ------------------------------------------------------------------------
def classify_step(model: nn.Module, batch: int, size: int, device: torch.device, channels_last: bool):
    images = torch.randn(batch, 3, size, size, device=device)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 1000, (batch,), device=device)
    return lambda: F.cross_entropy(model(images), labels)


def detect_step(model: nn.Module, batch: int, size: int, device: torch.device, channels_last: bool):
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, size, int(size * 1.5), generator=g).to(device) for _ in range(batch)]
    targets = []
    for _ in range(batch):
        xy = torch.rand(8, 2, generator=g) * torch.tensor([size * 1.2, size * 0.8])
        wh = 16 + torch.rand(8, 2, generator=g) * size / 3
        boxes = torch.cat([xy, xy + wh], 1)
        targets.append({"boxes": boxes.to(device), "labels": torch.randint(1, 91, (8,), generator=g).to(device)})
    return lambda: sum(model(images, targets).values())


def segment_step(model: nn.Module, batch: int, size: int, device: torch.device, channels_last: bool):
    images = torch.randn(batch, 3, size, size, device=device)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    masks = torch.randint(0, 21, (batch, size, size), device=device)

    def loss():
        out = model(images)
        return F.cross_entropy(out["out"], masks, ignore_index=255) + 0.5 * F.cross_entropy(
            out["aux"], masks, ignore_index=255
        )

    return loss


TASKS: dict[str, tuple[Callable, Callable, int]] = {
    # task: (models, step, default input size)
    "classify": (classify_models, classify_step, 224),
    "detect": (detect_models, detect_step, 800),
    "segment": (segment_models, segment_step, 480),
}


# -- measuring ----------------------------------------------------------------------------------------
class SavedTensorBytes:
    """Bytes of the tensors autograd saves for backward, each storage counted once."""

    def __init__(self) -> None:
        self.bytes = 0
        self._seen: set[int] = set()

    def pack(self, tensor: torch.Tensor):
        try:
            key = tensor.untyped_storage().data_ptr()
        except (RuntimeError, NotImplementedError):
            key = id(tensor)
        if key not in self._seen:
            self._seen.add(key)
            self.bytes += tensor.untyped_storage().nbytes()
        return tensor

    @staticmethod
    def unpack(tensor: torch.Tensor) -> torch.Tensor:
        return tensor


def measure(
    model: nn.Module,
    make_loss: Callable,
    *,
    device: torch.device,
    batch: int,
    size: int,
    precision: str,
    channels_last: bool,
    compile: bool,
    steps: int,
    warmup: int,
) -> dict:
    model = model.to(device).train()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if compile:
        model.compile()
    params = [p for p in model.parameters() if p.requires_grad]
    # the tasks' optimizer: SGD with its fused CUDA kernel on CUDA (tasks.core.optim.fused)
    optimizer = torch.optim.SGD(params, lr=1e-3, momentum=0.9, weight_decay=1e-4, fused=device.type == "cuda")
    loss_fn = make_loss(model, batch, size, device, channels_last)
    autocast = (
        torch.autocast(device_type=device.type, dtype=torch.bfloat16)
        if precision == "bf16"
        else contextlib.nullcontext()
    )

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            loss = loss_fn()
        loss.backward()
        optimizer.step()

    for _ in range(warmup):
        step()
    saved = SavedTensorBytes()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        with torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack):
            optimizer.zero_grad(set_to_none=True)
            with autocast:
                loss = loss_fn()
            loss.backward()
    # Steps back to back, as in training (the host queues the next step while the GPU runs this one),
    # timed in three rounds; the median round counts.
    rounds = []
    for part in (steps // 3 + steps % 3, steps // 3, steps // 3):
        if part == 0:
            continue
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(part):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        rounds.append((time.perf_counter() - start) / part)
    memory = torch.cuda.max_memory_allocated() if device.type == "cuda" else saved.bytes
    step_s = statistics.median(rounds)
    return {"img_per_s": batch / step_s, "peak_mem_mb": memory / 2**20, "step_s": step_s}


def run(args: argparse.Namespace) -> list[dict]:
    build, make_loss, default_size = TASKS[args.task]
    size = args.size or default_size
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = args.cudnn_benchmark  # the same for both implementations
    names = args.models or {"classify": ["resnet50"], "detect": ["resnet50"], "segment": ["resnet101"]}[args.task]
    rows = []
    for name in names:
        torch.manual_seed(0)
        ours, reference = build(name, size)
        settings = dict(
            device=device, batch=args.batch, size=size, precision=args.precision, channels_last=args.channels_last,
            compile=args.compile, steps=args.steps, warmup=args.warmup,
        )  # fmt: skip
        results = {}
        # alternate implementations so that drift in the machine's speed hits both alike
        for impl, model in (("torchvision", reference), ("ours", ours)):
            results[impl] = measure(model, make_loss, **settings)
            model.to("cpu")
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()
        row = {
            "benchmark": "train_step",
            "task": args.task,
            "model": name,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "batch": args.batch,
            "size": size,
            "precision": args.precision,
            "channels_last": args.channels_last,
            "compile": args.compile,
            "cudnn_benchmark": args.cudnn_benchmark,
            "ours_img_per_s": round(results["ours"]["img_per_s"], 2),
            "torchvision_img_per_s": round(results["torchvision"]["img_per_s"], 2),
            "speed_ratio": round(results["ours"]["img_per_s"] / results["torchvision"]["img_per_s"], 4),
            "ours_peak_mem_mb": round(results["ours"]["peak_mem_mb"], 1),
            "torchvision_peak_mem_mb": round(results["torchvision"]["peak_mem_mb"], 1),
            "memory_ratio": round(results["ours"]["peak_mem_mb"] / results["torchvision"]["peak_mem_mb"], 4),
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.train_step", description=__doc__.split("\n")[0])
    parser.add_argument("--task", choices=list(TASKS), default="classify")
    parser.add_argument("--models", nargs="*", help="zoo names (default: resnet50; resnet101 for segment)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=None, help="input size (default per task: 224, 800, 480)")
    parser.add_argument("--precision", choices=["32", "bf16"], default="32")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument(
        "--cudnn-benchmark", action="store_true", help="cuDNN algorithm search, as the classification task does"
    )
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict]:
    return run(parse_args(argv))


if __name__ == "__main__":
    main()
