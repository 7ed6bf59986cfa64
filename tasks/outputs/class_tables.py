"""Per-class AP tables: a W&B table per evaluated split, printed after ``test`` (detection, instance
segmentation)."""

from __future__ import annotations

from collections.abc import Sequence


def per_class_table(split: str, metrics: dict[str, float], prefixes: Sequence[str], loggers: Sequence,
                    step: int) -> None:  # fmt: skip
    """Each class's ``AP`` and ``AP50`` from ``metrics`` (``AP/<class>``, ``AP50/<class>``, and the same under
    each of ``prefixes`` that was scored, ``mask_`` for masks) as the table ``<split>/AP_per_class`` of each
    W&B logger in ``loggers``, and printed when ``split`` is ``test``."""
    kinds = [p for p in prefixes if any(n.startswith(f"{p}AP/") for n in metrics)] or [""]
    columns = ["class"] + [f"{p}{m}" for p in kinds for m in ("AP", "AP50")]
    rows = [
        [name[3:]] + [metrics.get(f"{p}{m}/{name[3:]}", 0.0) for p in kinds for m in ("AP", "AP50")]
        for name in metrics
        if name.startswith("AP/")
    ]
    if not rows:
        return
    for logger in loggers:
        logger.log_table(f"{split}/AP_per_class", columns=columns, data=rows, step=step)
    if split == "test":
        width = max(len(r[0]) for r in rows)
        header = f"{'class':{width}s}" + "".join(f"  {c:9s}" for c in columns[1:])
        print("\n".join([header] + [f"{r[0]:{width}s}" + "".join(f"  {v:.4f}   " for v in r[1:]) for r in rows]))
