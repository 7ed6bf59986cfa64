"""The 2015 tracks beside COCO's: PASCAL VOC and ILSVRC DET detection, ILSVRC CLS-LOC localization --
their files read exactly, their devkits' metrics on hand-computed cases, and training on the shapes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import CPU, voc_object, voc_xml, write_voc_tree

from datamodules import ILSVRCDetectionDataModule, VOCDetectionDataModule
from datamodules.validation import DataValidationError
from datamodules.voc_format import AnnotationError, read_xml
from tasks.metrics.devkits import area_ap, evaluate_devkit, ilsvrc_thresholds, voc07_ap
from tasks.metrics.localization import gt_known_error, top5_error

ROOT = Path(__file__).resolve().parents[1]


# -- reading the XML files ------------------------------------------------------------------------------
def test_voc_and_ilsvrc_xml_read_exactly(tmp_path):
    path = tmp_path / "a.xml"
    objects = [voc_object("dog", (1, 1, 100, 80), difficult=1), voc_object("cat", (10.5, 20, 30.25, 40), truncated=1),
               voc_object("n01440764", None)]  # fmt: skip
    path.write_text(voc_xml("".join(objects)))
    voc = read_xml(path, base=1)
    assert (voc.width, voc.height) == (100, 80)
    dog, cat, label = voc.objects
    assert dog.box == (0, 0, 100, 80) and dog.difficult and not dog.truncated  # 1-based pixels: the whole image
    assert cat.box == (9.5, 19, 30.25, 40) and cat.truncated and not cat.difficult  # non-integer kept exact
    assert label.box is None  # an image-level label (CLS-LOC), no box
    ilsvrc = read_xml(path, base=0)
    assert ilsvrc.objects[0].box == (1, 1, 101, 81)  # 0-based: xmin 0..W-1 would be the whole image
    path.write_text("<annotation><size><width>10")
    with pytest.raises(AnnotationError, match=f"{path}: not well-formed XML"):
        read_xml(path, 1)
    path.write_text(voc_xml(voc_object("dog", (30, 5, 10, 20))))
    with pytest.raises(AnnotationError, match=r"<object> 0 \(dog\): inverted box"):
        read_xml(path, 1)
    path.write_text("<annotation><object><name>dog</name></object></annotation>")
    with pytest.raises(AnnotationError, match="no usable <size>"):
        read_xml(path, 1)


def test_voc_split_errors_name_the_file_or_are_dropped(tmp_path):
    root = write_voc_tree(tmp_path / "VOCdevkit", {
        "000001": voc_xml(voc_object("dog", (1, 1, 50, 40)) + voc_object("cat", (40, 30, 60, 79), difficult=1)),
        "000002": voc_xml(voc_object("unicorn", (1, 1, 50, 40))),
        "000003": None,  # listed, but no annotation file
        "000004": voc_xml(voc_object("dog", (10, 10, 10, 60)) + voc_object("dog", (90, 70, 140, 90))),
    })  # fmt: skip
    dm = VOCDetectionDataModule(str(root), train_sets=["2007:trainval"], val_sets=["2007:trainval"], num_workers=0)
    with pytest.raises(DataValidationError) as err:
        dm.setup("validate")
    text = str(err.value)
    assert "000002.xml: 000002.xml <object> 0 (unicorn): 'unicorn' is not one of the dataset's classes" in text
    assert "000003: no annotation file" in text
    lenient = VOCDetectionDataModule(str(root), train_sets=["2007:trainval"], val_sets=["2007:trainval"],
                                     num_workers=0, drop_invalid=True)  # fmt: skip
    lenient.setup("validate")
    split = lenient.xml_split("val")
    assert [p.severity for p in split.report.problems].count("warning") == 2  # a thin box, one outside
    truth = lenient.ground_truth("val")
    assert sorted(truth) == [1, 4]  # images 000001 and 000004 (numbered by their place in the split file)
    boxes, labels, difficult = truth[1]
    assert labels.tolist() == [12, 8] and difficult.tolist() == [False, True]  # dog, cat (VOC's order, from 1)
    assert boxes[0].tolist() == [0, 0, 50, 40]
    # evaluation keeps both as written, as VOC's devkit scores them (tests/test_devkit_protocols.py)
    assert truth[4][0].tolist() == [[9, 9, 10, 60], [89, 69, 140, 90]]
    lenient.setup("fit")
    assert lenient.datasets["train"].targets[1][1].tolist() == [12]  # difficult objects leave the targets
    # training drops the 1-pixel box and clips the other to the image
    assert lenient.datasets["train"].targets[4][0].tolist() == [[89, 69, 100, 80]]


def test_ilsvrc_det_splits_negatives_and_synsets(tmp_path):
    from PIL import Image

    root = tmp_path / "ILSVRC"
    for subset in ("train", "val"):
        (root / "Data" / "DET" / subset).mkdir(parents=True)
        (root / "Annotations" / "DET" / subset).mkdir(parents=True)
    (root / "ImageSets" / "DET").mkdir(parents=True)
    for subset, image, objects in (("train", "a", voc_object("n0002", (0, 0, 49, 39))), ("train", "neg", None),
                                   ("val", "v1", voc_object("n0001", (10, 10, 20, 20)))):  # fmt: skip
        Image.new("RGB", (100, 80)).save(root / "Data" / "DET" / subset / f"{image}.JPEG")
        if objects:
            (root / "Annotations" / "DET" / subset / f"{image}.xml").write_text(voc_xml(objects))
    (root / "ImageSets" / "DET" / "train_1.txt").write_text("a 1\nneg -1\n")
    (root / "ImageSets" / "DET" / "train_2.txt").write_text("a -1\n")
    (root / "ImageSets" / "DET" / "val.txt").write_text("v1 1\n")
    (tmp_path / "devkit" / "data").mkdir(parents=True)
    (tmp_path / "devkit" / "data" / "map_det.txt").write_text("n0002 2 two things\nn0001 1 one thing\n")
    dm = ILSVRCDetectionDataModule(str(root), num_workers=0)
    assert dm.class_names == ["one thing", "two things"] and dm.category_ids == [1, 2]
    train = dm._records("train")
    assert len(train) == 2 and train.objects(0)[0].tolist() == [[0, 0, 50, 40]]  # 0-based pixels
    assert len(train.objects(1)[0]) == 0  # the negative image: listed, no annotation file, no objects
    assert dm.ground_truth("val")[1][1].tolist() == [1]
    assert dm.protocol == "ilsvrc"


def test_the_data_check_reads_the_xml_formats(tmp_path, capsys):
    """``python -m datamodules.check`` on VOC, ILSVRC DET and CLS-LOC trees with one of each problem."""
    from datamodules import check
    from datamodules.shapes_xml import generate_localization

    root = write_voc_tree(tmp_path / "VOCdevkit", {
        "000001": voc_xml(voc_object("dog", (1, 1, 50, 40))),
        "000002": voc_xml(voc_object("unicorn", (1, 1, 50, 40))),  # not a VOC class
        "000003": None,  # listed, but no annotation file
        "000004": voc_xml(voc_object("dog", (30, 5, 10, 20))),  # inverted
        "000005": "<annotation><size><width>10",  # malformed
        "000006": voc_xml(voc_object("dog", (50, 40, 140, 79))),  # reaches outside: warned and clipped
    })  # fmt: skip
    (root / "VOC2007" / "JPEGImages" / "000001.jpg").write_bytes(b"not a jpeg")  # decoded by the check only
    (root / "VOC2007" / "ImageSets" / "Main" / "trainval.txt").write_text("000001\n000002\n000003\n000004\n"
                                                                           "000005\n000006\n000007\n")  # fmt: skip
    voc = ["--data", "datamodules.VOCDetectionDataModule", "--data.root", str(root),
           "--data.train_sets", '["2007:trainval"]', "--data.val_sets", '["2007:trainval"]']  # fmt: skip
    assert check.main(voc) == 1
    out = capsys.readouterr().out
    for expected in ("000001.jpg: image 2007/000001: cannot decode", "'unicorn' is not one of the dataset's classes",
                     "000003.xml: image 2007/000003: no annotation file", "(dog): inverted box",
                     "000005.xml: not well-formed XML", "reaches outside the 100x80 image (clipped for training)",
                     "000007.jpg: image 2007/000007: the file does not exist (the split file lists it)"):  # fmt: skip
        assert expected in out, (expected, out.replace(str(tmp_path), ""))
    assert check.main([*voc, "--no_decode"]) == 1 and "000001.jpg" not in capsys.readouterr().out
    # ILSVRC DET: a synset not in map_det.txt
    from datasets import write_ilsvrc_det

    det = write_ilsvrc_det(tmp_path / "det", trainval=4, test=2)
    xml = sorted((det / "Annotations" / "DET" / "val").glob("*.xml"))[0]
    xml.write_text(xml.read_text().replace("<name>n", "<name>x", 1))
    assert check.main(["--data", "datamodules.ILSVRCDetectionDataModule", "--data.root", str(det)]) == 1
    assert "is not one of the dataset's classes" in capsys.readouterr().out
    # CLS-LOC: an unknown synset, a validation image without a label, a solution row without its image
    loc = generate_localization(tmp_path / "loc", train_per_class=3, val_per_class=1, size=32)
    solution = loc / "LOC_val_solution.csv"
    rows = solution.read_text().splitlines()
    rows[1] = rows[1].replace(",n", ",x", 1)
    solution.write_text("\n".join([*rows, "ILSVRC2012_val_00009999,n00000001 1 1 9 9"]) + "\n")
    (loc / "ILSVRC" / "Data" / "CLS-LOC" / "val" / "ILSVRC2012_val_00000002.JPEG").rename(
        loc / "ILSVRC" / "Data" / "CLS-LOC" / "val" / "unlabeled.JPEG"
    )
    loc_args = ["--data", "datamodules.ILSVRCLocalizationDataModule", "--data.root", str(loc)]
    assert check.main(loc_args) == 1
    out = capsys.readouterr().out
    assert "is not in LOC_synset_mapping.txt" in out and "unlabeled.JPEG: no label" in out
    assert "ILSVRC2012_val_00009999: listed, but no ILSVRC2012_val_00009999.JPEG" in out
    assert "ILSVRC2012_val_00000002: listed, but no" in out
    from datamodules import ILSVRCLocalizationDataModule

    with pytest.raises(DataValidationError, match="unlabeled.JPEG: no label"):
        ILSVRCLocalizationDataModule(str(loc), num_workers=0).setup("validate")
    lenient = ILSVRCLocalizationDataModule(str(loc), num_workers=0, drop_invalid=True)
    lenient.setup("validate")
    assert len(lenient.datasets["val"]) == 5 - 2  # the unknown class and the unlabeled image left out


# -- the devkits' metrics on hand-computed cases ------------------------------------------------------
def _results(rows):
    return [{"image_id": i, "category_id": c, "bbox": [x1, y1, x2 - x1, y2 - y1], "score": s}
            for i, c, (x1, y1, x2, y2), s in rows]  # fmt: skip


CATS = [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]


def test_voc_ap_difficult_duplicates_and_the_two_definitions():
    truth = {1: (np.array([[0, 0, 10, 10], [20, 20, 30, 30]]), np.array([1, 1]), np.array([False, True]))}
    rows = [(1, 1, (0, 0, 10, 10), 0.9), (1, 1, (0, 0, 10, 10), 0.8), (1, 1, (20, 20, 30, 30), 0.7),
            (1, 1, (50, 50, 60, 60), 0.6)]  # fmt: skip
    # hit, duplicate (false positive), the difficult box (neither), a miss: recall 1 at precision 1 first
    assert evaluate_devkit(_results(rows), truth, CATS[:1], "voc07", [1])["mAP"] == pytest.approx(1.0)
    # three boxes found 1st, 3rd and 5th among five detections: recall 1/3, 1/3, 2/3, 2/3, 1 at precision
    # 1, 1/2, 2/3, 1/2, 3/5. 11-point: (4 x 1 + 3 x 2/3 + 4 x 3/5) / 11; area: (1 + 2/3 + 3/5) / 3
    truth = {1: (np.array([[0, 0, 10, 10], [20, 0, 30, 10], [40, 0, 50, 10]]), np.array([1, 1, 1]), np.zeros(3, bool))}
    rows = [(1, 1, (0, 0, 10, 10), 0.9), (1, 1, (90, 90, 99, 99), 0.8), (1, 1, (20, 0, 30, 10), 0.7),
            (1, 1, (60, 60, 70, 70), 0.6), (1, 1, (40, 0, 50, 10), 0.5)]  # fmt: skip
    curves = []
    voc07 = evaluate_devkit(_results(rows), truth, CATS[:1], "voc07", [1])
    area = evaluate_devkit(_results(rows), truth, CATS[:1], "voc", [1], curves=curves)
    assert voc07["mAP"] == pytest.approx(8.4 / 11) and area["mAP"] == pytest.approx((1 + 2 / 3 + 0.6) / 3)
    assert voc07["AP/a"] == voc07["mAP"] == voc07["AP50"]
    # the curve drawn is the devkit's rec and prec, one point a ranked detection, and its AP the class's
    (curve,) = curves
    assert (curve.name, curve.iou, curve.ap) == ("1", "0.50", area["AP/a"])
    assert curve.recall == pytest.approx([1 / 3, 1 / 3, 2 / 3, 2 / 3, 1])
    assert curve.precision == pytest.approx([1, 1 / 2, 2 / 3, 1 / 2, 3 / 5])


def test_ties_keep_the_listed_order_and_classes_without_truth_are_left_out():
    truth = {
        1: (np.array([[0, 0, 10, 10]]), np.array([1]), np.zeros(1, bool)),
        2: (np.zeros((0, 4)), np.zeros(0), np.zeros(0, bool)),
    }
    rows = [(1, 1, (50, 50, 60, 60), 0.5), (1, 1, (0, 0, 10, 10), 0.5), (2, 2, (0, 0, 5, 5), 0.9)]
    out = evaluate_devkit(_results(rows), truth, CATS, "voc", [1, 2])
    assert out["AP/a"] == pytest.approx(0.5)  # the miss ranks first: the devkit's stable sort
    assert "AP/b" not in out and out["mAP"] == pytest.approx(0.5)  # class b has no ground truth


def test_ilsvrc_small_object_threshold_and_matched_boxes():
    assert ilsvrc_thresholds(np.array([[0, 0, 8, 8]]))[0] == pytest.approx(64 / (18 * 18))
    assert ilsvrc_thresholds(np.array([[0, 0, 100, 100]]))[0] == 0.5
    truth = {1: (np.array([[0, 0, 8, 8]]), np.array([1]), np.zeros(1, bool))}
    rows = [(1, 1, (0, 0, 8, 3), 0.9)]  # IoU 24/64 = 0.375: above the 8x8 box's 0.198, below VOC's 0.5
    assert evaluate_devkit(_results(rows), truth, CATS[:1], "ilsvrc", [1])["mAP"] == pytest.approx(1.0)
    assert evaluate_devkit(_results(rows), truth, CATS[:1], "voc", [1])["mAP"] == pytest.approx(0.0)
    # a second detection of an already matched box takes the next box it overlaps enough (VOC: a duplicate)
    truth = {1: (np.array([[0, 0, 100, 100], [0, 0, 100, 60]]), np.array([1, 1]), np.zeros(2, bool))}
    rows = [(1, 1, (0, 0, 100, 90), 0.9), (1, 1, (0, 0, 100, 80), 0.8)]
    assert evaluate_devkit(_results(rows), truth, CATS[:1], "ilsvrc", [1])["mAP"] == pytest.approx(1.0)
    assert evaluate_devkit(_results(rows), truth, CATS[:1], "voc", [1])["mAP"] == pytest.approx(0.5)


def test_ap_definitions_directly():
    recall, precision = np.array([0.5, 1.0]), np.array([1.0, 0.5])
    assert area_ap(recall, precision) == pytest.approx(0.75)
    assert voc07_ap(recall, precision) == pytest.approx((6 * 1.0 + 5 * 0.5) / 11)


def test_localization_errors():
    truth = np.array([[0, 0, 10, 10], [50, 50, 90, 90]])
    right, wrong = (52, 50, 90, 92), (0, 0, 3, 3)
    assert top5_error([(3, wrong), (7, right)], 7, truth) == 0  # the true class's box is right
    assert top5_error([(7, wrong), (3, right)], 7, truth) == 1  # right box, wrong class; wrong box, right class
    assert top5_error([(1, right)] * 5 + [(7, right)], 7, truth) == 1  # a sixth guess is not read
    assert gt_known_error(right, truth) == 0 and gt_known_error(wrong, truth) == 1


# -- training on the shapes in these layouts ----------------------------------------------------------
SMALL = '{"rpn_post_nms_top_n_train": 300, "rpn_post_nms_top_n_test": 300, "box_batch_size_per_image": 128}'
#: a config's one step: few regions through the C4 head's per-region res5 (what the step costs), the same wiring
ONE_STEP = '{"rpn_post_nms_top_n_train": 32, "rpn_post_nms_top_n_test": 16, "box_batch_size_per_image": 16}'


# Training runs of minutes on a CPU: `pytest -m slow tests/test_tracks.py`. Thresholds sit well below the
# measured scores (2-core CPU, seed 0) and well above chance.
VOC_THRESHOLD = 0.08  # measured: AP50 (VOC07 11-point) 0.185 after 5 epochs (default recipe); chance about 0
LOC_THRESHOLD = 0.45  # measured: GT-class and top-5 LOC error 0.30 after 15 epochs (configs/demo_localize.yaml)


@pytest.mark.slow
def test_detection_trains_on_voc_layout_shapes(tmp_path):
    from tasks import detect

    cli = detect.main([
        "fit", "--data", "datamodules.ShapesVOCDataModule", "--data.root", str(tmp_path / "voc"),
        "--data.trainval", "64", "--data.test", "16", "--data.size", "96", "--data.batch_size", "4",
        "--data.num_workers", "0", "--model.backbone", "resnet18", "--model.norm", "bn", "--model.freeze_at", "0",
        "--model.min_size", "96", "--model.max_size", "96", "--model.fpn_channels", "64", "--model.detector_args",
        SMALL, "--trainer.max_epochs", "5", "--trainer.logger", "false", "--seed_everything", "0",
        "--trainer.default_root_dir", str(tmp_path / "runs"), *CPU,
    ])  # fmt: skip
    metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items()}
    assert cli.datamodule.protocol == "voc07"
    print(f"VOC-layout detection: val/AP50 (VOC07 11-point) {metrics['val/AP50']:.3f}")
    assert metrics["val/AP50"] == metrics["val/mAP"] > VOC_THRESHOLD, metrics
    assert {f"val/AP/{name}" for name in ("circle", "square", "triangle", "star", "ring")} <= set(metrics)
    # the devkit's curves, one a class: the VOC07 11-point AP of each is the logged AP of the class
    from tasks.metrics.devkits import voc07_ap
    from tasks.outputs.pr_curves import read_pr_curves

    curves = read_pr_curves(Path(cli.trainer.default_root_dir) / "pr_curves" / "val.csv")
    assert {name for name, _ in curves} == {"circle", "square", "triangle", "star", "ring"}
    for (name, iou), (_, recall, precision) in curves.items():
        assert iou == "0.50" and voc07_ap(np.array(recall), np.array(precision)) == pytest.approx(
            metrics[f"val/AP/{name}"], abs=1e-6
        )
    assert (Path(cli.trainer.default_root_dir) / "pr_curves" / "val.png").stat().st_size > 10_000


def _mean_box_error(root: Path) -> float:
    """The GT-class LOC error of answering every validation image with the training boxes' mean box."""
    from datamodules import ShapesLocalizationDataModule

    dm = ShapesLocalizationDataModule(str(root), train_per_class=48, val_per_class=6, size=48)
    mean = np.mean([box for _, _, boxes in dm._samples("train") for box in boxes], axis=0)
    return float(np.mean([gt_known_error(mean.tolist(), np.array(boxes)) for _, _, boxes in dm._samples("val")]))


@pytest.mark.slow
def test_localization_trains_on_cls_loc_layout_shapes(tmp_path):
    from tasks import localize

    cli = localize.main([
        "fit", "--config", str(ROOT / "configs" / "demo_localize.yaml"), "--data.root", str(tmp_path / "loc"),
        "--data.num_workers", "0", "--trainer.logger", "false", "--trainer.default_root_dir", str(tmp_path / "runs"),
        *CPU,
    ])  # fmt: skip
    metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items()}
    baseline = _mean_box_error(tmp_path / "loc")  # 0.70 on this set
    assert metrics["val/loc_err_gt"] < min(LOC_THRESHOLD, baseline - 0.2), (metrics, baseline)
    assert metrics["val/loc_err_top5"] < LOC_THRESHOLD, metrics


# -- the configs ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name",
    [
        "voc0712_resnet101",
        "imagenet_det_resnet101",
        pytest.param("imagenet_det_resnet101_competition", marks=pytest.mark.slow),
        "imagenet_loc_resnet101",
        pytest.param("imagenet_loc_resnet101_competition", marks=pytest.mark.slow),
    ],
)
def test_track_configs_parse_and_fit_one_step(name, tmp_path):
    """As the COCO configs are tested: each new config fits one step on the shapes in its layout."""
    from datasets import write_ilsvrc_det

    from datamodules.shapes_xml import generate_localization, generate_voc
    from tasks import detect, localize

    config = ["fit", "--config", str(ROOT / "configs" / f"{name}.yaml")]
    quick = ["--trainer.fast_dev_run", "true", "--trainer.default_root_dir", str(tmp_path / "runs"), *CPU]
    # the configs fine-tune: from scratch, BatchNorm and every stage train
    small = ["--model.weights_backbone", "null", "--model.min_size", "64", "--model.max_size", "96",
             "--model.detector_args", ONE_STEP, "--data.num_workers", "0",
             "--model.norm", "bn", "--model.freeze_at", "0"]  # fmt: skip
    if name == "voc0712_resnet101":
        voc = generate_voc(tmp_path / "VOCdevkit", trainval=8, test=4, size=64)
        shapes = json.dumps(["circle", "square", "triangle", "star", "ring"])
        detect.main([*config, "--data.root", str(voc), "--data.train_sets", '["2007:trainval"]', "--data.classes",
                     shapes, *small, *quick])  # fmt: skip
    elif name.startswith("imagenet_det_resnet101"):
        pyramid = ["--model.multiscale_testing", "[48, 64, 96]"] if "competition" in name else []
        cli = detect.main([*config, "--data.root", str(write_ilsvrc_det(tmp_path / "det", trainval=8, test=4)),
                           *small, *quick, *pyramid])  # fmt: skip
        hp = cli.model.hparams
        assert hp.global_context == ("competition" in name) and cli.model.box_refinement == hp.global_context
    else:
        loc = generate_localization(tmp_path / "loc", train_per_class=3, val_per_class=1, size=64)
        args = ["--data.root", str(loc), "--model.weights_backbone", "null", "--data.image_size", "64",
                "--data.eval_resize", "64", "--data.batch_size", "4", "--data.num_workers", "0", *quick]  # fmt: skip
        rpn_config = ["fit", "--config", str(ROOT / "configs" / "imagenet_loc_resnet101.yaml")]
        cli = localize.main([*(rpn_config if "competition" in name else config), *args])
        assert cli.model.hparams.head == "rpn" and cli.datamodule.num_classes == 5
        if "competition" in name:  # the R-CNN stage, on that RPN localizer's proposals
            cli.trainer.save_checkpoint(tmp_path / "rpn.ckpt")
            stage = ["--model.rpn_weights", str(tmp_path / "rpn.ckpt"), "--model.rcnn_crop", "32",
                     "--model.rcnn_proposals", "4", "--model.rcnn_regions", "8"]  # fmt: skip
            cli = localize.main([*config, *args, *stage])
            assert cli.model.hparams.head == "rpn_rcnn" and cli.model.hparams.rcnn_proposals == 4
    assert "Published" in (ROOT / "configs" / f"{name}.yaml").read_text()


#: measured: the two stages' GT-class LOC error against the RPN stage's own in the same run (see the README)
@pytest.mark.slow
def test_the_rcnn_stage_lowers_the_rpn_localizers_gt_class_error(tmp_path):
    """Appendix C's RPN+R-CNN on the shapes' CLS-LOC layout: the demo's RPN localizer, then the R-CNN stage
    trained on its proposals from that checkpoint; both stages are scored in the same validation."""
    from tasks import localize

    common = ["--data.root", str(tmp_path / "loc"), "--data.num_workers", "0", "--trainer.logger", "false", *CPU]
    demo = ["--config", str(ROOT / "configs" / "demo_localize.yaml"), *common]
    rpn = localize.main(["fit", *demo, "--trainer.default_root_dir", str(tmp_path / "rpn")])
    checkpoint = rpn.trainer.checkpoint_callback.best_model_path
    cli = localize.main([
        "fit", *demo, "--trainer.default_root_dir", str(tmp_path / "rcnn"), "--trainer.max_epochs", "6",
        "--model.head", "rpn_rcnn", "--model.rpn_weights", checkpoint, "--model.rcnn_crop", "32",
        "--model.rcnn_proposals", "16", "--model.rcnn_regions", "64",
    ])  # fmt: skip
    last = {k: float(v) for k, v in cli.trainer.callback_metrics.items()}
    # the checkpoint a user keeps (best.ckpt, by val/loc_err_top5), validated again: six epochs from scratch move
    # with the CPU's float arithmetic (the last epoch is printed beside it)
    (metrics,) = cli.trainer.validate(cli.model, datamodule=cli.datamodule, ckpt_path="best", verbose=False)
    print(
        f"RPN stage: val/loc_err_gt {metrics['val/rpn_loc_err_gt']:.3f}, top-5 {metrics['val/rpn_loc_err_top5']:.3f};"
        f" RPN+R-CNN, best.ckpt: {metrics['val/loc_err_gt']:.3f}, top-5 {metrics['val/loc_err_top5']:.3f};"
        f" its last epoch: {last['val/loc_err_gt']:.3f}, top-5 {last['val/loc_err_top5']:.3f}"
    )
    assert metrics["val/loc_err_gt"] < metrics["val/rpn_loc_err_gt"], (metrics, last)
    assert metrics["val/rpn_loc_err_gt"] == last["val/rpn_loc_err_gt"]  # the frozen stage scores alike each time
    # the RPN stage scored here is the checkpoint's own localizer: its best validation, to the digit
    assert metrics["val/rpn_loc_err_top5"] == pytest.approx(float(rpn.trainer.checkpoint_callback.best_model_score))
    rpn_state = torch.load(checkpoint, weights_only=True)["state_dict"]
    trained = torch.load(cli.trainer.checkpoint_callback.best_model_path, weights_only=True)["state_dict"]
    moved = [k for k, v in rpn_state.items() if not torch.equal(v, trained[k.replace("model.", "model.rpn.", 1)])]
    assert not moved, f"the frozen RPN stage changed: {moved[:4]}"  # its BatchNorm statistics included
