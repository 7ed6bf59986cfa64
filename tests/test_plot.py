"""python -m tasks.plot: a run's curves from its metrics.csv, as a user runs it on what a run wrote."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from tasks import plot
from tasks.outputs.training_curves import read_metrics
from tasks.run.loggers import ResumableCSVLogger

ROOT = Path(__file__).resolve().parents[1]


def _log(run_dir: Path, steps: range, offset: float) -> None:
    """What a run's CSV logger writes: a training loss every step, validation metrics every fifth step."""
    logger = ResumableCSVLogger(save_dir=str(run_dir), name="", version="")
    for step in steps:
        logger.log_metrics({"train/loss_step": offset + 1.0 / (step + 1), "epoch": step // 5}, step=step)
        if step % 5 == 4:
            logger.log_metrics({"val/loss": offset + 0.5, "val/acc1": 0.1 * step, "val/IoU/circle": 0.3}, step=step)
    logger.save()


def _plot(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tasks.plot", *args], cwd=ROOT, capture_output=True, text=True)


def test_plot_draws_each_quantity_in_one_panel_and_keeps_a_resumed_runs_values(tmp_path):
    run_dir = tmp_path / "runs" / "demo" / "version_0"
    _log(run_dir, range(10), offset=0.0)
    _log(run_dir, range(5, 10), offset=100.0)  # resumed from step 5: the second run's values are the ones kept
    series = read_metrics(run_dir / "metrics.csv")
    assert [s for s, _ in series["train/loss_step"]] == list(range(10))
    assert dict(series["train/loss_step"])[7] == 100.0 + 1 / 8 and dict(series["train/loss_step"])[4] == 1 / 5
    done = _plot(str(run_dir))
    assert done.returncode == 0, done.stderr
    picture = Image.open(run_dir / "curves.png")
    panels = json.loads(picture.text["panels"])
    # the loss of both splits in one panel; per-class metrics and the epoch counter left out
    assert panels == {"loss": {"train/loss_step": 10, "val/loss": 2}, "acc1": {"val/acc1": 2}}
    assert len(picture.convert("RGB").getcolors(1 << 24)) > 50  # drawn, not blank
    # named metrics, another file
    out = tmp_path / "iou.png"
    assert plot.main([str(run_dir / "metrics.csv"), "--metrics", "val/IoU/circle", "--out", str(out)]) == out
    assert json.loads(Image.open(out).text["panels"]) == {"IoU/circle": {"val/IoU/circle": 2}}


def test_plot_errors_name_the_file_and_the_fix(tmp_path):
    run_dir = tmp_path / "runs" / "demo" / "version_0"
    _log(run_dir, range(5), offset=0.0)
    typo = _plot(str(run_dir), "--metrics", "val/acc")
    assert typo.returncode == 1 and "--metrics val/acc:" in typo.stderr and "did you mean val/acc1?" in typo.stderr
    with pytest.raises(FileNotFoundError) as missing:
        plot.main([str(tmp_path / "runs")])
    assert (
        str(missing.value) == f"{tmp_path / 'runs' / 'metrics.csv'}: no such file; run directories below it: {run_dir}"
    )
