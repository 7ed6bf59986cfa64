"""Evaluation sees the ground truth the devkits see: VOC and ILSVRC boxes as written (a 1-pixel object, a box
crossing the image's border), and ILSVRC's validation blacklists applied as ``eval_detection.m`` and
``eval_localization.m`` apply them -- each against AP or error computed by hand."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import voc_object, voc_xml, write_ilsvrc_det, write_voc_tree

from datamodules import ILSVRCDetectionDataModule, ILSVRCLocalizationDataModule, VOCDetectionDataModule
from datamodules.shapes_xml import generate_localization
from tasks.metrics.devkits import evaluate_devkit


def _voc(tmp_path: Path) -> VOCDetectionDataModule:
    """VOC 2007 test: a dog 1 pixel wide (1-based xmin = xmax = 10) and a dog crossing the right border of the
    100 x 80 image (xmax 120); the same files as the training split."""
    annotations = {
        "000001": voc_xml(voc_object("dog", (10, 10, 10, 30))),
        "000002": voc_xml(voc_object("dog", (90, 10, 120, 40))),
    }
    root = write_voc_tree(tmp_path / "VOCdevkit", annotations, split="test")
    (root / "VOC2007" / "ImageSets" / "Main" / "trainval.txt").write_text("000001\n000002\n")
    return VOCDetectionDataModule(str(root), train_sets=["2007:trainval"], val_sets=["2007:test"], num_workers=0)


def _result(image_id: int, box: tuple, score: float, category: int = 12) -> dict:  # 12: VOC's dog
    x1, y1, x2, y2 = box
    return {"image_id": image_id, "category_id": category, "bbox": [x1, y1, x2 - x1, y2 - y1], "score": score}


def test_voc_evaluation_keeps_a_one_pixel_object_and_a_box_crossing_the_border_as_written(tmp_path):
    dm = _voc(tmp_path)
    truth = dm.ground_truth("val")
    np.testing.assert_allclose(truth[1][0], [[9, 9, 10, 30]])  # 1-based inclusive -> continuous, kept
    np.testing.assert_allclose(truth[2][0], [[89, 9, 120, 40]])  # not clipped to the image
    train = dm.ground_truth("train")  # training keeps the old rules: the 1-px box dropped, the other clipped
    assert len(train[1][0]) == 0
    np.testing.assert_allclose(train[2][0], [[89, 9, 100, 40]])
    results = [
        _result(1, (9, 9, 10, 30), 0.9),  # the 1-pixel dog: a true positive
        _result(2, (89, 9, 100, 40), 0.8),  # the clipped box: IoU 11*31 / (31*31) = 0.355 < 0.5, a false positive
        _result(2, (89, 9, 120, 40), 0.7),  # the box as written: a true positive
    ]
    # by hand: 2 positives; TP, FP, TP -> recall .5 .5 1, precision 1 .5 .667; VOC07's 11 points: six at recall
    # <= 0.5 have precision 1, five above have 2/3: (6 + 5 * 2/3) / 11
    categories = [{"id": 12, "name": "dog"}]
    metrics = evaluate_devkit(results, truth, categories, "voc07", [1, 2])
    assert metrics["AP/dog"] == pytest.approx((6 + 5 * 2 / 3) / 11)
    # the old ground truth (1-px object dropped, box clipped): 1 positive, FP, TP, FP -> a different AP
    old = evaluate_devkit(results, train, categories, "voc07", [1, 2])
    assert old["AP/dog"] != pytest.approx(metrics["AP/dog"])


def _det(tmp_path: Path, blacklist: list[str] | None) -> ILSVRCDetectionDataModule:
    root = write_ilsvrc_det(tmp_path / "det", trainval=4, test=3)
    names = sorted(p.stem for p in (root / "Data" / "DET" / "val").glob("*.JPEG"))
    (root / "ImageSets" / "DET" / "val.txt").write_text("".join(f"{n} {k}\n" for k, n in enumerate(names, 1)))
    path = None
    if blacklist is not None:
        path = root / "blacklist.txt"
        path.write_text("\n".join(blacklist) + "\n")
    return ILSVRCDetectionDataModule(str(root), num_workers=0, blacklist=str(path) if path else None)


def test_ilsvrc_det_blacklist_leaves_out_its_image_class_pairs_as_eval_detection_does(tmp_path):
    plain = _det(tmp_path / "a", None)
    truth = plain.ground_truth("val")
    categories = plain.categories
    # the first validation image's first object: its class is blacklisted for that image
    first = min(truth)
    category = int(truth[first][1][0])
    wnid = next(c["synset"] for c in categories if c["id"] == category)
    listed = _det(tmp_path / "b", [f"1 {wnid}"])
    assert listed.evaluation_blacklist("val") == {(first, category)} and listed.evaluation_blacklist("train") is None
    box = truth[first][0][0]
    others = [(i, b) for i in sorted(truth) for b, c in zip(truth[i][0], truth[i][1]) if c == category and i != first]
    results = [_result(first, tuple(box), 0.9, category)]  # a perfect detection of the blacklisted object
    results += [_result(i, tuple(b + np.array([0, 0, 40, 40])), 0.5, category) for i, b in others]  # misses
    positives = sum(1 for i in truth for c in truth[i][1] if c == category)
    name = next(c["name"] for c in categories if c["id"] == category)
    without = evaluate_devkit(results, truth, categories, "ilsvrc", sorted(truth))[f"AP/{name}"]
    with_list = evaluate_devkit(results, truth, categories, "ilsvrc", sorted(truth), blacklist={(first, category)})
    # by hand. Without the blacklist: the first detection is right (recall 1/positives at precision 1), the
    # misses are false positives: AP = 1 / positives. With it: that detection and that object are gone,
    # nothing right is left: no AP when no positive remains, else 0
    assert without == pytest.approx(1 / positives)
    if positives > 1:
        assert with_list[f"AP/{name}"] == pytest.approx(0.0)
    else:
        assert f"AP/{name}" not in with_list
    with pytest.raises(ValueError, match=r"blacklist.txt:1: '9 n0' is not '<index of val.txt>"):
        _det(tmp_path / "c", ["9 n0"]).evaluation_blacklist("val")


def _loc_errors(root: Path, blacklist: str | None) -> tuple[float, float, float]:
    """``LocalizationTask``'s validation on ``root`` with guesses made right for the even-numbered images only
    (their class and box), wrong for the odd ones: ``(loc_err_top5, loc_err_gt, acc1)``."""
    from tasks.localize import LocalizationTask

    dm = ILSVRCLocalizationDataModule(str(root), image_size=32, num_workers=0, batch_size=3, blacklist=blacklist)
    dm.setup("validate")
    task = LocalizationTask(backbone="resnet18", num_classes=dm.num_classes).eval()

    def guesses(batch):  # right class and box for ILSVRC2012_val_<even>, a wrong class for the others
        numbers = [int(Path(p).stem.rsplit("_", 1)[1]) for p in batch["path"]]
        right = torch.tensor([n % 2 == 0 for n in numbers])
        classes = torch.where(right, batch["label"], (batch["label"] + 1) % dm.num_classes)[:, None].repeat(1, 5)
        truth = torch.stack([b[0] for b in batch["original_boxes"]]).double()
        boxes = truth[:, None].repeat(1, 6, 1)  # five guesses and the true class's box, in the image's pixels
        boxes[~right, -1] += 1000.0  # the wrong images' true-class box misses too
        logits = torch.nn.functional.one_hot(classes[:, 0], dm.num_classes).float()
        return logits, classes, torch.ones(len(numbers), 5), boxes

    task._guesses = guesses
    for batch in dm.val_dataloader():
        task.evaluate_batch(dm.on_after_batch_transfer(batch, 0), "val")
    errors = {k: float(v.compute()) for k, v in task.val_errors.items()}
    return errors["loc_err_top5"], errors["loc_err_gt"], float(task.val_metrics["val/acc1"].compute())


def test_cls_loc_blacklist_leaves_its_images_out_of_the_localization_errors_only(tmp_path):
    root = generate_localization(tmp_path / "loc", train_per_class=2, val_per_class=2, size=48)
    names = sorted(p.stem for p in (root / "ILSVRC" / "Data" / "CLS-LOC" / "val").glob("*.JPEG"))
    assert names[:4] == [f"ILSVRC2012_val_{k:08d}" for k in range(1, 5)] and len(names) % 2 == 0
    (root / "blacklist.txt").write_text("1\n3\n")
    dm = ILSVRCLocalizationDataModule(str(root), image_size=32, num_workers=0, blacklist="blacklist.txt")
    dm.setup("validate")
    scored = {Path(dm.datasets["val"][k]["path"]).stem: dm.datasets["val"][k]["loc_scored"] for k in range(len(names))}
    assert scored == {n: n not in ("ILSVRC2012_val_00000001", "ILSVRC2012_val_00000003") for n in names}
    # by hand: half the images (the even ones) are right. Without the blacklist both errors are 1/2; with images
    # 1 and 3 (odd, wrong) left out, (n/2 - 2) wrong of n - 2; classification still counts every image
    n = len(names)
    assert _loc_errors(root, None) == pytest.approx((0.5, 0.5, 0.5))
    expected = (n / 2 - 2) / (n - 2)
    assert _loc_errors(root, "blacklist.txt") == pytest.approx((expected, expected, 0.5))
    with pytest.raises(ValueError, match=r"bad.txt:1: 'x' is not a validation image number"):
        (root / "bad.txt").write_text("x\n")
        ILSVRCLocalizationDataModule(str(root), image_size=32, num_workers=0, blacklist="bad.txt").setup("validate")
