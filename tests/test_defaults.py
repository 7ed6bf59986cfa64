"""Defaults that train: with no optimizer, schedule or augmentation in the config, every task trains a
dataset nobody tuned for; a missing argument is one line naming it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torchvision
from commands import run_commands
from datasets import CPU, write_coco, write_imagefolder

from datamodules import ImageFolderDataModule
from tasks import classify, detect, instance_segment, segment
from tasks.run.cli import TaskCLI

ROOT = Path(__file__).resolve().parents[1]
#: measured on the embedded shapes by the flags-only tests below (2-core CPU, seed 0): classification
#: top-1 0.60 after 15 epochs (chance 0.2), detection AP50 0.218 after 5 epochs with the from-scratch
#: rate 0.01 at 4 images (0.215 at 0.005 before; chance about 0),
#: segmentation mIoU 0.295 after 16 epochs on 120 scenes with the from-scratch AdamW recipe (all background
#: about 0.15; on 48 scenes, 0.197: too few steps to tell the recipes apart, where SGD at the FCN rate gave
#: 0.22 in 8 epochs, but 0.18 against AdamW's 0.48 on the issue's digits)
CLASSIFY_THRESHOLD = 0.4
DETECT_THRESHOLD = 0.12
SEGMENT_THRESHOLD = 0.22
#: fewer sampled regions and proposals, as the demo config: small images train in seconds per epoch on a CPU
SMALL = {"rpn_post_nms_top_n_train": 300, "rpn_post_nms_top_n_test": 300, "box_batch_size_per_image": 128}


class Captured(Exception):
    """Raised once the fit has built its optimizer and schedule: nothing more is needed."""


class Capture(pl.Callback):
    """Records the optimizer and schedule a fit built, and the run's length, then stops the fit."""

    def on_train_start(self, trainer, pl_module) -> None:
        self.optimizer = trainer.optimizers[0]
        config = trainer.lr_scheduler_configs[0]
        self.scheduler, self.interval = config.scheduler, config.interval
        self.total = trainer.estimated_stepping_batches
        raise Captured


def _fit_with_capture(module, args, tmp_path, capture):
    """``module.main(["fit", ...])`` as a user runs it, with ``capture`` among the trainer's callbacks."""
    cli_args = ["fit", *args, "--trainer.default_root_dir", str(tmp_path / "runs"), "--trainer.logger", "false",
                "--trainer.num_sanity_val_steps", "0", *CPU]  # fmt: skip
    original = TaskCLI._instantiate_trainer

    def with_capture(self, config, callbacks):
        return original(self, config, [*callbacks, capture])

    TaskCLI._instantiate_trainer = with_capture
    try:
        with pytest.raises(Captured):
            module.main(cli_args)
    finally:
        TaskCLI._instantiate_trainer = original


def _lrs(scheduler, steps) -> list[float]:
    """The first group's rate at each of ``steps``, from the scheduler's closed form."""
    out = []
    for step in steps:
        scheduler.last_epoch = step
        out.append(scheduler.get_lr()[0])
    return out


@pytest.fixture(scope="module")
def coco(tmp_path_factory) -> Path:
    return write_coco(
        tmp_path_factory.mktemp("coco"), train_images=16, val_images=4, size=(64, 64), object_size=(12, 28)
    )


@pytest.mark.parametrize(
    ("start", "batch", "accumulate", "lr"),
    [
        ("pretrained", 8, 1, 0.01), ("pretrained", 8, 2, 0.02), ("pretrained", 4, 1, 0.005),
        ("scratch", 1, 1, 0.005), ("scratch", 2, 1, 0.01), ("scratch", 4, 1, 0.01), ("scratch", 8, 2, 0.01),
    ],
)  # fmt: skip
def test_detection_recipe_is_detectron2s_scaled_to_the_run(start, batch, accumulate, lr, coco, tmp_path):
    """From trained weights detectron2's 0.02 per 16 images, scaled linearly to the global batch; from
    scratch 0.01 per 2 images, never above 0.01. The same warm-up and steps either way."""
    weights = []
    if start == "pretrained":  # a torchvision ResNet-18 state dict on disk, as a user's download
        torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "resnet18.pth")
        weights = ["--model.weights_backbone", str(tmp_path / "resnet18.pth")]
    capture = Capture()
    _fit_with_capture(detect, [
        "--data", "datamodules.COCODetectionDataModule", "--data.root", str(coco), "--data.num_workers", "0",
        "--data.batch_size", str(batch), "--trainer.accumulate_grad_batches", str(accumulate),
        "--model.backbone", "resnet18", "--model.norm", "bn", "--model.freeze_at", "0",
        "--trainer.max_steps", "900", "--trainer.max_epochs", "-1", *weights,
    ], tmp_path, capture)  # fmt: skip
    optimizer, scheduler = capture.optimizer, capture.scheduler
    assert type(optimizer).__name__ == "SGD" and capture.interval == "step"
    group = optimizer.param_groups[0]
    assert group["initial_lr"] == pytest.approx(lr) and group["momentum"] == 0.9 and group["weight_decay"] == 1e-4
    # warm-up: detectron2's 1000 steps, at most a tenth of this 900-step run; ÷10 at 2/3 and 8/9 of it
    assert scheduler.warmup_iters == 90 and scheduler.milestones == [600, 800]
    before, at_start, warm, first, second = _lrs(scheduler, [0, 45, 599, 600, 800])
    assert before == pytest.approx(lr * 0.001) and at_start == pytest.approx(lr * (0.001 * 0.5 + 0.5))
    assert warm == pytest.approx(lr) and first == pytest.approx(lr / 10) and second == pytest.approx(lr / 100)


@pytest.mark.parametrize("start", ["scratch", "pretrained"])
def test_segmentation_recipe_is_torchvisions_fcn_with_the_aux_head_at_ten_times(start, coco, tmp_path):
    """From trained weights: torchvision's FCN recipe (SGD 0.02 per 32 images); from scratch: AdamW 0.003
    per 8 images. Both scaled to the run's batch, with poly decay and the auxiliary head at 10x."""
    weights = []
    if start == "pretrained":  # a torchvision ResNet-18 state dict on disk, as a user's download
        torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "resnet18.pth")
        weights = ["--model.weights_backbone", str(tmp_path / "resnet18.pth")]
    capture = Capture()
    _fit_with_capture(segment, [
        "--data", "datamodules.COCOSegmentationDataModule", "--data.root", str(coco), "--data.categories", "all",
        "--data.min_area", "0", "--data.base_size", "64", "--data.crop_size", "48", "--data.batch_size", "4",
        "--data.num_workers", "0", "--data.cache_dir", str(tmp_path / "cache"), "--model.backbone", "resnet18",
        "--trainer.max_epochs", "50", *weights,
    ], tmp_path, capture)  # fmt: skip
    optimizer, scheduler = capture.optimizer, capture.scheduler
    if start == "pretrained":
        main_lr = 0.02 * 4 / 32  # torchvision's 0.02 for 32 images, at 4 images per step
        assert type(optimizer).__name__ == "SGD" and optimizer.defaults["momentum"] == 0.9
    else:
        main_lr = 0.003 * 4 / 8
        assert type(optimizer).__name__ == "AdamW" and optimizer.defaults["weight_decay"] == 1e-4
    aux = [g for g in optimizer.param_groups if g.get("lr_scale") == 10.0]
    rest = [g for g in optimizer.param_groups if "lr_scale" not in g]
    assert rest and all(g["initial_lr"] == pytest.approx(main_lr) for g in rest)
    assert aux and all(g["initial_lr"] == pytest.approx(10 * main_lr) for g in aux)
    expected = sum(
        p.numel()
        for p in segment.SegmentationTask(backbone="resnet18", num_classes=6).model.aux_classifier.parameters()
    )
    assert sum(p.numel() for g in aux for p in g["params"]) == expected  # the aux head, and only it, at 10x
    t = capture.total
    assert scheduler.total_iters == t and scheduler.power == 0.9 and scheduler.warmup_iters == int(0.1 * t)
    assert _lrs(scheduler, [t // 2])[0] == pytest.approx(main_lr * (1 - (t // 2) / t) ** 0.9)


def test_classification_recipe_and_a_configs_own_optimizer_wins(tmp_path):
    root = write_imagefolder(tmp_path / "images", per_class=4, val_per_class=1, size=32)
    data = ["--data", "datamodules.ImageFolderDataModule", "--data.root", str(root), "--data.image_size", "32",
            "--data.batch_size", "8", "--data.num_workers", "0", "--model.backbone", "cifar_resnet20",
            "--trainer.max_epochs", "100"]  # fmt: skip
    capture = Capture()
    _fit_with_capture(classify, data, tmp_path, capture)
    group, scheduler = capture.optimizer.param_groups[0], capture.scheduler
    assert group["initial_lr"] == pytest.approx(0.1 * 8 / 128)  # images under 64 px: 0.1 per 128 (CIFAR's)
    assert type(scheduler).__name__ == "WarmupCosineLR" and scheduler.total_iters == 200
    assert scheduler.warmup_iters == 10  # 5 epochs of 2 steps, within a tenth of the run (20)
    middle, end = _lrs(scheduler, [105, 200])
    assert middle == pytest.approx(group["initial_lr"] * 0.5, rel=1e-6) and end == pytest.approx(0.0, abs=1e-12)
    # ImageNet-sized images (and no datamodule yet) take ImageNet's rate, 0.1 per 256 images
    from types import SimpleNamespace

    task = classify.ClassificationTask(backbone="cifar_resnet20", num_classes=5)
    assert task.recipe.images == 256 and task.recipe.lr == 0.1
    task._trainer = SimpleNamespace(datamodule=ImageFolderDataModule(root="x", image_size=96))
    assert task.recipe.images == 256
    task._trainer = SimpleNamespace(datamodule=ImageFolderDataModule(root="x", image_size=32))
    assert task.recipe.images == 128
    # a config's own optimizer and schedule are used as they are
    capture = Capture()
    own = ["--model.optimizer", "torch.optim.AdamW", "--model.optimizer.lr", "0.004",
           "--model.scheduler", "torch.optim.lr_scheduler.StepLR", "--model.scheduler.step_size", "7"]  # fmt: skip
    _fit_with_capture(classify, [*data, *own], tmp_path, capture)
    assert type(capture.optimizer).__name__ == "AdamW" and capture.optimizer.param_groups[0]["initial_lr"] == 0.004
    assert type(capture.scheduler).__name__ == "StepLR" and capture.scheduler.step_size == 7
    assert capture.interval == "epoch"


def test_eval_resize_follows_the_crop_and_small_images_are_seen_whole(tmp_path):
    assert ImageFolderDataModule(root="x").hparams.eval_resize == 256  # 224 / 0.875
    assert ImageFolderDataModule(root="x", image_size=176).hparams.eval_resize == 201
    assert ImageFolderDataModule(root="x", image_size=224, eval_size=320).hparams.eval_resize == 366
    assert ImageFolderDataModule(root="x", image_size=32, train_augment="random_resized_crop").hparams.eval_resize == 37
    assert ImageFolderDataModule(root="x", image_size=32, eval_resize=48).hparams.eval_resize == 48
    small = ImageFolderDataModule(root="x", image_size=32)  # auto: the CIFAR recipe, evaluated on whole images
    assert small.hparams.eval_resize == 32
    # validation sees each whole image: the batch is the file itself (32 px), not a crop of an upscale
    from datamodules.images import read_image

    root = write_imagefolder(tmp_path / "images", per_class=2, val_per_class=2, size=32)
    dm = ImageFolderDataModule(root=str(root), image_size=32, batch_size=10, num_workers=0)
    dm.setup("validate")
    batch = next(iter(dm.val_dataloader()))
    for image, path in zip(batch["image"], batch["path"]):
        assert torch.equal(image, read_image(path))
    # and training pads and shifts the whole image (no flip by default at this size)
    transform = dm._transform(train=True)
    assert [type(t).__name__ for t in transform.transforms] == ["Resize", "CenterCrop", "RandomCrop"]


def test_a_missing_data_root_is_one_line_naming_it(tmp_path):
    missing, typo = run_commands([
        ["tasks.detect", "fit", "--config", str(ROOT / "configs" / "coco_resnet101.yaml")],
        ["tasks.classify", "fit", "--model.backbone", "resnet5", "--data", "datamodules.ImageFolderDataModule",
         "--data.root", "x"],
    ], tmp_path)  # fmt: skip
    lines = missing.stderr.strip().splitlines()
    assert missing.returncode == 2 and len(lines) == 2, missing.stderr
    assert lines[0].startswith("error: data.root is required for datamodules.COCODetectionDataModule")
    assert "<root>/annotations/instances_{train,val}2017.json" in lines[0] and "Namespace(" not in missing.stderr
    assert typo.stderr.splitlines()[0].startswith("error: model.backbone='resnet5' is not an allowed value; did you")


# -- flags only: no optimizer, schedule or augmentation anywhere ------------------------------------
def _metrics(cli) -> dict[str, float]:
    return {k: float(v) for k, v in cli.trainer.callback_metrics.items()}


def _losses(run_dir: Path) -> list[float]:
    import csv

    with open(run_dir / "metrics.csv") as f:
        return [float(r["train/loss_step"]) for r in csv.DictReader(f) if r.get("train/loss_step")]


def _flags_only(tmp_path) -> list[str]:
    """The run's own folder and a CSV log of every step; nothing else beyond the task's flags."""
    return ["--trainer.default_root_dir", str(tmp_path / "runs"), "--trainer.logger",
            "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir", str(tmp_path / "runs"),
            "--trainer.log_every_n_steps", "1", "--seed_everything", "0", *CPU]  # fmt: skip


def _detect_from_scratch(root: Path, tmp_path: Path, size: int, epochs: int, masks: bool = False) -> object:
    """``tasks.detect fit`` (or ``tasks.instance_segment fit``, ``masks``) from scratch, as the frozen-BN
    warning advises, with flags only."""
    module, data = (instance_segment, "COCOInstanceDataModule") if masks else (detect, "COCODetectionDataModule")
    return module.main([
        "fit", "--model.backbone", "resnet18", "--model.head", "fpn", "--model.norm", "bn", "--model.freeze_at", "0",
        "--model.min_size", str(size), "--model.max_size", str(size), "--model.fpn_channels", "64",
        "--model.detector_args", json.dumps(SMALL), "--data", f"datamodules.{data}",
        "--data.root", str(root), "--data.batch_size", "4", "--data.num_workers", "0",
        "--trainer.max_epochs", str(epochs), *_flags_only(tmp_path),
    ])  # fmt: skip


def test_flags_only_detection_from_scratch_has_no_nonfinite_loss(tmp_path):
    """The run the issue reported stopped on a NaN loss at step 6 (SGD 0.1, no warm-up): with the default
    recipe twenty steps from scratch are finite, and the rate ramps up from 0.001x."""
    root = write_coco(tmp_path / "shapes", train_images=20, val_images=2, size=(64, 64), object_size=(16, 36))
    cli = _detect_from_scratch(root, tmp_path, 64, 4)
    losses = _losses(Path(cli.trainer.log_dir))
    assert len(losses) == 4 * 5 and all(map(math.isfinite, losses)), losses
    import csv

    with open(Path(cli.trainer.log_dir) / "metrics.csv") as f:
        rates = [float(r["train/lr"]) for r in csv.DictReader(f) if r.get("train/lr")]
    # from scratch 0.01 at 4 images, reached after a warm-up of 2 steps (a tenth of the run) from 0.001x
    assert rates[0] == pytest.approx(0.01 * 0.001, rel=0.01) and max(rates) == pytest.approx(0.01)


# The three runs below train for minutes on a CPU: `pytest -m slow tests/test_defaults.py`. Each threshold
# sits well below the score the same test measured (2-core CPU, seed 0) and clearly above chance.
@pytest.mark.slow
def test_flags_only_classification_at_32_px_trains(tmp_path):
    root = write_imagefolder(tmp_path / "shapes", per_class=60, val_per_class=10, size=32)
    cli = classify.main([
        "fit", "--model.backbone", "cifar_resnet20", "--data", "datamodules.ImageFolderDataModule",
        "--data.root", str(root), "--data.image_size", "32", "--data.batch_size", "32", "--data.num_workers", "0",
        "--trainer.max_epochs", "15", *_flags_only(tmp_path),
    ])  # fmt: skip
    losses = _losses(Path(cli.trainer.log_dir))
    assert all(map(math.isfinite, losses)) and len(losses) == 15 * 9
    best = float(cli.trainer.checkpoint_callback.best_model_score)
    assert best > CLASSIFY_THRESHOLD, best  # chance: 0.2


@pytest.mark.slow
def test_flags_only_detection_from_scratch_trains(tmp_path):
    root = write_coco(tmp_path / "shapes", train_images=48, val_images=12, size=(96, 96), object_size=(20, 44))
    cli = _detect_from_scratch(root, tmp_path, 96, 5)
    losses = _losses(Path(cli.trainer.log_dir))
    assert all(map(math.isfinite, losses)) and len(losses) == 5 * 12
    print(f"flags-only detection from scratch: val/AP50 {_metrics(cli)['val/AP50']:.3f}")
    assert _metrics(cli)["val/AP50"] > DETECT_THRESHOLD, _metrics(cli)  # chance: about 0


@pytest.mark.slow
def test_flags_only_instance_segmentation_boxes_match_detection_and_masks_follow_them(tmp_path):
    """The same scenes, the same flags: Mask R-CNN's boxes are as good as Faster R-CNN's (the mask branch
    costs the box head nothing) and its masks' AP50 is close to its boxes' (the issue's rule: within 0.10).
    Both within 0.10: ten epochs from scratch on 48 scenes amplify the CPU's float differences, and the two
    machines this ran on gave detection 0.316 / instance boxes 0.334 (masks 0.332) and 0.358 / 0.302 (0.254).
    The full measurement, on digit scenes, is in the README."""
    root = write_coco(tmp_path / "shapes", train_images=48, val_images=12, size=(96, 96), object_size=(20, 44))
    boxes = _metrics(_detect_from_scratch(root, tmp_path / "detect", 96, 10))["val/AP50"]
    cli = _detect_from_scratch(root, tmp_path / "instances", 96, 10, masks=True)
    losses = _losses(Path(cli.trainer.log_dir))
    assert all(map(math.isfinite, losses)) and len(losses) == 10 * 12
    found = _metrics(cli)
    print(
        f"flags-only: detection AP50 {boxes:.3f}; instance segmentation box AP50 {found['val/AP50']:.3f}, "
        f"mask AP50 {found['val/mask_AP50']:.3f}"
    )
    assert found["val/AP50"] > DETECT_THRESHOLD and found["val/AP50"] >= boxes - 0.10, (boxes, found)
    assert found["val/mask_AP50"] >= found["val/AP50"] - 0.10, found


@pytest.mark.slow
def test_flags_only_segmentation_trains(tmp_path):
    root = write_coco(tmp_path / "shapes", train_images=120, val_images=12, size=(96, 96), object_size=(20, 44))
    cli = segment.main([
        "fit", "--model.backbone", "resnet18", "--model.head", "skip", "--data",
        "datamodules.COCOSegmentationDataModule", "--data.root", str(root), "--data.categories", "all",
        "--data.base_size", "96", "--data.crop_size", "96", "--data.batch_size", "4", "--data.num_workers", "0",
        "--data.cache_dir", str(tmp_path / "cache"), "--trainer.max_epochs", "16", *_flags_only(tmp_path),
    ])  # fmt: skip
    losses = _losses(Path(cli.trainer.log_dir))
    assert all(map(math.isfinite, losses)) and losses
    miou = float(cli.trainer.checkpoint_callback.best_model_score)
    print(f"flags-only segmentation: best val/mIoU {miou:.3f}")
    assert miou > SEGMENT_THRESHOLD, miou  # all background: about 0.15
