"""Every task learns: a few optimizer steps on one batch of its own data lower its training loss (the tasks'
own ``training_step`` on batches from their datamodules; no Trainer). The runs that show a task learning the
data over epochs are the slow tier's (``pytest -m slow``: ``test_a_small_model_learns_the_shapes``,
``test_short_training_detects``, ``test_short_training_beats_the_all_background_baseline``, the tracks')."""

from __future__ import annotations

import pytest
import torch
from datasets import write_coco, write_imagefolder

from datamodules import (
    COCODetectionDataModule,
    COCOSegmentationDataModule,
    ILSVRCLocalizationDataModule,
    ImageFolderDataModule,
)
from datamodules.shapes_xml import generate_localization
from tasks.classify import ClassificationTask
from tasks.detect import DetectionTask
from tasks.localize import LocalizationTask
from tasks.segment import SegmentationTask


def _classify(tmp):
    root = write_imagefolder(tmp / "cls", per_class=2, val_per_class=1, size=32)
    dm = ImageFolderDataModule(str(root), image_size=32, eval_resize=32, batch_size=8, num_workers=0)
    return dm, ClassificationTask(backbone="cifar_resnet20", num_classes=5)


def _detect(tmp):
    root = write_coco(tmp / "coco", train_images=4, val_images=2, size=(64, 64), object_size=(20, 36))
    dm = COCODetectionDataModule(str(root), batch_size=4, num_workers=0, flip_prob=0.0)
    task = DetectionTask(backbone="resnet18", num_classes=5, norm="bn", freeze_at=0, min_size=64, max_size=64,
                         fpn_channels=32, detector_args={"box_batch_size_per_image": 64})  # fmt: skip
    task.category_ids = [3, 7, 12, 40, 90]
    return dm, task


def _detect_c4_context(tmp):
    """The C4 head with global context (the ResNet paper's COCO entry): trained end to end."""
    dm, _ = _detect(tmp)
    task = DetectionTask(backbone="resnet18", num_classes=5, norm="bn", freeze_at=0, min_size=64, max_size=64,
                         head="c4", global_context=True, detector_args={"box_batch_size_per_image": 16,
                         "rpn_post_nms_top_n_train": 100})  # fmt: skip
    task.category_ids = [3, 7, 12, 40, 90]
    return dm, task


def _segment(tmp):
    root = write_coco(tmp / "coco", train_images=4, val_images=2, size=(64, 64), object_size=(20, 36))
    dm = COCOSegmentationDataModule(str(root), categories="all", min_area=0, base_size=64, crop_size=48,
                                    batch_size=4, num_workers=0, cache_dir=str(tmp / "masks"))  # fmt: skip
    return dm, SegmentationTask(backbone="resnet18", num_classes=6, head="skip")


def _localize(tmp):
    root = generate_localization(tmp / "loc", train_per_class=2, val_per_class=1, size=48)
    dm = ILSVRCLocalizationDataModule(str(root), image_size=32, batch_size=8, num_workers=0)
    return dm, LocalizationTask(backbone="resnet18", num_classes=dm.num_classes)


@pytest.mark.parametrize(
    "make",
    [_classify, _detect, pytest.param(_detect_c4_context, marks=pytest.mark.slow), _segment, _localize],
    ids=["classify", "detect", "detect_c4_context", "segment", "localize"],
)
def test_a_few_steps_on_one_batch_lower_the_training_loss(make, tmp_path, monkeypatch):
    dm, task = make(tmp_path)
    dm.setup("fit")
    batch = dm.on_after_batch_transfer(next(iter(dm.train_dataloader())), 0)
    monkeypatch.setattr(task, "log", lambda *args, **kwargs: None)  # no Trainer to log to
    monkeypatch.setattr(task, "log_dict", lambda *args, **kwargs: None)
    optimizer = torch.optim.AdamW([p for p in task.parameters() if p.requires_grad], lr=1e-3)
    task.train()
    losses = []
    for _ in range(8):
        torch.manual_seed(0)  # the same sampled regions and anchors each step: only the weights change
        loss = task.training_step(batch, 0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    assert losses[-1] < 0.8 * losses[0], losses
