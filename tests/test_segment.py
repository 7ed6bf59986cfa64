"""tasks.segment: both FCN heads over the zoo, COCO-derived masks, confusion-matrix metrics, learning."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import CATEGORY_IDS, CPU, classify_checkpoint, logged_run, pycocotools_semantic_mask, write_coco
from PIL import Image
from pycocotools import mask as mask_utils
from torchmetrics.classification import MulticlassConfusionMatrix
from wandb_offline import media_rows, metric_series

from datamodules import COCOSegmentationDataModule
from datamodules.coco_files import load_coco, read_validated
from datamodules.masks import VOC_CATEGORY_IDS, InstanceRegions, category_classes, semantic_mask
from tasks import segment
from tasks.metrics.confusion import confusion_scores
from tasks.outputs.confusion import read_counts
from tasks.segment import SegmentationTask

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("head", ["dilated", "skip"])
@pytest.mark.parametrize("backbone", ["resnet18", "resnet50", "preact_resnet50", "resnext50_32x4d"])
def test_heads_give_input_sized_logits(backbone, head):
    task = SegmentationTask(backbone=backbone, head=head, num_classes=7)
    x = torch.randn(2, 3, 64, 96)
    out = task(x)
    assert out["out"].shape == (2, 7, 64, 96)
    assert ("aux" in out) == (head == "dilated") and (head != "dilated" or out["aux"].shape == (2, 7, 64, 96))
    body = task.model.backbone
    feats = body.forward_features(x)
    last = feats[body.out_features[-1]]
    expected = 8 if head == "dilated" else 32
    assert max(i.stride for i in body.feature_info.values()) == expected
    assert last.shape[-2:] == (64 // expected, 96 // expected)  # the backbone really runs at that stride
    sum(v.square().mean() for v in out.values()).backward()
    assert all(p.grad is not None for p in task.parameters())


def test_a_classification_checkpoint_seeds_the_backbone(tmp_path):
    ckpt, trained = classify_checkpoint(tmp_path, "resnet18")
    for head in ("dilated", "skip"):
        body = SegmentationTask(backbone="resnet18", head=head, num_classes=3, weights_backbone=ckpt).model.backbone
        state = body.state_dict()
        for key, value in trained.items():
            if key.startswith(("layer1.", "layer2.", "layer3.", "layer4.")):
                assert torch.equal(state[key], value), key
        assert body.fc is None


def _tiny_coco(root: Path) -> Path:
    """One 20 x 30 image with a polygon, an RLE instance, a crowd region and an overlap of two classes."""
    root.mkdir(parents=True, exist_ok=True)
    h, w = 20, 30
    rle_mask = np.zeros((h, w), dtype=np.uint8)
    rle_mask[12:18, 2:8] = 1  # a "dog" given as RLE
    crowd = np.zeros((h, w), dtype=np.uint8)
    crowd[0:4, 20:30] = 1  # a crowd of people
    rle = mask_utils.encode(np.asfortranarray(rle_mask))
    crowd_rle = mask_utils.encode(np.asfortranarray(crowd))
    data = {
        "images": [{"id": 1, "file_name": "a.jpg", "width": w, "height": h}],
        "categories": [{"id": 1, "name": "person"}, {"id": 18, "name": "dog"}, {"id": 13, "name": "stop sign"}],
        "annotations": [
            # person polygon: the rectangle x 4..12, y 4..10 (pixel centers inside: x 4..11, y 4..9)
            {"id": 1, "image_id": 1, "category_id": 1, "iscrowd": 0, "area": 48.0, "bbox": [4, 4, 8, 6],
             "segmentation": [[4, 4, 12, 4, 12, 10, 4, 10]]},
            {"id": 2, "image_id": 1, "category_id": 18, "iscrowd": 0, "area": 36.0, "bbox": [2, 12, 6, 6],
             "segmentation": {"size": [h, w], "counts": rle["counts"].decode()}},
            {"id": 3, "image_id": 1, "category_id": 1, "iscrowd": 1, "area": 40.0, "bbox": [20, 0, 10, 4],
             "segmentation": {"size": [h, w], "counts": crowd_rle["counts"].decode()}},
            # a dog overlapping the person at x 10..12: the overlap is ambiguous, hence ignored
            {"id": 4, "image_id": 1, "category_id": 18, "iscrowd": 0, "area": 12.0, "bbox": [10, 6, 4, 3],
             "segmentation": [[10, 6, 14, 6, 14, 9, 10, 9]]},
            # a stop sign: not a VOC class
            {"id": 5, "image_id": 1, "category_id": 13, "iscrowd": 0, "area": 9.0, "bbox": [25, 14, 3, 3],
             "segmentation": [[25, 14, 28, 14, 28, 17, 25, 17]]},
        ],
    }  # fmt: skip
    path = root / "instances.json"
    path.write_text(json.dumps(data))
    return path


def test_masks_rasterize_polygons_rle_crowds_and_overlaps(tmp_path):
    dataset = read_validated(_tiny_coco(tmp_path))
    regions = InstanceRegions.from_dataset(dataset)
    voc, voc_names = category_classes([], "voc")
    assert len(voc_names) == 21 and voc[1] == VOC_CATEGORY_IDS.index(1) + 1 == 15 and voc[18] == 12
    mask = semantic_mask(regions, 0, voc)
    person, dog = 15, 12
    assert (mask[4:10, 4:10] == person).all()  # polygon interior
    assert (mask[12:18, 2:8] == dog).all() and (mask[12:18, 8:12] == 0).all()  # RLE, exactly
    assert (mask[0:4, 20:30] == 255).all()  # crowd region ignored
    assert (mask[6:9, 10:12] == 255).all()  # person/dog overlap ignored
    assert (mask[6:9, 12:14] == dog).all()  # the dog outside the overlap
    assert (mask[14:17, 25:28] == 0).all()  # a category outside the label set is background
    everything, names = category_classes(dataset["categories"], "all")
    assert names == ["background", "person", "stop sign", "dog"] and everything == {1: 1, 13: 2, 18: 3}
    full = semantic_mask(regions, 0, everything)
    assert (full[14:17, 25:28] == 2).all() and (full[12:18, 2:8] == 3).all() and (full[4:6, 4:10] == 1).all()


def test_miou_and_pixel_accuracy_from_the_accumulated_confusion_matrix():
    truth = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 1]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 2, 2]])
    metric = MulticlassConfusionMatrix(num_classes=3, ignore_index=255)
    metric.update(pred[:1], truth[:1])
    metric.update(pred[1:], truth[1:])  # accumulated over batches
    confusion = metric.compute()
    # by hand, ignoring the 255 pixel: truth 0 -> (0, 1); truth 1 -> (1, 1, 2); truth 2 -> (2, 0)
    assert confusion.tolist() == [[1, 1, 0], [0, 2, 1], [1, 0, 1]]
    scores = confusion_scores(confusion)
    iou = [1 / (2 + 2 - 1), 2 / (3 + 3 - 2), 1 / (2 + 2 - 1)]
    assert torch.allclose(scores["iou"], torch.tensor(iou, dtype=torch.float64))
    assert scores["mIoU"].item() == pytest.approx(sum(iou) / 3)
    assert scores["pixel_acc"].item() == pytest.approx(4 / 7)
    absent = confusion_scores(torch.tensor([[3, 0, 0], [0, 0, 0], [1, 0, 0]]))
    assert absent["iou"][1].isnan() and absent["mIoU"].item() == pytest.approx((3 / 4 + 0) / 2)


@pytest.fixture(scope="module")
def coco(tmp_path_factory) -> Path:
    return write_coco(tmp_path_factory.mktemp("coco"), train_images=6, val_images=4)


@pytest.mark.parametrize("config", sorted(CONFIGS.glob("coco_fcn*.yaml")), ids=lambda p: p.stem)
def test_every_fcn_config_fits_with_fast_dev_run(config, coco, tmp_path):
    cli = segment.main([
        "fit", "--config", str(config), "--data.root", str(coco), "--data.categories", "all", "--data.min_area", "0",
        "--data.base_size", "64", "--data.crop_size", "48", "--data.batch_size", "2", "--data.num_workers", "0",
        "--data.cache_dir", str(tmp_path / "cache"), "--model.weights_backbone", "null",
        "--trainer.fast_dev_run", "true", "--trainer.default_root_dir", str(tmp_path), *CPU,
    ])  # fmt: skip
    assert cli.config.fit.trainer.benchmark is False  # evaluation shapes vary: no per-shape cuDNN search
    # the validation's confusion matrix beside the run, its mIoU the logged one
    names, counts = read_counts(Path(cli.trainer.default_root_dir) / "confusion" / "val.csv")
    assert len(names) == cli.model.hparams.num_classes
    assert (Path(cli.trainer.default_root_dir) / "confusion" / "val.png").is_file()
    logged = cli.trainer.callback_metrics["val/mIoU"].item()
    assert confusion_scores(counts)["mIoU"].item() == pytest.approx(logged, abs=1e-6)


def test_voc_refuses_a_file_whose_ids_are_not_cocos(coco, tmp_path):
    """The generated file uses COCO's ids 3 and 7 for circles and squares: the VOC label set would call
    them cars and trains. It is refused, naming the id and the fix."""
    dm = COCOSegmentationDataModule(str(coco), categories="voc", num_workers=0, cache_dir=str(tmp_path / "c"))
    with pytest.raises(ValueError, match=r"names id 3 'circle' \(COCO's is 'car'\).*data.categories: all"):
        dm.setup("validate")
    with pytest.raises(ValueError, match=r"instances_train2017.json names id 3 'circle' \(COCO's is 'car'\)"):
        COCOSegmentationDataModule(str(coco), categories="voc", num_workers=0).setup("fit")  # checked as read
    assert COCOSegmentationDataModule(str(coco), categories="all", num_workers=0).num_classes == 6


def test_datamodule_caches_masks_and_pads_with_ignore(coco, tmp_path):
    dm = COCOSegmentationDataModule(str(coco), categories="all", base_size=64, crop_size=80, min_area=0,
                                    batch_size=2, num_workers=0, cache_dir=str(tmp_path / "cache"))  # fmt: skip
    assert dm.num_classes == 6 and dm.class_names[0] == "background"
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (2, 3, 80, 80) and batch["mask"].dtype == torch.int64
    assert set(batch["mask"].unique().tolist()) <= {0, 255, *range(1, 6)}
    cached = list((tmp_path / "cache").rglob("*.png"))
    assert cached  # rasterized once, then read back
    dataset = dm.datasets["val"]
    coco = load_coco(coco / "annotations" / "instances_val2017.json")
    expected = pycocotools_semantic_mask(coco, dataset.ids[0], dataset.classes)
    assert np.array_equal(dataset.mask(0)[0].numpy(), expected)
    assert {name: cid for cid, name in zip(dm.label_set[0], dm.class_names[1:])} == CATEGORY_IDS


@pytest.mark.slow
def test_short_training_beats_the_all_background_baseline(tmp_path):
    root = write_coco(tmp_path / "shapes", train_images=160, val_images=24, size=(128, 128), object_size=(24, 56))
    cli = segment.main([
        "fit", "--data", "datamodules.COCOSegmentationDataModule", "--data.root", str(root),
        "--data.categories", "all", "--data.min_area", "0", "--data.base_size", "128", "--data.crop_size", "112",
        "--data.batch_size", "8", "--data.num_workers", "0", "--data.cache_dir", str(tmp_path / "cache"),
        "--model.backbone", "cifar_resnet20", "--model.optimizer", "torch.optim.AdamW",
        "--model.optimizer.lr", "0.003", "--trainer.max_epochs", "8", "--seed_everything", "0",
        "--trainer.default_root_dir", str(tmp_path / "runs"), *CPU,
    ])  # fmt: skip
    # the all-background prediction's mIoU: background IoU = its share of the labeled pixels, others 0
    dm = cli.datamodule
    masks = torch.cat([dm.datasets["val"].mask(i).flatten() for i in range(len(dm.datasets["val"]))])
    labeled = masks[masks != 255]
    present = labeled.unique().numel()
    baseline = (labeled == 0).float().mean().item() / present
    logged = logged_run(Path(cli.trainer.default_root_dir) / "wandb")
    miou = metric_series(logged, "val/mIoU")
    assert len(miou) == 8
    # W&B samples (WandbLogger.log_image): four images a validation, each with predicted and true masks,
    # the true one holding the image's classes
    samples = media_rows(logged, "val/samples")
    assert len(samples) == 8 and all(s["count"] == 4 and len(s["all_masks"]) == 4 for s in samples)
    truth = Image.open(logged["dir"] / "files" / samples[-1]["all_masks"][0]["ground_truth"]["path"])
    assert set(np.unique(np.asarray(truth)).tolist()) == set(dm.datasets["val"].mask(0).unique().tolist())
    assert max(miou) > baseline + 0.04, (miou, baseline)
    losses = metric_series(logged, "train/loss_epoch")
    assert losses[-1] < 0.7 * losses[0]
    pictures = [row for row in logged["history"] if row.get("val/confusion/_type") == "images/separated"]
    assert len(pictures) == 8  # the confusion picture, to W&B at each validation
    with Image.open(Path(cli.trainer.default_root_dir) / "confusion" / "val.png") as picture:
        assert pictures[-1]["val/confusion/width"] == picture.width


def test_predict_writes_original_size_class_masks_and_overlays(coco, tmp_path):
    from PIL import Image

    args = ["--data", "datamodules.COCOSegmentationDataModule", "--data.root", str(coco), "--data.categories", "all",
            "--data.min_area", "0", "--data.base_size", "64", "--data.crop_size", "48", "--data.batch_size", "2",
            "--data.num_workers", "0", "--data.cache_dir", str(tmp_path / "cache"), "--model.backbone", "resnet18",
            "--trainer.default_root_dir", str(tmp_path / "runs"), "--trainer.logger", "false", *CPU]  # fmt: skip
    cli = segment.main(["fit", *args, "--trainer.max_steps", "1", "--trainer.limit_val_batches", "1"])
    out = tmp_path / "masks"
    segment.main(["predict", *args, "--ckpt_path", cli.trainer.checkpoint_callback.last_model_path,
                  "--data.predict_root", str(coco / "val2017"), "--model.predictions_dir", str(out),
                  "--model.overlays", "true"])  # fmt: skip
    images = sorted((coco / "val2017").glob("*.jpg"))
    masks = sorted(out.glob("*.png"))
    assert [m.stem for m in masks] == [i.stem for i in images]
    for image, mask in zip(images, masks):
        array = np.asarray(Image.open(mask))
        assert array.shape == Image.open(image).size[::-1] and array.max() < 6  # class indices at full size
    assert len(list(out.glob("*_overlay.jpg"))) == len(images)
