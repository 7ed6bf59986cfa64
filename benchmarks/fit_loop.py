"""Whole training loops: ``tasks.classify`` under Lightning's ``Trainer`` against torchvision's reference loop.

    python -m benchmarks.fit_loop --models resnet50 --device cuda --batch 256 [--no-progress-bar]

``benchmarks.train_step`` compares the networks; this compares what a user runs. Both loops read the
same in-memory uint8 batches through a ``DataLoader`` (pinned on CUDA), normalize them on the device
with the datamodules' ``Normalize``, and train the same network (ours vs torchvision's) with SGD (lr
0.1 per 256 images, momentum 0.9, fused on CUDA as the task makes it), bf16 autocast and channels_last
on CUDA. The reference loop is ``references/classification/train.py``'s ``train_one_epoch``: forward,
loss, backward, step, then its per-step logging (``loss.item()`` and top-1/top-5 accuracy
``.item()``). Ours is ``ClassificationTask`` fitted by a ``Trainer`` with the task's defaults (per-step
loss check, ``train/loss`` on the progress bar, torchmetrics accuracy, learning-rate logging); no
logger or checkpoints, so only the loop is compared. Timing starts after ``--warmup`` steps and ends
after ``--steps`` more, with a device synchronization at both ends; the loops run ``--repeats``
times, alternated, and the median run of each counts. One JSON line per model with ``speed_ratio`` =
ours / torchvision.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time

import torch
import torch.nn.functional as F
import torchvision
from torch.utils.data import DataLoader, Dataset


class SyntheticBatches(Dataset):
    """``count`` ready-made batches of random uint8 images and labels (the loader's ``batch_size=None``)."""

    def __init__(self, count: int, batch: int, size: int, num_classes: int = 1000) -> None:
        g = torch.Generator().manual_seed(0)
        distinct = min(count, 4)  # a few distinct batches, cycled: memory stays small at batch 256
        shape = (batch, 3, size, size)
        self.images = [torch.randint(0, 256, shape, dtype=torch.uint8, generator=g) for _ in range(distinct)]
        self.labels = [torch.randint(0, num_classes, (batch,), generator=g) for _ in range(distinct)]
        self.count = count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> dict:
        i = index % len(self.images)
        return {"image": self.images[i], "label": self.labels[i]}


def make_loader(count: int, batch: int, size: int, device: torch.device) -> DataLoader:
    return DataLoader(SyntheticBatches(count, batch, size), batch_size=None, pin_memory=device.type == "cuda")


def lr(batch: int) -> float:
    """The ImageNet recipe's 0.1 per 256 images, scaled linearly (Goyal et al. 2017)."""
    return 0.1 * batch / 256


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reference_loop(
    name: str, *, device: torch.device, batch: int, size: int, steps: int, warmup: int, init: dict | None = None
) -> dict:
    """torchvision's ``train_one_epoch`` at the same settings (``init``: starting weights)."""
    from datamodules.transforms import Normalize

    cuda = device.type == "cuda"
    model = getattr(torchvision.models, name)(num_classes=1000)
    if init is not None:
        model.load_state_dict(init)
    model = model.to(device)
    if cuda:
        model = model.to(memory_format=torch.channels_last)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr(batch), momentum=0.9, weight_decay=1e-4, fused=cuda)
    normalize = Normalize()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
    meters: dict[str, float] = {"loss": 0.0, "acc1": 0.0, "acc5": 0.0}
    done, start = 0, None
    for i, data in enumerate(make_loader(warmup + steps, batch, size, device)):
        if i == warmup:
            _sync(device)
            start = time.perf_counter()
        images = data["image"].to(device, non_blocking=True)
        target = data["label"].to(device, non_blocking=True)
        images = normalize(images)
        if cuda:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast:
            output = model(images)
            loss = F.cross_entropy(output, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        # the reference's MetricLogger updates: host values every step
        top5 = output.topk(5, dim=1).indices
        correct = top5.eq(target[:, None])
        meters["loss"] = loss.item()
        meters["acc1"] = correct[:, 0].float().mean().item() * 100
        meters["acc5"] = correct.any(dim=1).float().mean().item() * 100
        done += i >= warmup
    _sync(device)
    seconds = time.perf_counter() - start
    return {"img_per_s": done * batch / seconds, "steps": done, "model": model}


def task_loop(
    name: str,
    *,
    device: torch.device,
    batch: int,
    size: int,
    steps: int,
    warmup: int,
    progress_bar: bool = True,
    init: dict | None = None,
) -> dict:
    """``ClassificationTask`` fitted by Lightning, timed by a callback from step ``warmup`` to the end."""
    import lightning.pytorch as pl

    from datamodules.transforms import Normalize
    from tasks.classify import ClassificationTask

    class Data(pl.LightningDataModule):
        def train_dataloader(self) -> DataLoader:
            return make_loader(warmup + steps, batch, size, device)

        def on_after_batch_transfer(self, data: dict, dataloader_idx: int) -> dict:
            data["image"] = Normalize()(data["image"])  # as ImageFolderDataModule does
            return data

    class Clock(pl.Callback):
        start: float | None = None
        steps = 0

        def on_train_batch_start(self, trainer, module, data, batch_idx: int) -> None:
            if batch_idx == warmup:
                _sync(device)
                self.start = time.perf_counter()
            self.steps += batch_idx >= warmup

        def on_train_end(self, trainer, module) -> None:
            _sync(device)
            self.seconds = time.perf_counter() - self.start

    def sgd(params):
        return torch.optim.SGD(params, lr=lr(batch), momentum=0.9, weight_decay=1e-4)

    def constant(optimizer):  # the reference loop keeps its rate: no default warm-up or decay here either
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)

    cuda = device.type == "cuda"
    task = ClassificationTask(
        backbone=name, num_classes=1000, optimizer=sgd, scheduler=constant, weight_decay_norm_bias=True
    )
    if init is not None:
        task.backbone.load_state_dict(init)
    clock = Clock()
    trainer = pl.Trainer(
        accelerator=device.type,
        devices=1,
        precision="bf16-mixed" if cuda else "32-true",
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=progress_bar,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        benchmark=cuda,
        callbacks=[clock],
    )
    trainer.fit(task, datamodule=Data())
    return {"img_per_s": clock.steps * batch / clock.seconds, "steps": clock.steps, "model": task.backbone}


def median_run(runs: list[dict]) -> dict:
    return sorted(runs, key=lambda r: r["img_per_s"])[len(runs) // 2]


def run(args: argparse.Namespace) -> list[dict]:
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = device.type == "cuda"  # what the classification task sets; both alike
    rows = []
    for name in args.models:
        settings = dict(device=device, batch=args.batch, size=args.size, steps=args.steps, warmup=args.warmup)
        runs: dict[str, list[dict]] = {"torchvision": [], "ours": []}
        for _ in range(args.repeats):  # alternated, so that drift in the machine's speed hits both alike
            torch.manual_seed(0)
            runs["torchvision"].append(reference_loop(name, **settings))
            if device.type == "cuda":
                torch.cuda.empty_cache()
            torch.manual_seed(0)
            runs["ours"].append(task_loop(name, progress_bar=args.progress_bar, **settings))
            if device.type == "cuda":
                torch.cuda.empty_cache()
        reference, ours = (median_run(runs[k]) for k in ("torchvision", "ours"))
        row = {
            "benchmark": "fit_loop",
            "model": name,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "batch": args.batch,
            "size": args.size,
            "precision": "bf16-mixed" if device.type == "cuda" else "32-true",
            "progress_bar": args.progress_bar,
            "steps": args.steps,
            "repeats": args.repeats,
            "ours_steps": ours["steps"],
            "torchvision_steps": reference["steps"],
            "ours_img_per_s": round(ours["img_per_s"], 2),
            "torchvision_img_per_s": round(reference["img_per_s"], 2),
            "speed_ratio": round(ours["img_per_s"] / reference["img_per_s"], 4),
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.fit_loop", description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["resnet50"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each loop, alternated; the median counts")
    parser.add_argument("--no-progress-bar", dest="progress_bar", action="store_false")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict]:
    return run(parse_args(argv))


if __name__ == "__main__":
    main()
