"""Time of our COCO box evaluation with pycocotools against faster-coco-eval, on the same detections.

    python -m benchmarks.coco_eval --images 5000 --detections 100000

A COCO-format ground truth (80 non-contiguous categories, ~7 boxes per image, a few crowds) and noisy
detections around it (plus false positives) are generated; both backends evaluate them through
``tasks.metrics.coco.evaluate_detections`` (the tasks' code path). One JSON line: seconds per backend, the
speed-up, and the largest difference between the twelve COCOeval numbers (they must agree).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np


def generate(root: Path, images: int, detections: int, seed: int = 0) -> tuple[Path, list[dict]]:
    rng = np.random.default_rng(seed)
    category_ids = [i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]
    gt_images, annotations = [], []
    for image_id in range(1, images + 1):
        gt_images.append({"id": image_id, "width": 640, "height": 480, "file_name": f"{image_id:012d}.jpg"})
        for _ in range(rng.integers(1, 14)):
            w, h = rng.uniform(8, 300), rng.uniform(8, 300)
            x, y = rng.uniform(0, 640 - w), rng.uniform(0, 480 - h)
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": int(rng.choice(category_ids)),
                "bbox": [x, y, w, h], "area": w * h, "iscrowd": int(rng.random() < 0.01),
            })  # fmt: skip
    path = root / "instances.json"
    path.write_text(json.dumps({
        "images": gt_images, "annotations": annotations,
        "categories": [{"id": c, "name": f"c{c}"} for c in category_ids],
    }))  # fmt: skip
    results = []
    per_image = max(1, detections // images)
    by_image: dict[int, list[dict]] = {}
    for ann in annotations:
        by_image.setdefault(ann["image_id"], []).append(ann)
    for image_id in range(1, images + 1):
        truths = by_image.get(image_id, [])
        for k in range(per_image):
            if truths and k < 2 * len(truths):
                x, y, w, h = truths[k % len(truths)]["bbox"]
                box = [
                    x + rng.normal(0, 0.1 * w),
                    y + rng.normal(0, 0.1 * h),
                    w * rng.uniform(0.8, 1.2),
                    h * rng.uniform(0.8, 1.2),
                ]
                category = (
                    truths[k % len(truths)]["category_id"] if rng.random() < 0.8 else int(rng.choice(category_ids))
                )
            else:
                w, h = rng.uniform(8, 200), rng.uniform(8, 200)
                box, category = [rng.uniform(0, 600), rng.uniform(0, 440), w, h], int(rng.choice(category_ids))
            results.append({"image_id": image_id, "category_id": category, "bbox": [round(float(v), 2) for v in box],
                            "score": round(float(rng.random()), 4)})  # fmt: skip
    return path, results


def run(args: argparse.Namespace) -> dict:
    from tasks.metrics.coco import evaluate_detections, ground_truth

    with tempfile.TemporaryDirectory() as tmp:
        path, results = generate(Path(tmp), args.images, args.detections)
        image_ids = list(range(1, args.images + 1))
        timings, stats = {}, {}
        for backend in ("pycocotools", "faster_coco_eval"):
            ground_truth(path, backend)  # loading the annotation file is not part of an evaluation
            start = time.perf_counter()
            stats[backend] = evaluate_detections(path, results, image_ids, backend)
            timings[backend] = time.perf_counter() - start
    row = {
        "benchmark": "coco_eval",
        "images": args.images,
        "detections": len(results),
        "pycocotools_s": round(timings["pycocotools"], 3),
        "faster_coco_eval_s": round(timings["faster_coco_eval"], 3),
        "speedup": round(timings["pycocotools"] / timings["faster_coco_eval"], 2),
        "max_stat_difference": max(abs(a - b) for a, b in zip(stats["pycocotools"], stats["faster_coco_eval"])),
        "mAP": round(stats["faster_coco_eval"][0], 4),
    }
    print(json.dumps(row), flush=True)
    return row


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.coco_eval", description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--detections", type=int, default=100000)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    return run(parse_args(argv))


if __name__ == "__main__":
    main()
