"""``python -m tasks.demo`` (what ``make demo`` runs): a real detector trained from scratch, end to end.

1. ``tasks.detect fit --config configs/demo_detect.yaml`` -- generates the shapes dataset into
   ``data/shapes`` on first use, trains Faster R-CNN R18-FPN, logs to W&B offline;
2. ``validate`` on the best checkpoint -- COCOeval's numbers;
3. ``predict`` on a few validation images with the boxes drawn;
4. prints where everything was written.

Extra arguments go to every step, e.g. ``python -m tasks.demo --trainer.max_epochs 2``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from . import detect

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo_detect.yaml"


def run(extra: list[str] | None = None, config: Path = CONFIG) -> dict:
    """Run the three steps; return the paths and metrics the summary prints."""
    extra = list(extra or [])
    started = time.time()
    fitted = detect.main(["fit", "--config", str(config), *extra])
    best = fitted.trainer.checkpoint_callback.best_model_path
    run_dir = Path(fitted.trainer.default_root_dir)
    validated = detect.main(
        ["validate", "--config", str(config), "--ckpt_path", best, "--run_name", "demo_detect_validate", *extra]
    )
    metrics = {k: float(v) for k, v in validated.trainer.callback_metrics.items() if k.startswith("val/")}
    images = fitted.datamodule.root / fitted.datamodule.hparams.val_images
    detections = run_dir / "demo_predictions.json"
    detect.main(
        [
            "predict", "--config", str(config), "--ckpt_path", best, "--data.predict_root", str(images),
            "--model.detections_file", str(detections), "--model.draw_predictions", "true",
            "--trainer.limit_predict_batches", "2", "--trainer.logger", "false", "--run_name", "demo_detect_predict",
            *extra,
        ]
    )  # fmt: skip
    wandb_runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    return {
        "checkpoint": best,
        "metrics": metrics,
        "wandb_run": str(wandb_runs[-1].resolve()) if wandb_runs else None,
        "detections": str(detections.resolve()),
        "drawn_images": str((detections.parent / f"{detections.stem}_images").resolve()),
        "minutes": (time.time() - started) / 60,
    }


def main(argv: list[str] | None = None) -> dict:
    summary = run(sys.argv[1:] if argv is None else argv)
    m = summary["metrics"]
    lines = [
        "",
        "=" * 72,
        f"Demo finished in {summary['minutes']:.1f} min.",
        f"  COCOeval on the validation images: mAP {m.get('val/mAP', 0):.3f}, AP50 {m.get('val/AP50', 0):.3f}, "
        f"AP75 {m.get('val/AP75', 0):.3f}",
        f"  best checkpoint:        {summary['checkpoint']}",
        f"  W&B offline run:        {summary['wandb_run']}   (upload: wandb sync <that folder>)",
        f"  detections (COCO JSON): {summary['detections']}",
        f"  images with boxes:      {summary['drawn_images']}/",
        "=" * 72,
    ]
    print("\n".join(lines))
    return summary


if __name__ == "__main__":
    main()
