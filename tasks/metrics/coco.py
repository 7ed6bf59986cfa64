"""COCO detection and instance segmentation metrics from ``COCOeval`` against the annotation file
(pycocotools or faster-coco-eval).

Nothing is re-derived: detections are converted to COCO's results format (``image_id``,
``category_id``, ``bbox`` as ``[x, y, w, h]``, ``score``, and for instance masks ``segmentation`` as a
compressed RLE at the image's size), loaded into the ground truth's ``COCO`` object
with ``loadRes`` and evaluated by the library's ``COCOeval`` restricted to the images that were
evaluated (``iouType`` ``bbox`` or ``segm``). The twelve standard numbers come back; the tasks log them as
``mAP``, ``AP50``, ``AP75``, ``APs``, ``APm``, ``APl`` and ``AR1``, ``AR10``, ``AR100``, ``ARs``, ``ARm``,
``ARl``, and each category's AP and AP50 from the same run's precision array.
"""

from __future__ import annotations

import contextlib
import io
from functools import lru_cache
from pathlib import Path
from typing import Literal

import torch

from .curves import PRCurve

Backend = Literal["faster_coco_eval", "pycocotools"]
METRIC_NAMES: tuple[str, ...] = ("mAP", "AP50", "AP75", "APs", "APm", "APl")
#: ``stats[6:12]``: average recall at 1, 10 and 100 detections per image, and at 100 by object size
RECALL_NAMES: tuple[str, ...] = ("AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


@lru_cache(maxsize=4)
def _ground_truth(path: str, backend: Backend, mtime: float):
    with contextlib.redirect_stdout(io.StringIO()):
        if backend == "pycocotools":
            from pycocotools.coco import COCO
        else:
            from faster_coco_eval import COCO
        return COCO(path)


def ground_truth(path: str | Path, backend: Backend = "faster_coco_eval"):
    """The annotation file as the backend's ``COCO`` object (cached while the file is unchanged)."""
    path = Path(path)
    return _ground_truth(str(path.resolve()), backend, path.stat().st_mtime)


def to_coco_results(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    labels: torch.Tensor,
    image_id: int,
    label_to_category: list[int],
    masks: torch.Tensor | None = None,
) -> list[dict]:
    """One image's detections (``x1, y1, x2, y2`` boxes, contiguous labels) as COCO result entries; with
    ``masks`` (``K x 1 x H x W`` probabilities at the image's size, Mask R-CNN's), each entry also carries its
    mask cut at 0.5 as ``segmentation``, a compressed RLE (:func:`encode_masks`)."""
    boxes = boxes.detach().float().cpu()
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
    rows = [
        {
            "image_id": int(image_id),
            "category_id": int(label_to_category[int(label)]),
            "bbox": [round(v, 3) for v in box],
            "score": round(float(score), 5),
        }
        for box, score, label in zip(xywh, scores.detach().float().cpu().tolist(), labels.cpu().tolist())
    ]
    if masks is not None:
        for row, rle in zip(rows, encode_masks(masks)):
            row["segmentation"] = rle
    return rows


def encode_masks(masks: torch.Tensor) -> list[dict]:
    """``K x 1 x H x W`` mask probabilities (or ``K x H x W`` booleans) as COCO's compressed RLE, one per
    mask (``size`` ``[H, W]``, ``counts`` as text): the pixels above 0.5, encoded by pycocotools."""
    import numpy as np
    from pycocotools import mask as mask_utils

    masks = masks.detach().cpu()
    binary = (masks[:, 0] > 0.5) if masks.dim() == 4 else masks.bool()
    if not len(binary):
        return []
    encoded = mask_utils.encode(np.asfortranarray(binary.permute(1, 2, 0).numpy().astype(np.uint8)))
    return [{"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")} for rle in encoded]


def result_rows(results: list[dict], iou_type: str) -> list[dict]:
    """The entries COCOeval's ``iou_type`` reads: for ``bbox`` without ``segmentation``, for ``segm`` without
    ``bbox`` (``loadRes`` takes a row with a ``bbox`` as a box result, and its area from the box, which would
    sort masks into the wrong size ranges)."""
    drop = "segmentation" if iou_type == "bbox" else "bbox"
    return [{k: v for k, v in r.items() if k != drop} for r in results if iou_type == "bbox" or "segmentation" in r]


def evaluate_detections(
    annotation_file: str | Path,
    results: list[dict],
    image_ids: list[int],
    backend: Backend = "faster_coco_eval",
    iou_type: str = "bbox",
) -> list[float]:
    """``COCOeval(...).stats`` (12 numbers) for ``results`` on the images ``image_ids``."""
    return evaluate_coco(annotation_file, results, image_ids, backend, iou_type)[0]


def evaluate_coco(
    annotation_file: str | Path,
    results: list[dict],
    image_ids: list[int],
    backend: Backend = "faster_coco_eval",
    iou_type: str = "bbox",
    curves: list[PRCurve] | None = None,
) -> tuple[list[float], dict[int, tuple[float, float]]]:
    """``COCOeval(...).stats`` (12 numbers) and, from the same run, each category's ``(AP, AP50)``; given a
    ``curves`` list, the run's precision-recall curves are appended to it (:func:`precision_recall_curves`).

    The per-category numbers are what COCOeval's ``summarize`` averages: the precision array
    ``eval["precision"][T, R, K, A, M]`` at all areas and 100 detections, over the IoU thresholds
    (AP) or at IoU 0.5 (AP50), over the recall points, skipping COCOeval's -1 (no ground truth): the mean
    precision of the category's curves at IoU 0.50:0.95 and 0.50.
    With no detections at all every AP is 0 (there is nothing to rank); images without ground truth
    are part of ``image_ids`` like any other, as in COCOeval.
    """
    gt = ground_truth(annotation_file, backend)
    if not results:
        return [0.0] * 12, {}
    with contextlib.redirect_stdout(io.StringIO()):
        dt = gt.loadRes(result_rows(results, iou_type))  # new dicts: loadRes adds keys to the ones it gets
        if backend == "pycocotools":
            from pycocotools.cocoeval import COCOeval

            evaluator = COCOeval(gt, dt, iouType=iou_type)
        else:
            from faster_coco_eval import COCOeval_faster

            evaluator = COCOeval_faster(gt, dt, iouType=iou_type, print_function=print)
        evaluator.params.imgIds = sorted(set(int(i) for i in image_ids))
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    found = precision_recall_curves(evaluator.eval["precision"], evaluator.params.recThrs, evaluator.params.catIds)
    if curves is not None:
        curves.extend(found)
    ap = {(c.name, c.iou): c.ap for c in found if c.name != "all"}  # a curve's mean precision is its AP
    per_class = {int(name): (value, ap[name, "0.50"]) for (name, iou), value in ap.items() if iou == "0.50:0.95"}
    return [float(v) for v in evaluator.stats[:12]], per_class


#: the curves' IoU thresholds: their label, and which of COCOeval's ten (0.50, 0.55, ..., 0.95) they average
CURVE_IOUS: tuple[tuple[str, slice], ...] = (("0.50:0.95", slice(None)), ("0.50", slice(0, 1)), ("0.75", slice(5, 6)))


def precision_recall_curves(precision, recall_points, category_ids) -> list[PRCurve]:
    """COCOeval's precision array ``T x R x K x A x M`` as curves over its recall points ``recall_points``: for
    every category with ground truth (COCOeval's -1 marks those without) and over all of them (``all``: the
    mean over those categories), at each of :data:`CURVE_IOUS`, at all areas and 100 detections. A curve's
    ``ap`` is its mean precision: what ``summarize`` averages for the same IoUs and categories."""
    import numpy as np

    at = np.asarray(precision)[:, :, :, 0, -1]  # T x R x K
    has_truth = (at > -1).all(axis=(0, 1))
    recall = [float(r) for r in recall_points]
    out = []
    for label, ious in CURVE_IOUS:
        mean_iou = at[ious].mean(axis=0)  # R x K
        if has_truth.any():
            overall = mean_iou[:, has_truth].mean(axis=1)
            out.append(PRCurve("all", label, recall, overall.tolist(), float(overall.mean())))
        for k, category in enumerate(category_ids):
            if has_truth[k]:
                curve = mean_iou[:, k]
                out.append(PRCurve(str(int(category)), label, recall, curve.tolist(), float(curve.mean())))
    return out
