"""What ``predict`` and ``test`` write, for every task: top-k classes (CSV or JSON), COCO-format detections
(JSON), class-index masks (PNG), and pictures of them (boxes drawn, mask overlays).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import torch


def write_predictions(rows: list[dict], path: Path) -> None:
    """Top-k predictions per image as CSV (one row per image) or JSON (a list), by ``path``'s suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".json":
        path.write_text(json.dumps(rows, indent=1))
        return
    k = max((len(r["classes"]) for r in rows), default=5)
    header = ["path"] + [f"{kind}{i}" for i in range(1, k + 1) for kind in ("class", "score")]
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for r in rows:
            writer.writerow([r["path"]] + [v for pair in zip(r["classes"], r["scores"]) for v in pair])


def write_detections(results: list[dict], path: Path) -> Path:
    """COCO-format detections (``image_id``, ``category_id``, ``bbox`` as ``x, y, w, h``, ``score``) as JSON."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results))
    print(f"detections: {path} ({len(results)} boxes)")
    return path


def images_folder(path: Path) -> Path:
    """The folder of pictures written beside the result file ``path`` (``detections_images/``)."""
    return path.parent / f"{path.with_suffix('').name}_images"


def draw_detections(image: torch.Tensor, out: dict, names: list[str], path: Path, threshold: float = 0.5) -> None:
    """``image`` with the detections scoring at least ``threshold`` drawn (``tasks.outputs.drawing``), as a JPEG."""
    from .drawing import draw_detections as draw

    path.parent.mkdir(parents=True, exist_ok=True)
    draw(image, out, names, threshold).save(path, quality=90)


def write_mask(mask: torch.Tensor, path: Path) -> None:
    """A ``1 x H x W`` uint8 class-index mask as a PNG."""
    from torchvision.io import encode_png, write_file

    path.parent.mkdir(parents=True, exist_ok=True)
    write_file(str(path), encode_png(mask))


def write_overlay(image: torch.Tensor, mask: torch.Tensor, names: list[str], path: Path) -> None:
    """``image`` (uint8) half-blended with the mask's class colors, with a legend (``tasks.outputs.drawing``)."""
    from .drawing import draw_overlay

    path.parent.mkdir(parents=True, exist_ok=True)
    draw_overlay(image, mask, names).save(path, quality=90)
