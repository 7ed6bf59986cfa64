"""``python -m tasks.plot RUN_DIR [--out PNG] [--metrics NAME ...]``: a run's training and validation curves
from its ``metrics.csv``, for runs without W&B (or after them).

    python -m tasks.plot runs/demo_detect/version_0                 # writes runs/demo_detect/version_0/curves.png
    python -m tasks.plot runs/cifar_resnet56/version_0 --metrics val/acc1 train/loss_epoch --out acc.png

``RUN_DIR`` is a run directory (the one holding ``config.yaml`` and ``checkpoints/``) or a ``metrics.csv``
itself. Without ``--metrics`` every metric is drawn but the per-class ones (``val/AP/<class>``,
``val/IoU/<class>``); the same quantity of different splits shares a panel (``tasks.outputs.training_curves``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .outputs.training_curves import default_metrics, draw_curves, read_metrics
from .run.parse_errors import did_you_mean


def metrics_file(run: Path) -> Path:
    """The ``metrics.csv`` of a run directory (or the file itself), with what to do when there is none."""
    path = run / "metrics.csv" if run.is_dir() else run
    if not path.is_file():
        below = sorted(run.glob("**/metrics.csv"))[:3] if run.is_dir() else []
        hint = (
            f"; run directories below it: {', '.join(str(p.parent) for p in below)}"
            if below
            else "; every fit writes one into its run directory (runs/<config name>/version_<n>/)"
        )
        raise FileNotFoundError(f"{path}: no such file{hint}")
    return path


def main(argv: list[str] | None = None) -> Path:
    description = __doc__.split("\n\n")[0].replace("\n", " ")
    parser = argparse.ArgumentParser(prog="python -m tasks.plot", description=description)
    parser.add_argument("run", type=Path, help="a run directory, or its metrics.csv")
    parser.add_argument("--out", type=Path, default=None, help="the PNG to write (default: <run>/curves.png)")
    parser.add_argument("--metrics", nargs="+", default=None, help="the metrics to draw (default: all but per-class)")
    args = parser.parse_args(argv)
    path = metrics_file(args.run)
    series = read_metrics(path)
    names = args.metrics or default_metrics(list(series))
    for name in names:
        if name not in series:
            raise ValueError(f"--metrics {name}: {path} has no such column{did_you_mean(name, series)}")
    if not names:
        raise ValueError(f"{path}: no metric has been logged yet")
    out = args.out or path.parent / "curves.png"
    draw_curves({n: series[n] for n in names}, out, title=str(path.parent))
    print(f"wrote {out} ({len(names)} metrics from {path})")
    return out


if __name__ == "__main__":
    from zoo_common.command import run_command

    run_command(main)
