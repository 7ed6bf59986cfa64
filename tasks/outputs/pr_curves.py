"""Precision-recall curves as pictures: every detection validation and test writes ``pr_curves/<split>.png`` and
``pr_curves/<split>.csv`` into the run directory and logs the picture to W&B as ``<split>/pr_curves``.

The curves are the benchmark's own (``tasks.metrics.curves``): COCO's 101-point interpolated precision from
COCOeval's precision array, the devkits' ranked-detection curves for VOC and ILSVRC. The CSV holds every
point (``curve``, ``iou``, ``ap``, ``recall``, ``precision``; ``curve`` a class name or ``all``): a curve's mean
precision over COCO's recall points is the AP the run logged for it. The picture: for COCO, all classes at
IoU 0.50:0.95, 0.50 and 0.75 on the left; each class at the protocol's main threshold(s) on the right (above
:data:`MAX_CLASSES` classes the ``MAX_CLASSES // 2`` best and worst by AP), each labeled with its AP.
"""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

MAX_CLASSES = 20


def write_pr_curves(curves: list, folder: Path, split: str, title: str) -> Path:
    """``<folder>/<split>.csv`` (every point) and ``<folder>/<split>.png`` (the picture) of ``curves``
    (``tasks.metrics.curves.PRCurve``: ``name``, ``iou``, ``recall``, ``precision``, ``ap``); the PNG's path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f"{split}.csv", "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["curve", "iou", "ap", "recall", "precision"])
        for c in curves:
            ap = f"{c.ap:.9g}"
            writer.writerows([c.name, c.iou, ap, f"{r:.9g}", f"{p:.9g}"] for r, p in zip(c.recall, c.precision))
    overall = [c for c in curves if c.name == "all"]
    main_iou = overall[0].iou if overall else (curves[0].iou if curves else "")
    classes = sorted((c for c in curves if c.name != "all" and c.iou == main_iou), key=lambda c: -c.ap)
    shown = classes if len(classes) <= MAX_CLASSES else classes[: MAX_CLASSES // 2] + classes[-(MAX_CLASSES // 2) :]
    panels = [("all classes", overall, lambda c: f"IoU {c.iou}")] if overall else []
    which = "each class" if len(shown) == len(classes) else f"the {len(shown)} best and worst of {len(classes)} classes"
    panels.append((f"{which}, IoU {main_iou}", shown, lambda c: c.name))
    figure, axes = plt.subplots(1, len(panels), figsize=(6.4 * len(panels), 5.6), squeeze=False)
    for ax, (heading, members, label) in zip(axes[0], panels):
        for c in members:
            ax.plot(c.recall, c.precision, drawstyle="steps-post", label=f"{label(c)} (AP {c.ap:.3f})")
        ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="recall", ylabel="precision", title=heading)
        ax.grid(alpha=0.3)
        if members:
            ax.legend(fontsize=7 if len(members) > 8 else 9, loc="lower left")
    figure.suptitle(title)
    figure.tight_layout()
    path = folder / f"{split}.png"
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def read_pr_curves(path: Path) -> dict[tuple[str, str], tuple[float, list[float], list[float]]]:
    """``{(curve, iou): (ap, recall, precision)}`` from a ``<split>.csv`` :func:`write_pr_curves` wrote."""
    out: dict[tuple[str, str], tuple[float, list[float], list[float]]] = {}
    with open(path, newline="") as file:
        for row in csv.DictReader(file):
            ap, recall, precision = out.setdefault((row["curve"], row["iou"]), (float(row["ap"]), [], []))
            recall.append(float(row["recall"]))
            precision.append(float(row["precision"]))
    return out


def log_pr_curves(task, split: str, curves: list, names: dict[int, str], prefix: str = "") -> None:
    """On rank 0: write ``split``'s curves (category ids renamed to ``names``) into the run directory's
    ``pr_curves/`` and log the picture to the task's W&B loggers (``<split>/pr_curves``). ``prefix``
    ``mask_``: the curves of instance masks (``pr_curves/<split>_mask.png``, ``<split>/mask_pr_curves``)."""
    if not task.trainer.is_global_zero or not curves:
        return
    named = [c if c.name == "all" else dataclasses.replace(c, name=names.get(int(c.name), c.name)) for c in curves]
    what = f" ({prefix.rstrip('_')}s)" if prefix else ""
    title = f"{split} precision-recall{what}, epoch {task.current_epoch}, step {task.global_step}"
    stem = f"{split}_{prefix.rstrip('_')}" if prefix else split
    path = write_pr_curves(named, Path(task.trainer.default_root_dir) / "pr_curves", stem, title)
    for logger in task.wandb_loggers():
        logger.log_image(key=f"{split}/{prefix}pr_curves", images=[str(path)], step=task.global_step)
