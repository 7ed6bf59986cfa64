"""Detection metrics no library provides, as their devkits define them: PASCAL VOC and ILSVRC DET.

**PASCAL VOC** (``VOCevaldet.m``): per class, detections sorted by decreasing score (ties keep their
order: MATLAB's sort is stable); each is matched to the ground-truth box it overlaps most in its image
(over all of them, matched or not); with IoU >= 0.5 it is a true positive if that box is not
``difficult`` and not yet matched, a false positive if already matched (a duplicate), and neither if it
is difficult; below 0.5 a false positive. Recall is over the non-difficult boxes. AP is VOC 2007's
11-point interpolation (``voc07``: the mean of the best precision at recall >= 0, 0.1, ..., 1) or VOC
2010+'s area under the monotone precision envelope (``voc``).

**ILSVRC DET** (the ILSVRC devkit's ``eval_det.m``): each ground-truth box has its own IoU threshold,
``min(0.5, wh / ((w + 10)(h + 10)))`` (small objects are easier to match); a detection is matched to the
not-yet-matched box of its class it overlaps most among those it overlaps by at least their threshold;
otherwise it is a false positive. AP is the area version.

The devkits compute overlaps on inclusive integer pixels with ``+1`` in every width; on the continuous
boxes used here (``x2 = xmax + 1`` for 0-based pixels) the same numbers come out without it. Classes
with no (non-difficult) ground truth in the evaluated images have no AP (the devkit's would be NaN) and
are left out of the mean.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from .curves import PRCurve


def iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one ``x1, y1, x2, y2`` box with each row of ``boxes`` (continuous pixel coordinates)."""
    if len(boxes) == 0:
        return np.zeros(0)
    iw = np.minimum(box[2], boxes[:, 2]) - np.maximum(box[0], boxes[:, 0])
    ih = np.minimum(box[3], boxes[:, 3]) - np.maximum(box[1], boxes[:, 1])
    inter = np.where((iw > 0) & (ih > 0), iw * ih, 0.0)
    union = (box[2] - box[0]) * (box[3] - box[1]) + (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) - inter
    return inter / union


def voc07_ap(recall: np.ndarray, precision: np.ndarray) -> float:
    """VOC 2007's 11-point interpolated AP."""
    ap = 0.0
    for t in np.linspace(0, 1, 11):
        above = precision[recall >= t - 1e-12]
        ap += (above.max() if len(above) else 0.0) / 11
    return float(ap)


def area_ap(recall: np.ndarray, precision: np.ndarray) -> float:
    """VOC 2010+'s (and ILSVRC's) AP: the area under the precision envelope, at each change of recall."""
    mrec = np.concatenate([[0.0], recall, [1.0]])
    mpre = np.concatenate([[0.0], precision, [0.0]])
    for i in range(len(mpre) - 2, -1, -1):
        mpre[i] = max(mpre[i], mpre[i + 1])
    changes = np.flatnonzero(mrec[1:] != mrec[:-1]) + 1
    return float(np.sum((mrec[changes] - mrec[changes - 1]) * mpre[changes]))


def ilsvrc_thresholds(boxes: np.ndarray) -> np.ndarray:
    """ILSVRC DET's IoU threshold of each ground-truth box: ``min(0.5, wh / ((w + 10) (h + 10)))``."""
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    return np.minimum(0.5, w * h / ((w + 10) * (h + 10)))


def protocol_ap(recall: np.ndarray, precision: np.ndarray, protocol: str) -> float:
    """The devkit's AP of one class's curve: 11-point (``voc07``) or the envelope's area (``voc``, ``ilsvrc``)."""
    return voc07_ap(recall, precision) if protocol == "voc07" else area_ap(recall, precision)


def class_curve(
    detections: list[tuple[int, float, np.ndarray]], truth: dict, protocol: str
) -> tuple[np.ndarray, np.ndarray] | None:
    """One class's recall and precision after each ranked detection (the devkit's ``rec``, ``prec``):
    ``detections`` as ``(image id, score, box)``; ``truth`` maps an image id to its ``(boxes, difficult)`` of
    the class. ``None`` when there is nothing to find."""
    positives = sum(
        int((~difficult).sum()) if protocol != "ilsvrc" else len(boxes) for boxes, difficult in truth.values()
    )
    if positives == 0:
        return None
    order = np.argsort(-np.array([score for _, score, _ in detections]), kind="stable")
    matched = {image: np.zeros(len(boxes), dtype=bool) for image, (boxes, _) in truth.items()}
    tp, fp = np.zeros(len(order)), np.zeros(len(order))
    for rank, d in enumerate(order):
        image, _, box = detections[d]
        boxes, difficult = truth.get(image, (np.zeros((0, 4)), np.zeros(0, dtype=bool)))
        overlaps = iou(box, boxes)
        if protocol == "ilsvrc":
            eligible = (~matched[image] if image in matched else np.zeros(0, dtype=bool)) & (
                overlaps >= ilsvrc_thresholds(boxes)
            )
            if eligible.any():
                best = int(np.argmax(np.where(eligible, overlaps, -np.inf)))
                tp[rank], matched[image][best] = 1, True
            else:
                fp[rank] = 1
            continue
        if len(overlaps) and overlaps.max() >= 0.5:
            best = int(np.argmax(overlaps))
            if difficult[best]:
                continue  # neither: difficult objects are not scored
            if not matched[image][best]:
                tp[rank], matched[image][best] = 1, True
            else:
                fp[rank] = 1  # a duplicate detection
        else:
            fp[rank] = 1
    tp, fp = np.cumsum(tp), np.cumsum(fp)
    recall = tp / positives
    precision = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    return recall, precision


def evaluate_devkit(
    results: list[dict],
    ground_truth: dict,
    categories: list[dict],
    protocol: str,
    image_ids: list[int],
    blacklist: set[tuple[int, int]] | None = None,
    curves: list[PRCurve] | None = None,
) -> dict[str, float]:
    """``mAP`` (also as ``AP50``: it is the AP at IoU 0.5) and ``AP/<class name>`` of COCO-format
    ``results`` on ``ground_truth`` (``{image id: (boxes, category ids, difficult)}``), over ``image_ids``.

    ``protocol``: ``voc07``, ``voc`` or ``ilsvrc`` (see the module docstring). ``blacklist``: ``(image id,
    category id)`` pairs left out as ILSVRC's ``eval_detection.m`` leaves out its validation blacklist's: the
    image's detections of that class are neither true nor false positives, and its objects of that class are
    not counted among the positives. Given a ``curves`` list, each class's curve (:func:`class_curve`, named by
    its category id, its ``ap`` the class's AP) is appended to it.
    """
    blacklist = {(int(i), int(c)) for i, c in blacklist or ()}
    if protocol not in ("voc07", "voc", "ilsvrc"):
        raise ValueError(f"protocol={protocol!r} is not one of 'voc07', 'voc', 'ilsvrc'")
    evaluated = set(int(i) for i in image_ids)
    by_class: dict[int, list] = defaultdict(list)
    for r in results:
        if int(r["image_id"]) in evaluated and (int(r["image_id"]), int(r["category_id"])) not in blacklist:
            x, y, w, h = r["bbox"]
            by_class[int(r["category_id"])].append(
                (int(r["image_id"]), float(r["score"]), np.array([x, y, x + w, y + h]))
            )
    out: dict[str, float] = {}
    aps = []
    for category in categories:
        cid = category["id"]
        truth = {}
        for image in evaluated:
            if (image, cid) in blacklist:
                continue  # no positives, and its detections were left out above
            boxes, labels, difficult = ground_truth.get(image, (np.zeros((0, 4)), np.zeros(0), np.zeros(0, bool)))
            mine = labels == cid
            truth[image] = (np.asarray(boxes, dtype=np.float64)[mine], np.asarray(difficult, dtype=bool)[mine])
        curve = class_curve(by_class.get(cid, []), truth, protocol)
        if curve is not None:
            ap = protocol_ap(*curve, protocol)
            if curves is not None:
                iou = "0.50" if protocol != "ilsvrc" else "ilsvrc"
                curves.append(PRCurve(str(cid), iou, curve[0].tolist(), curve[1].tolist(), ap))
            out[f"AP/{category['name']}"] = ap
            aps.append(ap)
    out["mAP"] = float(np.mean(aps)) if aps else 0.0
    out["AP50"] = out["mAP"]
    return out
