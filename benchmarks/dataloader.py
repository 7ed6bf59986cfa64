"""Images/s of our ImageFolder training pipeline against torchvision's ImageFolder + PIL + classic transforms.

    python -m benchmarks.dataloader --images 512 --workers 0 4 8 [--root /tmp/jpegs] [--gpu-decode]

Both pipelines read the same generated ImageNet-sized JPEG files (about 500x375, ~110 KB) and produce
224x224 RandomResizedCrop + flip batches: torchvision's as normalized floats; ours as uint8, which the
datamodule normalizes after the transfer, on the device (``ours_img_per_s_with_cpu_normalize`` counts
that work on the CPU too, for CPU-only training). ``workers 0`` measures one worker in the main
process (decode + augment per core); more workers measure a ``DataLoader``. One JSON line per setting
with ``ratio`` = ours / torchvision. ``--gpu-decode`` adds the CUDA path of the datamodule
(``decode_device: cuda``): batched nvJPEG decoding and augmentation on the GPU.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader


def _write_jpeg(args: tuple[Path, int, int, int]) -> None:
    path, width, height, seed = args
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 255, (height // 25 + 1, width // 25 + 1, 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), np.float32)
    texture = rng.standard_normal((height, width, 3), dtype=np.float32) * 20
    Image.fromarray(np.clip(smooth + texture, 0, 255).astype(np.uint8)).save(path, quality=90)


def generate_jpegs(root: Path, count: int, classes: int = 8, seed: int = 0) -> Path:
    """Photo-like JPEGs (smooth structure plus texture) in an ImageFolder tree, 500x375 or 375x500.

    Each file is drawn from its own seed, so the set is the same however many processes write it.
    """
    existing = list(root.rglob("*.JPEG")) if root.exists() else []
    if len(existing) >= count:
        return root
    jobs = []
    for i in range(count):
        folder = root / "train" / f"n{i % classes:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        width, height = (500, 375) if i % 4 else (375, 500)
        jobs.append((folder / f"img_{i:06d}.JPEG", width, height, seed * 1_000_003 + i))
    processes = min(len(os.sched_getaffinity(0)), 16, max(1, count // 64))
    if processes > 1:
        with multiprocessing.get_context("spawn").Pool(processes) as pool:
            pool.map(_write_jpeg, jobs, chunksize=32)
    else:
        for job in jobs:
            _write_jpeg(job)
    return root


def ours_dataset(root: Path):
    from datamodules.folders import find_classes, list_samples
    from datamodules.imagefolder import ImageFolderDataset
    from datamodules.transforms import train_transform

    samples = list_samples(root / "train", find_classes(root / "train"))
    return ImageFolderDataset(samples, train_transform(augment="random_resized_crop", image_size=224))


def torchvision_dataset(root: Path):
    from torchvision import datasets, transforms

    transform = transforms.Compose(
        [
            transforms.RandomResizedCrop(224),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
        ]
    )
    return datasets.ImageFolder(str(root / "train"), transform=transform)


def _collate_ours(batch):
    return torch.stack([b["image"] for b in batch]), torch.tensor([b["label"] for b in batch])


def throughput(dataset, workers: int, batch: int, collate=None, limit: int | None = None, finish=None) -> float:
    """Images per second through a DataLoader (``workers=0``: in the main process), after one warm-up batch."""
    loader = DataLoader(
        dataset, batch_size=batch, shuffle=True, num_workers=workers, collate_fn=collate,
        persistent_workers=False, drop_last=True,
    )  # fmt: skip
    iterator = iter(loader)
    next(iterator)
    count, start = 0, time.perf_counter()
    for images, _ in iterator:
        if finish is not None:
            images = finish(images)
        count += len(images)
        if limit and count >= limit:
            break
    return count / (time.perf_counter() - start)


def run(args: argparse.Namespace) -> list[dict]:
    root = generate_jpegs(Path(args.root), args.images)
    files = list((root / "train").rglob("*.JPEG"))
    mean_kb = sum(f.stat().st_size for f in files) / len(files) / 1024
    torch.set_num_threads(1)  # one core per worker, as a DataLoader worker has
    rows = []
    for workers in args.workers:
        from datamodules.transforms import Normalize

        ours = throughput(ours_dataset(root), workers, args.batch, _collate_ours)
        ours_cpu = throughput(ours_dataset(root), workers, args.batch, _collate_ours, finish=Normalize())
        reference = throughput(torchvision_dataset(root), workers, args.batch)
        row = {
            "benchmark": "dataloader",
            "workers": workers,
            "images": len(files),
            "mean_file_kb": round(mean_kb, 1),
            "ours_img_per_s": round(ours, 1),
            "ours_img_per_s_with_cpu_normalize": round(ours_cpu, 1),
            "torchvision_pil_img_per_s": round(reference, 1),
            "ratio": round(ours / reference, 3),
            "ratio_with_cpu_normalize": round(ours_cpu / reference, 3),
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
    if args.gpu_decode and torch.cuda.is_available():
        rows.append(gpu_decode_throughput(root, args.batch))
    if args.train_step and torch.cuda.is_available():
        rows.append(train_on_jpegs(root, args.batch, args.train_step, cpu_shares=args.cpu_share))
    return rows


def train_on_jpegs(
    root: Path,
    batch: int,
    steps: int,
    model_name: str = "resnet50",
    workers: int = 12,
    cpu_shares: Sequence[float] = (),
    device: str = "cuda",
) -> dict:
    """ResNet-50 training img/s fed by the GPU decoding path, against synthetic inputs, same process.

    bf16 autocast, channels_last, SGD; the real-data loop is what Lightning runs: the prefetching
    loader's batch (or, ``ratio_inline``, the batch decoded in the training thread as without
    ``gpu_prefetch``), normalized on the device, then the step. The loader is made once and iterated
    for every epoch, as Lightning does. Also measured: the CPU-decoding loader (``ratio_cpu_decode``:
    ``decode_device: cpu`` with the same workers) and, for each of ``cpu_shares``, the GPU path with
    that share of the images decoded by the workers (``ratio_cpu_share_<s>``).
    """
    import torch.nn.functional as F

    from backbones import build_backbone
    from datamodules import ImageFolderDataModule
    from datamodules.transforms import Normalize

    torch.set_num_threads(4)
    device = torch.device(device)
    model = build_backbone(model_name, num_classes=1000).to(device).to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, fused=True)

    def step(images: torch.Tensor, labels: torch.Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(images.contiguous(memory_format=torch.channels_last)), labels)
        loss.backward()
        optimizer.step()

    synthetic = torch.randint(0, 256, (batch, 3, 224, 224), dtype=torch.uint8, device=device)
    labels = torch.randint(0, 8, (batch,), device=device)
    norm = Normalize()

    def timed(batches) -> float:
        count = 0
        for i, (images, target) in enumerate(batches):
            if i == 3:
                torch.cuda.synchronize()
                start = time.perf_counter()
            if i >= 3:
                count += len(target)
            step(norm(images, train=True), target)
            if i >= steps + 3:
                break
        torch.cuda.synchronize()
        return count / (time.perf_counter() - start)

    def jpeg_batches(prefetch: bool, decode_device: str = "cuda", cpu_share: float = 0.0):
        """What Lightning runs: one loader for every epoch, decoded by the prefetch thread or inline."""
        dm = ImageFolderDataModule(
            root=str(root), val_dir="train", batch_size=batch, num_workers=workers, decode_device=decode_device,
            gpu_prefetch=prefetch, cpu_share=cpu_share,
        )  # fmt: skip
        dm.setup("fit")
        loader = dm.train_dataloader()
        for _ in range(1000):
            for b in loader:
                if decode_device == "cpu":  # uint8 crops from the workers, pinned: copied as Lightning does
                    b = {"image": b["image"].to(device, non_blocking=True), "label": b["label"].to(device)}
                elif not prefetch:  # decoded in the training thread, on the current stream
                    b = dm.decoding.prepare(b, device, train=True)
                yield b["image"], b["label"]

    synthetic_rate = timed((synthetic, labels) for _ in range(steps + 4))
    real_rate = timed(jpeg_batches(prefetch=True))
    inline_rate = timed(jpeg_batches(prefetch=False))
    cpu_rate = timed(jpeg_batches(prefetch=False, decode_device="cpu"))
    shares = {share: timed(jpeg_batches(prefetch=True, cpu_share=share)) for share in cpu_shares}
    row = {
        "benchmark": "train_on_jpegs",
        "device": torch.cuda.get_device_name(),
        "model": model_name,
        "batch": batch,
        "workers": workers,
        "synthetic_img_per_s": round(synthetic_rate, 1),
        "jpeg_gpu_decode_img_per_s": round(real_rate, 1),
        "ratio": round(real_rate / synthetic_rate, 3),
        "jpeg_gpu_decode_inline_img_per_s": round(inline_rate, 1),
        "ratio_inline": round(inline_rate / synthetic_rate, 3),
        "jpeg_cpu_decode_img_per_s": round(cpu_rate, 1),
        "ratio_cpu_decode": round(cpu_rate / synthetic_rate, 3),
        **{f"ratio_cpu_share_{share:g}": round(rate / synthetic_rate, 3) for share, rate in shares.items()},
    }
    print(json.dumps(row), flush=True)
    return row


def gpu_decode_throughput(root: Path, batch: int) -> dict:
    """The datamodule's CUDA path: raw bytes from the loader, nvJPEG + augmentation on the GPU."""
    from datamodules import ImageFolderDataModule

    dm = ImageFolderDataModule(root=str(root), val_dir="train", batch_size=batch, num_workers=12, decode_device="cuda")
    dm.setup("fit")
    count, start = 0, None
    for i, gpu in enumerate(dm.train_dataloader()):  # the prefetching loader: decoded on the GPU
        gpu = dm.on_after_batch_transfer(gpu, 0)
        if i == 1:
            torch.cuda.synchronize()
            start = time.perf_counter()
        elif i > 1:
            count += len(gpu["label"])
    torch.cuda.synchronize()
    row = {
        "benchmark": "dataloader_gpu_decode",
        "batch": batch,
        "img_per_s": round(count / (time.perf_counter() - start), 1),
    }
    print(json.dumps(row), flush=True)
    return row


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.dataloader", description=__doc__.split("\n")[0])
    parser.add_argument("--root", default="/tmp/residual-zoo-jpegs")
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument(
        "--workers", type=int, nargs="*", default=[0, 2], help="loader settings to compare (none: skip)"
    )
    parser.add_argument("--gpu-decode", action="store_true")
    parser.add_argument("--train-step", type=int, default=0, help="also time N ResNet-50 steps on the JPEGs (CUDA)")
    parser.add_argument(
        "--cpu-share",
        type=float,
        nargs="*",
        default=[],
        help="with --train-step: also time these data.cpu_share values",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict]:
    return run(parse_args(argv))


if __name__ == "__main__":
    main()
