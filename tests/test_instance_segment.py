"""Mask R-CNN instance segmentation (``tasks.instance_segment``): the paper's two heads on any backbone, COCO's
instances with their masks through the transforms, COCOeval's segm on the written results, export, the
predictor, drawings and TTA."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import once_per_session
from datasets import CATEGORY_IDS, CPU, edit_coco, write_coco
from PIL import Image

from backbones import build_backbone
from datamodules.coco_instances import COCOInstanceDataModule
from tasks import instance_segment, load_predictor
from tasks.heads.mask_rcnn import build_mask_rcnn
from tasks.instance_segment import InstanceSegmentationTask

ROOT = Path(__file__).resolve().parents[1]
SMALL = {"rpn_post_nms_top_n_train": 100, "rpn_post_nms_top_n_test": 100, "box_batch_size_per_image": 64}


def _with_rle_objects(root: Path) -> Path:
    """The first non-crowd polygon object of every image also stored as a (non-crowd) compressed RLE, as
    COCO-format files written from masks are: both region kinds in one file."""
    from pycocotools import mask as mask_utils

    def to_rle(data: dict) -> None:
        sizes = {image["id"]: (image["height"], image["width"]) for image in data["images"]}
        seen = set()
        for ann in data["annotations"]:
            if ann["iscrowd"] or ann["image_id"] in seen or ann["bbox"][2] < 2:
                continue
            seen.add(ann["image_id"])
            height, width = sizes[ann["image_id"]]
            rle = mask_utils.merge(mask_utils.frPyObjects(ann["segmentation"], height, width))
            ann["segmentation"] = {"size": [height, width], "counts": rle["counts"].decode()}

    for split in ("train2017", "val2017"):
        edit_coco(root, split, to_rle)
    return root


@pytest.fixture(scope="session")
def coco(tmp_path_factory) -> Path:
    """Polygons, RLE objects, a crowd, a degenerate box and an image without objects, in both splits (written
    once for the session)."""

    def build(folder: Path) -> str:
        root = write_coco(folder / "coco", train_images=16, val_images=6, size=(96, 96), object_size=(24, 56))
        return str(_with_rle_objects(root))

    return Path(once_per_session(tmp_path_factory, "instances-coco", build))


# -- the network --------------------------------------------------------------------------------------------
def _targets(size: int = 96) -> list[dict]:
    masks = torch.zeros(2, size, size, dtype=torch.uint8)
    masks[0, 10:50, 12:40] = 1
    masks[1, 40:90, 50:80] = 1
    return [{"boxes": torch.tensor([[12.0, 10, 40, 50], [50, 40, 80, 90]]), "labels": torch.tensor([1, 2]),
             "masks": masks}]  # fmt: skip


HEADS = [("resnet18", "fpn", 28), ("resnet18", "c4", 14), ("preact_resnet18", "c4", 14), ("resnext50_32x4d", "fpn", 28)]


@pytest.mark.parametrize(("backbone", "head", "side"), HEADS)
def test_both_heads_train_a_step_and_predict_masks_at_the_image_size(backbone, head, side):
    torch.manual_seed(0)
    net = build_mask_rcnn(build_backbone(backbone), head=head, num_classes=3, min_size=96, max_size=96, **SMALL)
    if head == "c4":  # the paper's C4 mask head runs the box head's own res5 (the same weights), then deconv
        assert net.roi_heads.mask_head.res5 is net.roi_heads.box_head.res5
    seen = {}
    net.roi_heads.mask_predictor.register_forward_hook(lambda m, i, out: seen.update(logits=out.shape))
    losses = net.train()([torch.rand(3, 96, 96)], _targets())
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"}
    assert seen["logits"][1:] == (3, side, side)  # one mask per class: 28x28 (FPN), 14x14 (C4, Figure 4)
    sum(losses.values()).backward()
    out = net.eval()([torch.rand(3, 80, 96)])[0]
    assert out["masks"].shape == (len(out["boxes"]), 1, 80, 96)


def test_the_resnet50_fpn_head_is_torchvisions_maskrcnn_parameter_for_parameter():
    import torchvision

    reference = torchvision.models.detection.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None)
    ours = InstanceSegmentationTask(backbone="resnet50", head="fpn", num_classes=90).detector
    expected = {k: v.shape for k, v in reference.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert {k: v.shape for k, v in ours.state_dict().items()} == expected
    assert sum(v.numel() for v in expected.values()) == 44_507_633  # (with the frozen BNs' 26,560 channels x 4)


# -- the data -----------------------------------------------------------------------------------------------
def test_each_object_carries_its_own_mask_through_the_flip(coco):
    from pycocotools.coco import COCO

    dm = COCOInstanceDataModule(root=str(coco), batch_size=2, num_workers=0, flip_prob=1.0)
    dm.setup("fit")
    dataset = dm.datasets["train"]
    gt = COCO(str(coco / "annotations" / "instances_train2017.json"))
    crowd_images = {a["image_id"] for a in gt.dataset["annotations"] if a["iscrowd"]}
    rle_objects = 0
    for index in range(len(dataset)):
        sample = dataset[index]
        target = sample["target"]
        masks, boxes = target["masks"], target["boxes"]
        assert masks.dtype == torch.uint8 and masks.shape == (len(boxes), 96, 96) and len(boxes) > 0
        image_id = sample["image_id"]
        anns = [a for a in gt.loadAnns(gt.getAnnIds(imgIds=[image_id])) if not a["iscrowd"] and a["bbox"][2] > 1]
        assert len(anns) == len(boxes)  # the crowd and the degenerate box are not training targets
        for mask, ann in zip(masks, anns):  # the annotation's own pixels (pycocotools), mirrored with the image
            assert torch.equal(mask, torch.from_numpy(gt.annToMask(ann)).flip(-1))
            rle_objects += isinstance(ann["segmentation"], dict)
        for mask, box in zip(masks, boxes):  # the mask lies in its (mirrored) box
            ys, xs = torch.nonzero(mask, as_tuple=True)
            assert (
                xs.min() >= box[0] - 1 and xs.max() <= box[2] + 1 and ys.min() >= box[1] - 1 and ys.max() <= box[3] + 1
            )
    assert rle_objects >= len(dataset) and crowd_images  # both region kinds were read; the file has a crowd
    assert not hasattr(dataset, "coco") and not hasattr(dataset.regions, "dataset")  # flat arrays, no index


# -- the commands: fit, test, export, predict, the predictor ------------------------------------------------------
def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, cwd=cwd, env=env,
                            timeout=900)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="session")
def fitted(coco, tmp_path_factory) -> Path:
    """``python -m tasks.instance_segment fit`` as a user runs it (5 epochs from scratch on a small file), once
    for the session: its last checkpoint."""

    def fit(tmp: Path) -> str:
        _run(["tasks.instance_segment", "fit", "--data", "datamodules.COCOInstanceDataModule", "--data.root",
              str(coco), "--data.batch_size", "2", "--data.num_workers", "0", "--model.backbone", "resnet18",
              "--model.norm", "bn", "--model.freeze_at", "0", "--model.min_size", "96", "--model.max_size", "96",
              "--model.fpn_channels", "32", "--model.detector_args", json.dumps(SMALL), "--trainer.max_epochs", "5",
              "--trainer.logger", "false", "--trainer.enable_progress_bar", "false", "--seed_everything", "0",
              "--trainer.default_root_dir", str(tmp / "runs"), *CPU], tmp)  # fmt: skip
        return str(next((tmp / "runs").rglob("last.ckpt")))

    return Path(once_per_session(tmp_path_factory, "instances-fitted", fit))


def _cocoeval(gt, results: list[dict], iou_type: str, category: int | None = None):
    from pycocotools.cocoeval import COCOeval

    evaluator = COCOeval(gt, gt.loadRes(results), iouType=iou_type)
    if category is not None:
        evaluator.params.catIds = [category]
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    return evaluator.stats


# The tests on the fitted checkpoint run in the long tier: the fit (~50 s) held both default-tier workers
@pytest.mark.slow
def test_logged_mask_metrics_are_pycocotools_segm_cocoeval_on_the_written_results(coco, fitted, tmp_path):
    """After the short fit, ``test``: the logged box and mask numbers are pycocotools' COCOeval (``bbox``,
    ``segm``) run directly on the results file ``test`` wrote, and so is each class's mask AP."""
    from pycocotools.coco import COCO

    callbacks = torch.load(fitted, weights_only=True)["callbacks"]
    assert any("'monitor': 'val/mask_mAP'" in key for key in callbacks)  # best.ckpt is chosen by the mask AP
    out = tmp_path / "results.json"
    tested = instance_segment.main([
        "test", "--data", "datamodules.COCOInstanceDataModule", "--data.root", str(coco), "--data.batch_size", "2",
        "--data.num_workers", "0", "--ckpt_path", str(fitted),
        "--model.detections_file", str(out), "--model.box_score_thresh", "0.0", "--trainer.logger", "false",
        "--trainer.default_root_dir", str(tmp_path / "test"), *CPU,
    ])  # fmt: skip
    results = json.loads(out.read_text())
    assert results and all(set(r) == {"image_id", "category_id", "bbox", "score", "segmentation"} for r in results)
    assert {r["category_id"] for r in results} <= set(CATEGORY_IDS.values())
    assert all(r["segmentation"]["size"] == [96, 96] and isinstance(r["segmentation"]["counts"], str) for r in results)
    gt = COCO(str(coco / "annotations" / "instances_val2017.json"))
    metrics = {k: float(v) for k, v in tested.trainer.callback_metrics.items()}
    names = ["mAP", "AP50", "AP75", "APs", "APm", "APl"]
    # for segm the rows go in without their boxes, as detectron2's COCOEvaluator does: loadRes takes a row with a
    # bbox as a box result and its area from the box, which would sort masks into other size ranges (APs..APl)
    masks_only = [{k: v for k, v in r.items() if k != "bbox"} for r in results]
    for iou_type, prefix in (("bbox", ""), ("segm", "mask_")):
        stats = _cocoeval(gt, [dict(r) for r in (results if iou_type == "bbox" else masks_only)], iou_type)
        for i, name in enumerate(names):
            assert metrics[f"test/{prefix}{name}"] == pytest.approx(stats[i], abs=1e-6), (iou_type, name)
    assert metrics["test/mask_AP50"] > 0  # something was segmented: the numbers compared are not all zeros
    per_class = 0
    for name, category in CATEGORY_IDS.items():
        if f"test/mask_AP/{name}" in metrics:
            stats = _cocoeval(gt, [dict(r) for r in masks_only], "segm", category)
            assert metrics[f"test/mask_AP/{name}"] == pytest.approx(stats[0], abs=1e-6), name
            assert metrics[f"test/mask_AP50/{name}"] == pytest.approx(stats[1], abs=1e-6), name
            per_class += 1
    assert per_class >= 2
    curves = Path(tested.trainer.default_root_dir) / "pr_curves"
    assert (curves / "test.png").is_file() and (curves / "test_mask.png").is_file()


def test_one_view_tta_equals_plain_evaluation_and_mirrored_masks_come_back(coco, tmp_path):
    from tasks.heads.tta import detect_with_tta

    torch.manual_seed(0)
    net = build_mask_rcnn(build_backbone("resnet18"), head="fpn", num_classes=3, min_size=96, max_size=96,
                          fpn_channels=32, box_score_thresh=0.0, **SMALL).eval()  # fmt: skip
    image = torch.rand(3, 96, 80)
    with torch.no_grad():
        plain = net([image])[0]
        one = detect_with_tta(net, [image], [1.0], flip=False)[0]
        assert all(torch.equal(plain[k], one[k]) for k in plain)
        mirrored = net([image.flip(-1)])[0]
        # a mirror-only merge of a view that sees the image mirrored: its masks come back mirrored
        both = detect_with_tta(net, [image], [1.0], flip=True)[0]
    assert both["masks"].shape[-2:] == (96, 80)
    flipped_back = mirrored["masks"].flip(-1)
    for mask, score in zip(both["masks"], both["scores"]):
        from_plain = (plain["scores"] == score).any()
        from_mirror = [torch.equal(mask, m) for m, s in zip(flipped_back, mirrored["scores"]) if s == score]
        assert from_plain or any(from_mirror)


def _decode(rle: dict) -> np.ndarray:
    from pycocotools import mask as mask_utils

    return mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()}).astype(bool)


def _instances_found(predictor, coco: Path) -> dict[str, int]:
    """How many instances the predictor finds on each validation image (by path, in order)."""
    return {str(path): len(predictor(str(path))["boxes"]) for path in sorted((coco / "val2017").glob("*.jpg"))}


def _busiest_scene(counts: dict[str, int]) -> str:
    """The validation image the briefly trained model finds the most instances on (which one depends on the
    CPU's float arithmetic: on one machine the first image gave none)."""
    best = max(counts, key=counts.get)
    assert counts[best] >= 3, counts  # 5 epochs from scratch find at least three instances somewhere
    return best


@pytest.mark.slow
def test_predict_writes_masks_the_predictor_returns_and_draws_them(coco, fitted, tmp_path):
    out = tmp_path / "pred" / "instances.json"
    predictor = load_predictor(fitted)
    counts = _instances_found(predictor, coco)
    first = _busiest_scene(counts)
    threshold = float(predictor(str(first))["scores"][2]) - 1e-4  # the three best of a briefly trained model drawn
    _run(["tasks.instance_segment", "predict", "--ckpt_path", str(fitted), "--data",
          "datamodules.COCOInstanceDataModule", "--data.root", str(coco), "--data.predict_root",
          str(coco / "val2017"), "--data.num_workers", "0", "--data.batch_size", "1", "--model.detections_file",
          str(out), "--model.draw_predictions", "true", "--model.draw_threshold", str(threshold),
          "--trainer.logger", "false", *CPU], tmp_path)  # fmt: skip
    rows = json.loads(out.read_text())
    files = sorted({r["file_name"] for r in rows})
    found_any = [path for path, found in counts.items() if found]
    assert files == found_any and len(files) >= 3  # a row for each instance found, of every image with one
    for name in {*files[:2], first}:
        found = predictor(str(name))
        written = sorted((r for r in rows if r["file_name"] == name), key=lambda r: -r["score"])
        assert len(written) == len(found["boxes"]) and found["masks"].shape[1:] == (96, 96)
        for row, mask, box in zip(written, found["masks"], found["boxes"]):
            assert np.array_equal(_decode(row["segmentation"]), mask.numpy())  # the same pixels
            assert np.allclose(row["bbox"][:2], box[:2].numpy(), atol=1e-2)
    # the drawing of one image: each instance above the threshold blended in its class color over its pixels
    name = str(first)
    drawn = np.asarray(Image.open(out.parent / "instances_images" / f"{Path(name).stem}.jpg").convert("RGB"))
    original = np.asarray(Image.open(name).convert("RGB").resize(drawn.shape[1::-1], Image.Resampling.NEAREST))
    found = predictor(str(name))
    keep = found["scores"] >= threshold
    assert keep.sum() == 3
    scale = drawn.shape[0] // 96
    covered = found["masks"][keep].any(0).numpy().repeat(scale, 0).repeat(scale, 1)
    change = np.abs(drawn.astype(int) - original.astype(int)).sum(-1)
    assert change[covered].mean() > 3 * change[~covered].mean()  # the masks' pixels changed; the rest mostly not


# the long tier (tests/test_commands.py exports Mask R-CNN to ONNX and runs it in the default tier, without
# comparing it to eager)
@pytest.mark.slow
@pytest.mark.parametrize("format", ["onnx", "pt2"])
def test_export_equals_eager_boxes_and_mask_pixels(format, coco, fitted, tmp_path):
    """``python -m tasks.export`` on the checkpoint: ONNX Runtime's (or the ``torch.export`` program's) boxes
    equal eager's to 1e-3 and each mask's pixels above 0.5 differ on at most 0.5 % of its area."""
    out = tmp_path / f"model.{format}"
    _run(["tasks.export", str(fitted), str(out)], tmp_path)  # the format from the suffix
    predictor = load_predictor(fitted)
    task = predictor.task
    if format == "onnx":
        ort = pytest.importorskip("onnxruntime")
        session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs()]

        def run(image):
            return dict(zip(names, (torch.from_numpy(v) for v in session.run(None, {"image": image.numpy()}))))
    else:
        program = torch.export.load(str(out)).module()

        def run(image):
            return dict(zip(("boxes", "labels", "scores", "masks"), program(image)))

    from torchvision.io import decode_image

    scene = decode_image(_busiest_scene(_instances_found(predictor, coco))).float() / 255
    for image, some in ((scene, True), (torch.full((3, 96, 96), 0.5), False)):  # shapes, and a blank image
        with torch.no_grad():
            eager = task.detector.eval()([image])[0]
        got = run(image)
        assert (len(eager["boxes"]) > 0) == some and got["masks"].shape == eager["masks"].shape
        assert torch.allclose(got["boxes"], eager["boxes"], atol=1e-3) and torch.equal(got["labels"], eager["labels"])
        for mine, theirs in zip(got["masks"] > 0.5, eager["masks"] > 0.5):
            assert (mine != theirs).sum() <= max(1, 0.005 * theirs.sum())


ONE_STEP = {"rpn_post_nms_top_n_train": 32, "rpn_post_nms_top_n_test": 16, "box_batch_size_per_image": 16}


def test_boxes_only_data_is_refused_naming_the_instance_datamodule(coco, tmp_path):
    with pytest.raises(ValueError, match="gives no masks.*COCOInstanceDataModule"):
        instance_segment.main([
            "fit", "--data", "datamodules.COCODetectionDataModule", "--data.root", str(coco), "--data.num_workers",
            "0", "--model.backbone", "resnet18", "--model.norm", "bn", "--model.freeze_at", "0", "--model.min_size",
            "64", "--model.max_size", "64", "--model.fpn_channels", "16", "--model.detector_args",
            json.dumps(ONE_STEP), "--trainer.fast_dev_run", "true", "--trainer.default_root_dir",
            str(tmp_path / "runs"), *CPU,
        ])  # fmt: skip


def test_the_demo_config_trains_and_logs_masks_to_wandb(tmp_path, monkeypatch):
    """configs/demo_instances.yaml on a few shapes, one epoch: W&B (offline) gets validation samples with the
    predicted and true masks, the true masks holding the shapes' classes."""
    from datasets import logged_run
    from wandb_offline import media_rows

    monkeypatch.delenv("WANDB_MODE", raising=False)
    cli = instance_segment.main([
        "fit", "--config", str(ROOT / "configs" / "demo_instances.yaml"), "--data.root", str(tmp_path / "data"),
        "--data.num_train_images", "8", "--data.num_val_images", "4", "--data.num_workers", "0",
        "--trainer.max_epochs", "1", "--trainer.default_root_dir", str(tmp_path / "runs"), *CPU,
    ])  # fmt: skip
    logged = logged_run(Path(cli.trainer.default_root_dir) / "wandb")
    (samples,) = media_rows(logged, "val/samples")
    assert samples["count"] == 4 and len(samples["all_masks"]) == 4 and len(samples["box_data"]) == 4
    truth = np.asarray(Image.open(logged["dir"] / "files" / samples["all_masks"][0]["ground_truth"]["path"]))
    classes = set(np.unique(truth).tolist()) - {0}
    assert classes and classes <= {1, 2, 3, 4, 5}
    assert "val/mask_mAP" in cli.trainer.callback_metrics


def test_check_names_the_file_and_annotation_of_a_broken_region(coco, tmp_path):
    """``python -m datamodules.check`` on instance data: an RLE whose size is not the image's is an error, a
    polygon of two points a warning, each naming the file and the annotation id."""
    import shutil

    root = tmp_path / "coco"
    shutil.copytree(coco, root)

    def break_two(data: dict) -> None:
        objects = (a for a in data["annotations"] if not a["iscrowd"] and isinstance(a["segmentation"], list))
        first, second = next(objects), next(objects)
        first["segmentation"] = {"size": [10, 10], "counts": "PPY8"}
        second["segmentation"] = [[1.0, 1.0, 5.0, 5.0]]
        data["broken"] = [first["id"], second["id"]]

    path = edit_coco(root, "val2017", break_two)
    rle_id, polygon_id = json.loads(path.read_text())["broken"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "datamodules.check", "--data", "datamodules.COCOInstanceDataModule",
               "--data.root", str(root)]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode != 0
    out = result.stdout + result.stderr
    assert "instances_val2017.json" in out
    assert f"annotation id {rle_id}" in out and "its RLE mask is 10x10 (height x width)" in out
    assert f"annotation id {polygon_id}" in out and "are not polygons" in out
