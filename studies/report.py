"""Collect a study's runs into a Markdown table beside the paper's numbers, and plot their error curves.

Runs are read from the local run directories (``<root>/<study>-<variant>/<version>/metrics.csv``, which
every run writes beside its W&B log; newest version of each variant) or, with ``--wandb ENTITY/PROJECT``,
from W&B's API by the study's tag. Error is ``100 x (1 - val/acc1)``; training error ``100 x (1 - train/acc1)``.
"""

from __future__ import annotations

import math
from pathlib import Path

from .catalog import Study


def run_name(study: Study, variant: str) -> str:
    return f"{study.name}-{variant}"


def read_metrics_csv(path: Path) -> list[dict]:
    """The rows of a run's ``metrics.csv`` (Lightning's ``CSVLogger``), with empty cells left out."""
    import csv

    rows = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            rows.append({k: float(v) for k, v in row.items() if v not in ("", None)})
    return rows


def local_history(root: Path, study: Study, variant: str) -> list[dict] | None:
    """The newest local run of ``variant``: its logged rows, or ``None`` if it never ran."""
    folder = Path(root) / run_name(study, variant)
    runs = sorted(folder.glob("*/metrics.csv"), key=lambda p: p.stat().st_mtime) if folder.is_dir() else []
    return read_metrics_csv(runs[-1]) if runs else None


def wandb_history(project: str, study: Study, variant: str) -> list[dict] | None:  # pragma: no cover - network
    import wandb

    runs = wandb.Api().runs(project, filters={"tags": {"$in": [study.name]}, "display_name": run_name(study, variant)})
    for run in runs:
        return list(run.scan_history())
    return None


def curves(history: list[dict], metric: str) -> dict[str, list[tuple[int, float]]]:
    """``(step, error %)`` series: ``test`` from the validation metric, ``train`` from the training one."""
    train_metric = metric.replace("val/", "train/")
    out: dict[str, list[tuple[int, float]]] = {"test": [], "train": []}
    for row in history:
        step = int(row.get("step", row.get("trainer/global_step", row.get("_step", 0))))
        if metric in row:
            out["test"].append((step, 100.0 * (1.0 - float(row[metric]))))
        if train_metric in row:
            out["train"].append((step, 100.0 * (1.0 - float(row[train_metric]))))
    return out


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and math.isnan(value):
        return "fails (>20)"
    return f"{value:.2f}"


def build_report(study: Study, root: Path, out_dir: Path, wandb_project: str | None = None) -> tuple[Path, Path]:
    """Write ``<out>/<study>.md`` (the table) and ``<out>/<study>.png`` (the curves); return both paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows, series = [], {}
    for variant in study.variants:
        history = (
            wandb_history(wandb_project, study, variant.name)
            if wandb_project
            else local_history(root, study, variant.name)
        )
        data = curves(history or [], study.metric)
        series[variant.name] = data
        test = [e for _, e in data["test"]]
        rows.append(
            "| {} | {} | {} | {} | {} | {} | {} |".format(
                variant.name,
                variant.backbone + (f" {variant.backbone_args}" if variant.backbone_args else ""),
                _fmt(variant.params_m),
                _fmt(variant.published.get("error")),
                _fmt(test[-1]) if test else "not run",
                _fmt(min(test)) if test else "-",
                max((s for s, _ in data["test"]), default=0),
            )
        )
    if not any(data["test"] or data["train"] for data in series.values()):
        where = f"W&B project {wandb_project}" if wandb_project else f"{root}/{study.name}-<variant>/"
        raise FileNotFoundError(
            f"no runs of study {study.name} found in {where}: run them first (python -m studies run {study.name} "
            f"...), or point --root at the folder they were written to"
        )
    table = [
        f"# {study.name}: {study.question}",
        "",
        f"{study.paper}, {study.where}. Config: `configs/{study.config}`.",
        "",
        "| variant | backbone | params (M) | paper error (%) | our final error (%) | our best error (%) | steps |",
        "|---|---|---|---|---|---|---|",
        *rows,
    ]
    if study.notes:
        table += ["", study.notes]
    markdown = out_dir / f"{study.name}.md"
    markdown.write_text("\n".join(table) + "\n")

    figure, axis = plt.subplots(figsize=(7, 4.5))
    for index, (name, data) in enumerate(series.items()):
        color = f"C{index % 10}"
        if data["train"]:
            axis.plot(*zip(*data["train"]), linestyle="--", color=color, linewidth=1)
        if data["test"]:
            axis.plot(*zip(*data["test"]), linestyle="-", color=color, linewidth=2, label=name)
    axis.set_xlabel("iteration")
    axis.set_ylabel("error (%)")
    axis.set_title(f"{study.name} ({study.where}): dashed training, bold test")
    if any(d["test"] for d in series.values()):
        axis.legend(fontsize=8)
    figure.tight_layout()
    plot = out_dir / f"{study.name}.png"
    figure.savefig(plot, dpi=120)
    plt.close(figure)
    return markdown, plot
