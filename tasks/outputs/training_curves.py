"""The training and validation curves of a run from its ``metrics.csv``, as one picture (``python -m tasks.plot``).

Every run writes ``metrics.csv`` in its run directory (``tasks.run.loggers.ResumableCSVLogger``, beside W&B or
alone): one row per logging call, a ``step`` column and a column per metric. A metric is read as the points
``(step, value)`` of the rows that hold it; a resumed run appends the steps it replays again, and the last
value logged at a step is the one kept (the resumed run's). Metrics are grouped into panels by what they
measure, whatever the split: ``train/loss_step``, ``train/loss_epoch`` and ``val/loss`` share the ``loss``
panel, ``train/acc1`` and ``val/acc1`` the ``acc1`` one; per-class metrics (``val/AP/<class>``,
``val/IoU/<class>``) and the epoch counter are left out unless named. The PNG's text chunk ``panels`` (JSON:
``{panel: {metric: number of points}}``) says what was drawn.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from PIL.PngImagePlugin import PngInfo

COLUMNS = 3


def read_metrics(path: Path) -> dict[str, list[tuple[int, float]]]:
    """``{metric: [(step, value), ...]}`` in step order, the last value logged at each step."""
    with open(path, newline="") as file:
        reader = csv.DictReader(file)
        if reader.fieldnames is None or "step" not in reader.fieldnames:
            raise ValueError(f"{path}: not a metrics.csv a run wrote (its header has no 'step' column)")
        by_step: dict[str, dict[int, float]] = {}
        for row in reader:
            step = int(float(row["step"]))
            for name, value in row.items():
                if name != "step" and value not in (None, ""):
                    by_step.setdefault(name, {})[step] = float(value)
    return {name: sorted(points.items()) for name, points in by_step.items()}


def panel_of(metric: str) -> str:
    """The panel a metric is drawn in: its name without the split (``train/``, ``val/``, ``val_ema/``,
    ``test/``) and without Lightning's ``_step``/``_epoch`` suffix."""
    name = metric.split("/", 1)[1] if "/" in metric else metric
    for suffix in ("_step", "_epoch"):
        name = name.removesuffix(suffix)
    return name


def default_metrics(names: list[str]) -> list[str]:
    """What is drawn without ``--metrics``: every metric but the per-class ones and the epoch counter."""
    return [n for n in names if n != "epoch" and n.count("/") <= 1]


def draw_curves(series: dict[str, list[tuple[int, float]]], out: Path, title: str) -> Path:
    """One panel per :func:`panel_of` group, the series against the step, saved as ``out`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels: dict[str, list[str]] = {}
    for name in series:
        panels.setdefault(panel_of(name), []).append(name)
    rows = math.ceil(len(panels) / COLUMNS)
    columns = min(COLUMNS, len(panels))
    figure, axes = plt.subplots(rows, columns, figsize=(5.2 * columns, 3.6 * rows), squeeze=False)
    for ax, (panel, names) in zip(axes.flat, panels.items()):
        for name in names:
            steps, values = zip(*series[name])
            ax.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3, label=name)
        ax.set(title=panel, xlabel="step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    figure.suptitle(title)
    figure.tight_layout()
    info = PngInfo()
    info.add_text("panels", json.dumps({p: {n: len(series[n]) for n in names} for p, names in panels.items()}))
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=90, pil_kwargs={"pnginfo": info})
    plt.close(figure)
    return out
