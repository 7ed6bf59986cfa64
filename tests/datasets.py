"""Tiny datasets in the real on-disk formats, written by the tests themselves."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from datamodules.shapes import generate_classification


def write_cifar(root: Path, dataset: str = "cifar10", per_batch: int = 8, test: int = 12, seed: int = 0) -> Path:
    """CIFAR's python batches exactly as distributed: pickled dicts with bytes keys and uint8 rows."""
    rng = np.random.default_rng(seed)
    classes = 10 if dataset == "cifar10" else 100
    label_key = b"labels" if dataset == "cifar10" else b"fine_labels"

    def batch(n: int, name: str) -> dict:
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = [int(x) for x in rng.integers(0, classes, n)]
        out = {b"batch_label": name.encode(), label_key: labels, b"data": data, b"filenames": [b"x.png"] * n}
        if dataset == "cifar100":
            out[b"coarse_labels"] = [x // 5 for x in labels]
        return out

    if dataset == "cifar10":
        folder = root / "cifar-10-batches-py"
        files = {f"data_batch_{i}": batch(per_batch, f"training batch {i} of 5") for i in range(1, 6)}
        files["test_batch"] = batch(test, "testing batch 1 of 1")
        files["batches.meta"] = {b"label_names": [f"class{i}".encode() for i in range(10)], b"num_vis": 3072}
    else:
        folder = root / "cifar-100-python"
        files = {"train": batch(per_batch * 5, "training batch 1 of 1"), "test": batch(test, "testing batch 1 of 1")}
        files["meta"] = {
            b"fine_label_names": [f"fine{i}".encode() for i in range(100)],
            b"coarse_label_names": [f"coarse{i}".encode() for i in range(20)],
        }
    folder.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        with open(folder / name, "wb") as f:
            pickle.dump(content, f, protocol=2)
    return root


def write_imagefolder(root: Path, per_class: int = 4, val_per_class: int = 2, size: int = 32, seed: int = 0) -> Path:
    """A 5-class ImageFolder tree of real JPEG files (the shapes generator)."""
    return generate_classification(root, train_per_class=per_class, val_per_class=val_per_class, size=size, seed=seed)
