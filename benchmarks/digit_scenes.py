"""Data this project did not prepare, for the flags-only measurements in the README: scikit-learn's handwritten
digits (1,797 8x8 scans) drawn into COCO-format scenes with a polygon mask per digit.

    pip install scikit-learn opencv-python-headless   # for this script only
    python -m benchmarks.digit_scenes digits_coco --train 400 --val 60 --size 160

Each scene is ``size`` pixels square on a noisy paper-like background, with 2 to 4 digits, each scaled to 24-48
px, inked in a random dark color and kept apart; the training scenes use the first 1,437 scans, the validation
scenes the last 360 (no scan in both). A digit's mask is its ink (the scan upscaled, above a quarter of full
darkness), its polygon the outer contour OpenCV traces on it (COCO's polygons have no holes: a 0's or 8's hole
is inside its mask), its box and area those of the polygon (pycocotools). The layout is COCO 2017's:
``train2017/``, ``val2017/``, ``annotations/instances_{train,val}2017.json``; categories ``0`` .. ``9`` with ids
1 .. 10.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image


def _requirements():
    try:
        import cv2
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise SystemExit(
            f"benchmarks.digit_scenes needs scikit-learn and OpenCV ({err.name} is missing): "
            f"pip install scikit-learn opencv-python-headless"
        ) from None
    return cv2, load_digits


def _polygon(cv2, mask: np.ndarray) -> list[float] | None:
    """The largest outer contour of ``mask`` as a COCO polygon (x, y pairs at pixel corners), or None."""
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    contours = [c for c in contours if len(c) >= 3]
    if not contours:
        return None
    points = max(contours, key=cv2.contourArea).reshape(-1, 2).astype(float) + 0.5
    return [round(float(v), 2) for v in points.flatten()]


def write_split(root: Path, split: str, scans: np.ndarray, labels: np.ndarray, scenes: int, size: int,
                seed: int, first_id: int) -> int:  # fmt: skip
    """``scenes`` scenes of ``split`` under ``root`` and its annotation file; the next free annotation id."""
    cv2, _ = _requirements()
    from pycocotools import mask as mask_utils

    rng = np.random.default_rng(seed)
    folder = root / split
    folder.mkdir(parents=True, exist_ok=True)
    images, annotations, ann_id = [], [], first_id
    for image_id in range(1, scenes + 1):
        paper = rng.uniform(170, 240, 3)
        canvas = np.clip(paper + rng.normal(0, 8, (size, size, 3)), 0, 255)
        taken: list[tuple[int, int, int, int]] = []
        for _ in range(int(rng.integers(2, 5))):
            k = int(rng.integers(len(scans)))
            side = int(rng.integers(24, 49))
            for _attempt in range(20):
                x, y = (int(v) for v in rng.integers(0, size - side, 2))
                if all(x + side <= a or a + c <= x or y + side <= b or b + c <= y for a, b, c, _ in taken):
                    break
            else:
                continue
            taken.append((x, y, side, k))
            ink = np.asarray(Image.fromarray((scans[k] * 16).astype(np.uint8)).resize((side, side), Image.BILINEAR))
            darkness = ink.astype(float) / 255.0
            color = rng.uniform(0, 90, 3)
            region = canvas[y : y + side, x : x + side]
            region[:] = region * (1 - darkness[..., None]) + color * darkness[..., None]
            mask = np.zeros((size, size), dtype=np.uint8)
            mask[y : y + side, x : x + side] = darkness > 0.25
            polygon = _polygon(cv2, mask)
            if polygon is None:
                continue
            rle = mask_utils.merge(mask_utils.frPyObjects([polygon], size, size))
            annotations.append({
                "id": ann_id, "image_id": image_id, "category_id": int(labels[k]) + 1, "iscrowd": 0,
                "segmentation": [polygon], "area": float(mask_utils.area(rle)),
                "bbox": [round(float(v), 2) for v in mask_utils.toBbox(rle)],
            })  # fmt: skip
            ann_id += 1
        name = f"{image_id:012d}.jpg"
        Image.fromarray(canvas.astype(np.uint8)).save(folder / name, quality=92)
        images.append({"id": image_id, "file_name": name, "width": size, "height": size})
    categories = [{"id": d + 1, "name": str(d), "supercategory": "digit"} for d in range(10)]
    (root / "annotations").mkdir(exist_ok=True)
    path = root / "annotations" / f"instances_{split}.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return ann_id


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.digit_scenes", description=__doc__.split("\n\n")[0])
    parser.add_argument("root", help="the folder to write (COCO 2017's layout)")
    parser.add_argument("--train", type=int, default=400, help="training scenes")
    parser.add_argument("--val", type=int, default=60, help="validation scenes")
    parser.add_argument("--size", type=int, default=160, help="scene side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    _, load_digits = _requirements()
    digits = load_digits()
    root = Path(args.root)
    next_id = write_split(root, "train2017", digits.images[:1437], digits.target[:1437], args.train, args.size,
                          args.seed, 1)  # fmt: skip
    write_split(root, "val2017", digits.images[1437:], digits.target[1437:], args.val, args.size, args.seed + 1,
                next_id)  # fmt: skip
    print(f"wrote {root}: {args.train} training and {args.val} validation scenes of {args.size} px")


if __name__ == "__main__":
    main()
