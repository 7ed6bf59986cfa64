"""What ``predict`` and ``test`` write, for every task: top-k classes (CSV or JSON), COCO-format detections
(JSON), class-index masks (PNG), and pictures of them (boxes drawn, mask overlays).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import torch

from .media import class_palette


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
    """``image`` (``3 x H x W`` in [0, 1]) with the detections scoring above ``threshold`` drawn, as a JPEG."""
    from torchvision.io import write_jpeg
    from torchvision.utils import draw_bounding_boxes

    keep = out["scores"] > threshold
    labels = [f"{names[int(lbl)]} {float(s):.2f}" for lbl, s in zip(out["labels"][keep], out["scores"][keep])]
    canvas = (image.detach().cpu().clamp(0, 1) * 255).to(torch.uint8)
    drawn = (
        draw_bounding_boxes(canvas, out["boxes"][keep].cpu(), labels=labels, colors="red", width=2)
        if keep.any()
        else canvas
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    write_jpeg(drawn, str(path), quality=90)


def write_mask(mask: torch.Tensor, path: Path) -> None:
    """A ``1 x H x W`` uint8 class-index mask as a PNG."""
    from torchvision.io import encode_png, write_file

    path.parent.mkdir(parents=True, exist_ok=True)
    write_file(str(path), encode_png(mask))


def write_overlay(image: torch.Tensor, mask: torch.Tensor, num_classes: int, path: Path) -> None:
    """``image`` (uint8) half-blended with the mask's class colors, as a JPEG."""
    from torchvision.io import write_jpeg

    colors = class_palette(num_classes)[mask[0].long()].permute(2, 0, 1)
    blend = (0.5 * image.float() + 0.5 * colors.float()).to(torch.uint8)
    write_jpeg(blend, str(path), quality=90)
