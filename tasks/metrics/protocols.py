"""How a detection split is scored, by its datamodule's ``protocol``: one table from protocol to the metric
names it logs and the scorer that computes them (detectron2 picks its evaluator from the dataset's metadata
the same way).

* ``coco`` -- COCOeval on the annotation file (``tasks.metrics.coco``): ``mAP`` (AP@[.5:.95]), ``AP50``,
  ``AP75``, ``APs``, ``APm``, ``APl``, the average recalls ``AR1``, ``AR10``, ``AR100``, ``ARs``, ``ARm``,
  ``ARl``, and per class ``AP/<class>``, ``AP50/<class>``;
* ``voc07``, ``voc``, ``ilsvrc`` -- the devkits' mean AP at IoU 0.5 (``tasks.metrics.devkits``) as ``mAP``
  and ``AP50``, and per class ``AP/<class>``.

A scorer reads what it needs from the datamodule (``annotation_file(split)`` for COCO, ``ground_truth(split)``
and ``evaluation_blacklist(split)`` for the devkits: ``datamodules.contract.DetectionData``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .coco import METRIC_NAMES, RECALL_NAMES, evaluate_coco
from .curves import PRCurve
from .devkits import evaluate_devkit


@dataclass(frozen=True)
class Protocol:
    """A benchmark's metric names and scorer.

    ``score(datamodule, split, results, image_ids, names, backend)``: COCO-format ``results`` of the images
    ``image_ids`` of ``split``, ``names`` mapping each category id to its class name, ``backend`` the
    COCOeval implementation -- to ``{metric name: value}``, per-class entries included; with ``curves=<list>``
    the precision-recall curves behind those APs are appended to the list (``tasks.metrics.curves``, each
    named by its category id or ``all``).
    """

    name: str
    metric_names: tuple[str, ...]
    score: Callable[..., dict[str, float]]


def _coco(datamodule: Any, split: str, results: list[dict], image_ids: list[int], names: dict[int, str],
          backend: str, iou_type: str = "bbox", curves: list[PRCurve] | None = None) -> dict[str, float]:  # fmt: skip
    stats, per_class = evaluate_coco(
        datamodule.annotation_file(split), results, image_ids, backend, iou_type, curves=curves
    )
    metrics = dict(zip(METRIC_NAMES + RECALL_NAMES, stats))
    for cid, (ap, ap50) in per_class.items():
        metrics[f"AP/{names.get(cid, cid)}"], metrics[f"AP50/{names.get(cid, cid)}"] = ap, ap50
    return metrics


def _devkit(kind: str):
    def score(datamodule: Any, split: str, results: list[dict], image_ids: list[int], names: dict[int, str],
              backend: str, curves: list[PRCurve] | None = None) -> dict[str, float]:  # fmt: skip
        categories = [{"id": cid, "name": name} for cid, name in names.items()]
        blacklist = datamodule.evaluation_blacklist(split)
        return evaluate_devkit(
            results, datamodule.ground_truth(split), categories, kind, image_ids, blacklist=blacklist, curves=curves
        )

    return score


PROTOCOLS: dict[str, Protocol] = {
    "coco": Protocol("coco", METRIC_NAMES + RECALL_NAMES, _coco),
    "voc07": Protocol("voc07", ("mAP", "AP50"), _devkit("voc07")),
    "voc": Protocol("voc", ("mAP", "AP50"), _devkit("voc")),
    "ilsvrc": Protocol("ilsvrc", ("mAP", "AP50"), _devkit("ilsvrc")),
}


def protocol(name: str) -> Protocol:
    """The protocol ``name`` (a datamodule's ``protocol`` attribute)."""
    if name not in PROTOCOLS:
        raise ValueError(f"protocol {name!r} is not one of {', '.join(PROTOCOLS)}")
    return PROTOCOLS[name]
