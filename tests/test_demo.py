"""The embedded demo: shapes datasets generated in the real formats, and `make demo`'s steps end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from datasets import CPU, logged_run
from PIL import Image
from wandb_offline import media_rows, metric_series

from datamodules import ShapesClassificationDataModule, ShapesDetectionDataModule, ShapesSegmentationDataModule
from datamodules.coco_files import load_coco
from datamodules.shapes import SHAPES, generate_coco
from tasks import classify, demo, detect, localize, segment

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_generation_is_deterministic_and_in_coco_format(tmp_path):
    a = generate_coco(tmp_path / "a", train_images=4, val_images=2, seed=3)
    b = generate_coco(tmp_path / "b", train_images=4, val_images=2, seed=3)
    for split in ("train2017", "val2017"):
        ja = json.loads((a / "annotations" / f"instances_{split}.json").read_text())
        jb = json.loads((b / "annotations" / f"instances_{split}.json").read_text())
        assert ja == jb
        for image in ja["images"]:
            assert (a / split / image["file_name"]).read_bytes() == (b / split / image["file_name"]).read_bytes()
    coco = load_coco(a / "annotations" / "instances_train2017.json")
    assert [c["name"] for c in coco.dataset["categories"]] == list(SHAPES)
    for ann in coco.dataset["annotations"]:
        mask = coco.annToMask(ann)
        assert abs(int(mask.sum()) - ann["area"]) <= 1  # areas are the polygons' rasterized areas
        ys, xs = mask.nonzero()
        x, y, w, h = ann["bbox"]
        assert x - 1 <= xs.min() and xs.max() <= x + w + 1 and y - 1 <= ys.min() and ys.max() <= y + h + 1


def test_shapes_datamodules_generate_into_an_empty_root(tmp_path):
    det = ShapesDetectionDataModule(root=str(tmp_path / "coco"), num_train_images=4, num_val_images=2, num_workers=0)
    det.prepare_data()
    assert det.class_names == list(SHAPES) and det.num_classes == 5
    det.setup("fit")
    assert len(det.datasets["val"]) == 2
    seg = ShapesSegmentationDataModule(root=str(tmp_path / "coco"), num_workers=0, cache_dir=str(tmp_path / "cache"))
    seg.prepare_data()  # the files exist: nothing is regenerated
    assert seg.num_classes == 6
    cls = ShapesClassificationDataModule(root=str(tmp_path / "cls"), train_per_class=2, val_per_class=1, size=32)
    cls.prepare_data()
    assert cls.classes == sorted(SHAPES) and len(list((tmp_path / "cls").rglob("*.jpg"))) == 15


def test_make_demo_steps_end_to_end(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)  # the demo config itself asks for offline logging
    summary = demo.run([
        "--data.root", str(tmp_path / "shapes"), "--data.num_train_images", "24", "--data.num_val_images", "8",
        "--data.num_workers", "0", "--trainer.max_epochs", "1", "--trainer.default_root_dir", str(tmp_path / "runs"),
        *CPU,
    ])  # fmt: skip
    checkpoint = Path(summary["checkpoint"])
    assert checkpoint.name == "best.ckpt" and checkpoint.is_file()
    assert torch.load(checkpoint, weights_only=True)["category_ids"] == [1, 2, 3, 4, 5]
    assert {"val/mAP", "val/AP50", "val/AP75", "val/APs", "val/APm", "val/APl"} <= set(summary["metrics"])
    logged = logged_run(summary["wandb_run"])
    assert metric_series(logged, "val/mAP") and metric_series(logged, "train/loss_epoch")
    # four validation images with their predicted and true boxes, through WandbLogger.log_image, once
    (samples,) = media_rows(logged, "val/samples")
    assert samples["_type"] == "images/separated" and samples["count"] == 4 and len(samples["box_data"]) == 4
    assert all(Image.open(f).size == (samples["width"], samples["height"]) for f in samples["files"])
    truth = [box for sets in samples["box_data"] for box in sets["ground_truth"]]
    assert truth and {b["class_id"] for b in truth} <= {1, 2, 3, 4, 5}
    assert all(0 <= b["position"]["minX"] < b["position"]["maxX"] <= samples["width"] for b in truth)
    drawn = sorted(Path(summary["drawn_images"]).glob("*.jpg"))
    assert len(drawn) == 8  # two predict batches of four images
    detections = json.loads(Path(summary["detections"]).read_text())
    assert all({"image_id", "category_id", "bbox", "score", "file_name"} <= set(d) for d in detections)


@pytest.mark.parametrize(
    ("module", "config"),
    [(classify, "demo_classify.yaml"), (segment, "demo_segment.yaml"), (detect, "demo_voc.yaml"),
     (localize, "demo_localize.yaml")],
    ids=["classify", "segment", "voc", "localize"],
)  # fmt: skip
def test_other_demo_configs_train(module, config, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    root = ["--data.root", str(tmp_path / "data")]
    if module is classify:
        size = ["--data.train_per_class", "4", "--data.val_per_class", "2", "--data.batch_size", "8"]
    elif config == "demo_voc.yaml":
        size = ["--data.trainval", "8", "--data.test", "4", "--data.size", "64", "--model.min_size", "64",
                "--model.max_size", "64"]  # fmt: skip
    elif module is localize:
        size = [
            "--data.train_per_class",
            "4",
            "--data.val_per_class",
            "2",
            "--data.size",
            "48",
            "--data.batch_size",
            "8",
        ]
    else:
        size = [
            "--data.num_train_images",
            "8",
            "--data.num_val_images",
            "4",
            "--data.cache_dir",
            str(tmp_path / "cache"),
        ]
    runs = ["--trainer.max_epochs", "1", "--trainer.default_root_dir", str(tmp_path / "runs")]
    cli = module.main(["fit", "--config", str(CONFIGS / config), *root, *size, "--data.num_workers", "0", *runs, *CPU])
    assert Path(cli.trainer.checkpoint_callback.best_model_path).is_file()
    assert logged_run(Path(cli.trainer.default_root_dir) / "wandb")["history"]


def _generate_into(root: str, start) -> None:
    from pathlib import Path

    from datamodules.shapes import ShapesClassificationDataModule

    start.wait()  # all processes have imported everything: they reach the empty folder together
    ShapesClassificationDataModule(root=root, size=16, train_per_class=6, val_per_class=2).prepare_data()
    # what this process's setup would read next: the whole tree, not what another process has written so far
    found = (len(list(Path(root, "train").rglob("*.jpg"))), len(list(Path(root, "val").rglob("*.jpg"))))
    assert found == (6 * 5, 2 * 5), found


def test_jobs_starting_together_on_one_empty_root_share_one_complete_dataset(tmp_path):
    """Two processes generating into the same folder at once (SLURM jobs of one config): the folder appears
    whole, once; neither reads a half-written tree, no staging folder is left behind."""
    import multiprocessing

    root = tmp_path / "shapes"
    context = multiprocessing.get_context("spawn")
    start = context.Barrier(3)
    processes = [context.Process(target=_generate_into, args=(str(root), start)) for _ in range(3)]
    for p in processes:
        p.start()
    for p in processes:
        p.join(120)
    assert [p.exitcode for p in processes] == [0, 0, 0]
    assert len(list((root / "train").rglob("*.jpg"))) == 6 * 5 and len(list((root / "val").rglob("*.jpg"))) == 2 * 5
    assert [p.name for p in tmp_path.iterdir()] == ["shapes"]
