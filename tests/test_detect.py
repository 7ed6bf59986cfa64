"""tasks.detect: both heads over the zoo, COCO data handling, COCOeval-exact metrics, learning."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from datasets import CATEGORY_IDS, CPU, classify_checkpoint, logged_run, write_coco
from PIL import Image
from wandb_offline import metric_series

from datamodules import COCODetectionDataModule
from tasks import detect, instance_segment
from tasks.detect import DetectionTask
from tasks.outputs.pr_curves import read_pr_curves
from tasks.run.cli import TaskCLI

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
DETECTION_CONFIGS = sorted(
    p for p in CONFIGS.glob("coco_*.yaml") if "fcn" not in p.stem and "torchvision" not in p.stem
)  # Faster R-CNN's and Mask R-CNN's (coco_mask_rcnn_*, run by tasks.instance_segment)
SMALL = {"rpn_post_nms_top_n_train": 200, "rpn_post_nms_top_n_test": 200, "box_batch_size_per_image": 64}
#: one step's wiring: few regions through the C4 head's per-region res5 (what a step costs)
ONE_STEP = {"rpn_post_nms_top_n_train": 32, "rpn_post_nms_top_n_test": 16, "box_batch_size_per_image": 16}


@pytest.fixture(scope="module")
def coco(tmp_path_factory) -> Path:
    return write_coco(tmp_path_factory.mktemp("coco"), train_images=8, val_images=6)


def _targets(n: int = 2):
    return [{"boxes": torch.tensor([[4.0, 6.0, 40.0, 50.0]]), "labels": torch.tensor([1 + i % 2])} for i in range(n)]


@pytest.mark.parametrize("head", ["fpn", "c4"])
@pytest.mark.parametrize("backbone", ["resnet18", "resnet50", "resnext50_32x4d", "preact_resnet50"])
def test_both_heads_train_a_step_with_any_backbone(backbone, head):
    task = DetectionTask(backbone=backbone, head=head, num_classes=2, min_size=64, max_size=64, detector_args=ONE_STEP)
    task.detector.train()
    losses = task(list(torch.rand(2, 3, 64, 64)), _targets())
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    sum(losses.values()).backward()
    trainable = [p for p in task.parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None for p in trainable)
    task.detector.eval()
    with torch.no_grad():
        (out,) = task([torch.rand(3, 64, 64)])
    assert set(out) == {"boxes", "labels", "scores"}


def test_c4_box_head_is_the_backbones_res5(tmp_path):
    from backbones import build_backbone

    reference = build_backbone("resnet50")
    torch.nn.init.normal_(reference.layer4[2].conv3.weight)
    path = tmp_path / "r50.pth"
    torch.save(reference.state_dict(), path)
    task = DetectionTask(backbone="resnet50", head="c4", num_classes=3, weights_backbone=str(path))
    detector = task.detector
    res5 = detector.roi_heads.box_head.res5
    assert [type(m).__name__ for m in res5] == ["Sequential"]  # exactly the backbone's layer4
    ours = dict(res5[0].state_dict())
    theirs = {k.removeprefix("layer4."): v for k, v in reference.state_dict().items() if k.startswith("layer4.")}
    assert ours.keys() == {k for k in theirs if not k.endswith("num_batches_tracked")}
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert not hasattr(detector.backbone.body, "layer4")  # res5 is not in the shared trunk
    assert detector.backbone.out_channels == 1024 and detector.roi_heads.box_predictor.cls_score.in_features == 2048
    preact = DetectionTask(backbone="preact_resnet50", head="c4", num_classes=3).detector.roi_heads.box_head.res5
    assert type(preact[1]).__name__ == "FrozenBatchNorm2d" and type(preact[2]).__name__ == "ReLU"  # final BN+ReLU


def test_a_classification_checkpoint_seeds_the_detector(tmp_path):
    ckpt, trained = classify_checkpoint(tmp_path, "resnet18")
    for head in ("fpn", "c4"):
        task = DetectionTask(backbone="resnet18", head=head, num_classes=2, weights_backbone=ckpt)
        body = dict(task.detector.backbone.body.state_dict())
        if head == "c4":
            body.update({f"layer4.{k}": v for k, v in task.detector.roi_heads.box_head.res5[0].state_dict().items()})
        for key, value in trained.items():
            if key.startswith(("layer1.", "layer2.", "layer3.", "layer4.")) and not key.endswith("num_batches_tracked"):
                assert torch.equal(body[key], value), key
        assert "fc.weight" not in body
    from backbones import WeightsError

    with pytest.raises(WeightsError, match="trained with backbone 'resnet18', but this model is 'resnet34'"):
        DetectionTask(backbone="resnet34", num_classes=2, weights_backbone=ckpt)


def test_coco_datamodule_handles_real_coco_quirks(coco):
    dm = COCODetectionDataModule(str(coco), batch_size=2, num_workers=0)
    assert dm.category_ids == [3, 7, 12, 40, 90] and dm.num_classes == 5
    dm.setup("fit")
    train, val = dm.datasets["train"], dm.datasets["val"]
    assert not hasattr(train, "coco")  # flat arrays only: loader workers copy no Python objects
    files = {split: json.loads(dm.annotation_file(split).read_text()) for split in ("train", "val")}
    assert max(i["id"] for i in files["train"]["images"]) not in train.ids  # no objects: skipped for training ...
    assert max(i["id"] for i in files["val"]["images"]) in val.ids  # ... but evaluated
    first = train.ids[0]
    boxes, categories = train.targets[first]
    raw = [a for a in files["train"]["annotations"]
           if a["image_id"] == first and not a["iscrowd"] and a["bbox"][2] > 1]  # fmt: skip
    assert len(categories) == len(raw)  # the crowd region and the degenerate box are not training targets
    assert train.dropped["degenerate box"] == 1
    x, y, w, h = raw[0]["bbox"]
    assert torch.allclose(boxes[0], torch.tensor([x, y, x + w, y + h]), atol=1e-4)  # xywh -> xyxy
    assert set(categories.tolist()) <= set(CATEGORY_IDS.values())
    batch = next(iter(dm.train_dataloader()))
    assert len(batch["images"]) == 2 and batch["images"][0].dtype == torch.float32
    sizes = [train.image_sizes()[train.ids.index(i)] for i in batch["image_ids"]]
    assert len({w / h > 1 for w, h in sizes}) == 1


@pytest.mark.parametrize(
    "config",
    [pytest.param(p, marks=pytest.mark.slow) if "competition" in p.stem else p for p in DETECTION_CONFIGS],
    ids=lambda p: p.stem,
)
def test_every_detection_config_fits_with_fast_dev_run(config, coco, tmp_path):
    task = instance_segment if "mask_rcnn" in config.stem else detect
    args = ["fit", "--config", str(config), "--data.root", str(coco), "--data.batch_size", "2", "--data.num_workers",
            "0", "--model.weights_backbone", "null", "--model.min_size", "64", "--model.max_size", "96",
            "--model.detector_args", json.dumps(ONE_STEP), "--trainer.fast_dev_run", "true",
            "--trainer.default_root_dir", str(tmp_path / "runs"), *CPU]  # fmt: skip
    if "competition" in config.stem:  # its pyramid, at the small images' sides
        args += ["--model.multiscale_testing", "[48, 64, 96]"]
    # the configs fine-tune with frozen BN and stages: without their pretrained weights that is refused at once
    with pytest.raises(ValueError, match=r"a random network would train.*--model.norm bn --model.freeze_at 0"):
        task.main(args)
    assert not (tmp_path / "runs").exists()  # before anything was made
    cli = task.main([*args, "--model.norm", "bn", "--model.freeze_at", "0"])
    assert cli.config.fit.trainer.benchmark is False  # image shapes vary: no per-shape cuDNN search
    if task is instance_segment:
        assert type(cli.model.detector).__name__ == "MaskRCNN" and "val/mask_mAP" in cli.trainer.callback_metrics


def _short_training(root: Path, runs: Path, epochs: int, extra: list[str] = ()) -> TaskCLI:
    return detect.main([
        "fit", "--data", "datamodules.COCODetectionDataModule", "--data.root", str(root),
        "--data.batch_size", "4", "--data.num_workers", "0", "--model.backbone", "resnet18",
        "--model.norm", "bn", "--model.freeze_at", "0", "--model.min_size", "128", "--model.max_size", "128",
        "--model.fpn_channels", "64", "--model.detector_args", json.dumps(SMALL),
        "--model.optimizer", "torch.optim.SGD", "--model.optimizer.lr", "0.02", "--model.optimizer.momentum", "0.9",
        "--model.optimizer.weight_decay", "0.0001",
        "--model.scheduler", "tasks.core.schedulers.WarmupMultiStepLR", "--model.scheduler.milestones", "[1000]",
        "--model.scheduler.warmup_iters", "40",
        "--trainer.max_epochs", str(epochs), "--trainer.log_every_n_steps", "5", "--seed_everything", "0",
        "--trainer.default_root_dir", str(runs), "--run_name", "shapes", *CPU, *extra,
    ])  # fmt: skip


@pytest.mark.slow
def test_short_training_detects(tmp_path):
    root = write_coco(tmp_path / "shapes", train_images=120, val_images=20, size=(128, 128), object_size=(24, 56))
    cli = _short_training(root, tmp_path / "runs", epochs=5)
    logged = logged_run(Path(cli.trainer.default_root_dir) / "wandb")
    ap50 = metric_series(logged, "val/AP50")
    assert len(ap50) == 5 and ap50[-1] > 0.15, ap50  # from scratch, on 2 CPU cores, in ~1 minute
    losses = metric_series(logged, "train/loss_epoch")
    assert losses[-1] < 0.8 * losses[0]


def test_tests_logged_metrics_are_pycocotools_cocoeval_on_the_written_detections(tmp_path):
    """A short fit (the learning itself is the slow test above), then ``test``: the logged numbers are
    pycocotools' COCOeval run directly on the detections file ``test`` wrote, in the dataset's category ids
    -- its twelve numbers: the six APs and the six average recalls."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    root = write_coco(tmp_path / "shapes", train_images=8, val_images=6, size=(96, 96), object_size=(24, 56))
    cli = _short_training(root, tmp_path / "runs", epochs=2, extra=["--model.min_size", "96", "--model.max_size", "96",
                                                                   "--model.box_score_thresh", "0.0"])  # fmt: skip
    out = tmp_path / "detections.json"
    tested = detect.main([
        "test", "--data", "datamodules.COCODetectionDataModule", "--data.root", str(root), "--data.batch_size", "4",
        "--data.num_workers", "0", "--ckpt_path", cli.trainer.checkpoint_callback.best_model_path,
        "--model.detections_file", str(out), "--model.box_score_thresh", "0.0", "--trainer.logger", "false",
        "--trainer.default_root_dir", str(tmp_path / "runs"), *CPU,
    ])  # fmt: skip
    results = json.loads(out.read_text())
    assert results and {r["category_id"] for r in results} <= set(CATEGORY_IDS.values())  # original COCO ids
    gt = COCO(str(root / "annotations" / "instances_val2017.json"))
    evaluator = COCOeval(gt, gt.loadRes(str(out)), iouType="bbox")
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    metrics = tested.trainer.callback_metrics
    assert evaluator.stats[1] > 0  # something was found: the numbers compared are not all zeros
    assert evaluator.stats[8] > 0  # AR100: something recalled
    names = ["mAP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"]
    for i, name in enumerate(names):  # COCOeval's twelve numbers, in its order
        assert metrics[f"test/{name}"].item() == pytest.approx(evaluator.stats[i], abs=1e-6), name

    # the precision-recall curves test wrote: each curve's mean precision over COCO's 101 recall points is the
    # logged AP (overall at 0.50:0.95, 0.50, 0.75; per class at 0.50:0.95 and 0.50); the picture is drawn
    test_dir = Path(tested.trainer.default_root_dir)
    curves = read_pr_curves(test_dir / "pr_curves" / "test.csv")
    logged = {("all", "0.50:0.95"): "mAP", ("all", "0.50"): "AP50", ("all", "0.75"): "AP75"}
    for (name, iou), (_, recall, precision) in curves.items():
        assert len(recall) == 101 and recall[0] == 0.0 and recall[-1] == 1.0
        key = logged.get((name, iou)) or {"0.50:0.95": f"AP/{name}", "0.50": f"AP50/{name}"}.get(iou)
        if key is not None:
            assert sum(precision) / 101 == pytest.approx(metrics[f"test/{key}"].item(), abs=1e-6), (name, iou)
    classes = {name for name, _ in curves} - {"all"}
    assert classes and classes <= set(CATEGORY_IDS) and len(curves) == 3 * (len(classes) + 1)
    picture = Image.open(test_dir / "pr_curves" / "test.png")
    assert picture.size == (1280, 560) and len(picture.convert("RGB").getcolors(1 << 24)) > 50  # drawn, not blank
    assert (Path(cli.trainer.default_root_dir) / "pr_curves" / "val.png").is_file()  # fit's validation, too


def test_category_ids_round_trip():
    task = DetectionTask(backbone="resnet18", num_classes=5, min_size=64, max_size=64)
    task.category_ids = list(CATEGORY_IDS.values())
    labels = task._labels_for(torch.tensor([90, 3, 40]))
    assert labels.tolist() == [5, 1, 4]
    from tasks.metrics.coco import to_coco_results

    rows = to_coco_results(torch.tensor([[1.0, 2.0, 11.0, 22.0]] * 3), torch.tensor([0.9, 0.8, 0.7]), labels, 42,
                           task.label_to_category())  # fmt: skip
    assert [r["category_id"] for r in rows] == [90, 3, 40]
    assert rows[0]["bbox"] == [1.0, 2.0, 10.0, 20.0] and rows[0]["image_id"] == 42
    with pytest.raises(ValueError, match="category id 8 is not one of the model's"):
        task._labels_for(torch.tensor([8]))


@pytest.mark.parametrize("backend", ["pycocotools", "faster_coco_eval"])
def test_per_class_ap_equals_pycocotools_run_on_each_category(backend, tmp_path):
    """``val/AP/<class>`` and ``val/AP50/<class>`` on hand-made detections for the shapes' validation
    file: exact boxes for every circle (AP 1 by hand), boxes shifted by their width for every square (IoU
    0: AP 0), exact boxes for half the triangles, ranked below shifted ones for the other half; each equals
    pycocotools' COCOeval restricted to that one category (``params.catIds``)."""
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from tasks.metrics.coco import evaluate_coco

    root = write_coco(tmp_path / "shapes", train_images=1, val_images=8, size=(96, 96), object_size=(16, 36))
    annotation_file = root / "annotations" / "instances_val2017.json"
    gt = COCO(str(annotation_file))
    results, triangles = [], 0
    for a in gt.loadAnns(gt.getAnnIds(iscrowd=False)):
        x, y, w, h = a["bbox"]
        if a["category_id"] == CATEGORY_IDS["circle"]:
            results.append(
                {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": [x, y, w, h], "score": 0.9}
            )
        elif a["category_id"] == CATEGORY_IDS["square"]:
            results.append(
                {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": [x + w, y, w, h], "score": 0.8}
            )
        elif a["category_id"] == CATEGORY_IDS["triangle"]:
            triangles += 1
            box = [x, y, w, h] if triangles % 2 else [x + w, y + h, w, h]
            results.append(
                {
                    "image_id": a["image_id"],
                    "category_id": a["category_id"],
                    "bbox": box,
                    "score": 0.5 + 0.01 * (triangles % 2 == 0),
                }
            )
    image_ids = gt.getImgIds()
    _, per_class = evaluate_coco(annotation_file, results, image_ids, backend)
    assert per_class[CATEGORY_IDS["circle"]] == pytest.approx((1.0, 1.0))
    assert per_class[CATEGORY_IDS["square"]] == pytest.approx((0.0, 0.0))
    for cid in (CATEGORY_IDS["circle"], CATEGORY_IDS["square"], CATEGORY_IDS["triangle"]):
        with contextlib.redirect_stdout(io.StringIO()):
            evaluator = COCOeval(gt, gt.loadRes([dict(r) for r in results]), iouType="bbox")
            evaluator.params.imgIds, evaluator.params.catIds = sorted(image_ids), [cid]
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        assert per_class[cid] == pytest.approx((evaluator.stats[0], evaluator.stats[1]), abs=1e-6), cid
    assert 0.0 < per_class[CATEGORY_IDS["triangle"]][1] < 1.0  # half found, ranked below the misses


def test_the_frozen_from_scratch_refusal_is_fits_alone_and_not_a_resumed_ones():
    """``refuse_arguments``, the one hook the CLI calls before anything is made: the frozen-BN refusal stops
    only a ``fit`` from random weights; ``validate`` and a resumed ``fit`` (``--ckpt_path``) pass, and the
    ensemble's refusals (the mixin's) still apply to the detector."""
    frozen = {"norm": "frozen_bn", "freeze_at": 2, "weights": None, "weights_backbone": None}
    with pytest.raises(ValueError, match=r"a random network would train"):
        DetectionTask.refuse_arguments("fit", frozen, None)
    DetectionTask.refuse_arguments("validate", frozen, None)
    DetectionTask.refuse_arguments("fit", frozen, "runs/last.ckpt")
    DetectionTask.refuse_arguments("fit", {**frozen, "weights_backbone": "backbone.pth"}, None)
    with pytest.raises(ValueError, match=r"model.ensemble is for validate, test and predict"):
        DetectionTask.refuse_arguments("fit", {**frozen, "ensemble": ["a.ckpt"]}, None)
