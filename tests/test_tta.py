"""Test-time augmentation (tasks.heads.tta): mirrored views are mirrored back before merging; one view is the
plain evaluation exactly."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from datasets import CPU, write_coco

from tasks import detect, segment
from tasks.heads.tta import detect_with_tta, mirror_boxes, segment_with_tta


class BrightSquareDetector:
    """A stand-in for torchvision's Faster R-CNN: one box around the image's bright pixels, scored by the
    view (higher when its ``min_size`` is larger), with the attributes the TTA reads and sets."""

    def __init__(self) -> None:
        self.transform = SimpleNamespace(min_size=(100,), max_size=200)
        self.roi_heads = SimpleNamespace(nms_thresh=0.5, detections_per_img=10)
        self.seen: list[tuple[int, int]] = []

    def __call__(self, images):
        self.seen.append((self.transform.min_size[-1], self.transform.max_size))
        found = []
        for image in images:
            ys, xs = torch.nonzero(image[0] > 0.5, as_tuple=True)
            box = torch.tensor([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], dtype=torch.float32)
            score = torch.tensor([self.transform.min_size[-1] / 1000])
            found.append({"boxes": box, "labels": torch.tensor([1]), "scores": score})
        return found


def test_mirrored_boxes():
    boxes = torch.tensor([[10.0, 20.0, 30.0, 40.0], [0.0, 0.0, 100.0, 5.0]])
    assert mirror_boxes(boxes, 100).tolist() == [[70.0, 20.0, 90.0, 40.0], [0.0, 0.0, 100.0, 5.0]]


def test_a_mirrored_views_boxes_are_mirrored_back_before_merging():
    image = torch.zeros(3, 60, 100)
    image[:, 10:30, 5:25] = 1.0  # a bright square near the left edge: its mirror is near the right edge
    detector = BrightSquareDetector()
    merged = detect_with_tta(detector, [image], scales=[0.5, 1.0], flip=True)[0]
    # four views (two scales, each mirrored): all four boxes land on the square, so NMS keeps one, the best
    # view's (the larger scale); unmirrored, the mirrored view's box would sit at x 75..95 and survive NMS
    assert merged["boxes"].tolist() == [[5.0, 10.0, 25.0, 30.0]] and merged["scores"].tolist() == [pytest.approx(0.1)]
    assert detector.seen == [(50, 100), (50, 100), (100, 200), (100, 200)]  # each view's size, then restored
    assert detector.transform.min_size == (100,) and detector.transform.max_size == 200
    # the mirrored view alone, before merging: its box is mirrored back onto the square
    only_mirror = detect_with_tta(BrightSquareDetector(), [image], scales=[1.0], flip=True)[0]
    assert only_mirror["boxes"].tolist() == [[5.0, 10.0, 25.0, 30.0]]


def test_a_mirrored_views_masks_are_mirrored_back_before_averaging():
    """A 'network' that marks the left half of whatever it sees as class 1: the plain view marks the
    image's left half, the mirrored view (mirrored back) its right half, so the average is even."""

    def left_half(images):
        logits = torch.zeros(images.shape[0], 2, *images.shape[-2:])
        logits[:, 1, :, : images.shape[-1] // 2] = 20.0
        logits[:, 0, :, images.shape[-1] // 2 :] = 20.0
        return logits

    images = torch.rand(2, 3, 8, 12)
    plain = segment_with_tta(left_half, images, [1.0], flip=False).exp()
    assert torch.equal(plain.argmax(1)[:, :, :6], torch.ones(2, 8, 6, dtype=torch.long))
    both = segment_with_tta(left_half, images, [1.0], flip=True).exp()
    torch.testing.assert_close(both, torch.full_like(both, 0.5))
    # a scale other than 1: the view's probabilities come back at the input's size
    assert segment_with_tta(left_half, images, [0.5, 1.0], flip=False).shape == (2, 2, 8, 12)


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    return write_coco(
        tmp_path_factory.mktemp("coco"), train_images=8, val_images=4, size=(80, 64), object_size=(16, 36)
    )


def _validate_with_and_without_one_view(module, args, tmp_path) -> tuple[dict, dict]:
    common = [*args, "--trainer.logger", "false", "--trainer.default_root_dir", str(tmp_path / "runs"), *CPU]
    cli = module.main(["fit", *common, "--trainer.max_steps", "4", "--trainer.limit_val_batches", "1"])
    ckpt = ["--ckpt_path", cli.trainer.checkpoint_callback.last_model_path]
    plain = module.main(["validate", *common, *ckpt]).trainer.callback_metrics
    one_view = module.main(["validate", *common, *ckpt, "--model.tta", "true", "--model.tta_flip", "false"])
    return {k: float(v) for k, v in plain.items()}, {k: float(v) for k, v in one_view.trainer.callback_metrics.items()}


def test_one_view_detection_tta_equals_plain_evaluation(coco, tmp_path):
    small = {"rpn_post_nms_top_n_train": 100, "rpn_post_nms_top_n_test": 100, "box_batch_size_per_image": 64}
    plain, one_view = _validate_with_and_without_one_view(detect, [
        "--data", "datamodules.COCODetectionDataModule", "--data.root", str(coco), "--data.batch_size", "2",
        "--data.num_workers", "0", "--model.backbone", "resnet18", "--model.norm", "bn", "--model.freeze_at", "0",
        "--model.min_size", "96", "--model.max_size", "96", "--model.fpn_channels", "32",
        "--model.box_score_thresh", "0.0", "--model.detector_args", json.dumps(small),
    ], tmp_path)  # fmt: skip
    assert "val/mAP" in plain and "val/AP50" in plain  # scored by COCOeval
    assert {k: v for k, v in one_view.items() if k.startswith("val/A")} == {
        k: v for k, v in plain.items() if k.startswith("val/A")
    }


def test_one_view_segmentation_tta_equals_plain_evaluation(coco, tmp_path):
    plain, one_view = _validate_with_and_without_one_view(segment, [
        "--data", "datamodules.COCOSegmentationDataModule", "--data.root", str(coco), "--data.categories", "all",
        "--data.min_area", "0", "--data.base_size", "64", "--data.crop_size", "48", "--data.batch_size", "2",
        "--data.num_workers", "0", "--data.cache_dir", str(tmp_path / "cache"), "--model.backbone", "resnet18",
        "--model.head", "skip",
    ], tmp_path)  # fmt: skip
    scores = [k for k in plain if k.startswith(("val/mIoU", "val/IoU", "val/pixel_acc"))]
    assert scores and all(one_view[k] == plain[k] for k in scores), {k: (plain[k], one_view[k]) for k in scores}
