"""torchvision's published detectors, FCNs and classifiers load into our tasks and reproduce their outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torchvision
from conftest import randomize_norms
from datasets import CPU, write_coco

from backbones import WeightsError
from datamodules.masks import VOC_COCO_NAMES
from tasks import detect, instance_segment, segment
from tasks.classify import ClassificationTask
from tasks.detect import DetectionTask
from tasks.instance_segment import InstanceSegmentationTask
from tasks.segment import SegmentationTask

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _save(model: torch.nn.Module, path: Path) -> str:
    torch.save(model.state_dict(), path)
    return str(path)


@torch.no_grad()
@pytest.mark.parametrize(
    ("reference_name", "task_class"),
    [("fasterrcnn_resnet50_fpn", DetectionTask), ("maskrcnn_resnet50_fpn", InstanceSegmentationTask)],
)
def test_torchvision_rcnn_state_dict_gives_its_boxes_labels_and_masks(reference_name, task_class, tmp_path):
    """A randomly initialized torchvision Faster R-CNN / Mask R-CNN saved to disk: our task's network has its
    keys and gives its detections (and masks, pasted at each image's size) on two images of different sizes."""
    torch.manual_seed(0)
    reference = getattr(torchvision.models.detection, reference_name)(
        weights=None, weights_backbone=None, min_size=112, max_size=168, box_score_thresh=0.0
    )
    randomize_norms(reference).eval()
    path = _save(reference, tmp_path / f"{reference_name}.pth")
    task = task_class(backbone="resnet50", head="fpn", weights=path, min_size=112, max_size=168, box_score_thresh=0.0)
    assert task.hparams.num_classes == 90 and task.category_ids == list(range(1, 91))  # COCO's 91-index labels
    ours = task.detector.eval()
    assert ours.state_dict().keys() == {k for k in reference.state_dict() if not k.endswith("num_batches_tracked")}
    # In float32, rounding differences (frozen vs plain BN arithmetic) of ~1e-6 reorder the near-tied scores
    # of a randomly initialized detector; in float64 the two models must agree to the last digits.
    images = [torch.rand(3, 120, 160, dtype=torch.float64), torch.rand(3, 150, 100, dtype=torch.float64)]
    expected, got = reference.double()(images), ours.double()(images)
    for e, g, image in zip(expected, got, images):
        assert len(e["boxes"]) == len(g["boxes"]) == 100
        assert torch.equal(e["labels"], g["labels"])
        assert torch.allclose(e["scores"], g["scores"], atol=1e-10)
        assert torch.allclose(e["boxes"], g["boxes"], atol=1e-6)
        assert ("masks" in g) == (task_class is InstanceSegmentationTask)
        if "masks" in g:
            assert g["masks"].shape == (100, 1, *image.shape[-2:])  # pasted at each image's own size
            assert torch.allclose(e["masks"], g["masks"], atol=1e-6)
            assert torch.equal(e["masks"] > 0.5, g["masks"] > 0.5)
    features = torch.rand(1, 3, 160, 160)
    for level, value in reference.float().backbone(features).items():
        error = (value - ours.float().backbone(features)[level]).abs().max() / value.abs().max()
        assert error < 1e-5, level  # float32 feature pyramids agree to rounding


@torch.no_grad()
@pytest.mark.parametrize("depth", [50])
def test_fcn_state_dict_gives_torchvisions_logits(depth, tmp_path):
    torch.manual_seed(0)
    builder = getattr(torchvision.models.segmentation, f"fcn_resnet{depth}")
    reference = randomize_norms(builder(weights=None, weights_backbone=None, aux_loss=True, num_classes=21)).eval()
    path = _save(reference, tmp_path / "fcn.pth")
    task = SegmentationTask(backbone=f"resnet{depth}", head="dilated", weights=path)
    assert task.hparams.num_classes == 21
    ours = task.model.eval()
    x = torch.randn(2, 3, 96, 128)
    expected, got = reference(x), ours(x)
    assert torch.allclose(expected["out"], got["out"], atol=1e-4)
    assert torch.allclose(expected["aux"], got["aux"], atol=1e-4)


@torch.no_grad()
@pytest.mark.parametrize("name", ["resnet50", "resnext50_32x4d"])
def test_imagenet_classifiers_through_the_classification_task(name, tmp_path):
    reference = randomize_norms(getattr(torchvision.models, name)()).eval()
    task = ClassificationTask(backbone=name, weights=_save(reference, tmp_path / "w.pth")).eval()
    assert task.hparams.num_classes == 1000
    x = torch.randn(2, 3, 64, 64)
    assert torch.allclose(task(x), reference(x), atol=1e-4)


def _fake_hub(monkeypatch, model: torch.nn.Module) -> list[str]:
    urls: list[str] = []

    def download(url, **kwargs):
        assert kwargs["weights_only"] is True
        urls.append(url)
        return model.state_dict()

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", download)
    return urls


def test_torchvision_names_resolve_with_labels_and_legacy_eps(monkeypatch):
    reference = torchvision.models.detection.fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None)
    urls = _fake_hub(monkeypatch, reference)
    task = DetectionTask(backbone="resnet50", weights="FasterRCNN_ResNet50_FPN_Weights.COCO_V1")
    assert urls[0].endswith("fasterrcnn_resnet50_fpn_coco-258fb6c6.pth")
    assert task.class_names[0] == "person" and len(task.class_names) == 90
    eps = {m.eps for m in task.detector.modules() if type(m).__name__ == "FrozenBatchNorm2d"}
    assert eps == {0.0}  # as torchvision's builder sets for these weights
    maskrcnn = torchvision.models.detection.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None)
    urls = _fake_hub(monkeypatch, maskrcnn)
    masks = InstanceSegmentationTask(backbone="resnet50", weights="MaskRCNN_ResNet50_FPN_Weights.COCO_V1")
    assert urls[0].endswith("maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth") and masks.class_names[0] == "person"
    assert {m.eps for m in masks.detector.modules() if type(m).__name__ == "FrozenBatchNorm2d"} == {0.0}
    fcn = torchvision.models.segmentation.fcn_resnet50(weights=None, weights_backbone=None, aux_loss=True)
    _fake_hub(monkeypatch, fcn)
    seg = SegmentationTask(backbone="resnet50", weights="FCN_ResNet50_Weights.COCO_WITH_VOC_LABELS_V1")
    assert seg.class_names[:2] == ["__background__", "aeroplane"] and seg.hparams.num_classes == 21
    _fake_hub(monkeypatch, torchvision.models.resnet50())
    assert ClassificationTask(backbone="resnet50", weights="IMAGENET1K_V2").class_names[0] == "tench"


def test_unknown_names_and_mismatched_files_are_explained(tmp_path):
    with pytest.raises(WeightsError, match="not a torchvision weights name.*ResNet50_Weights"):
        ClassificationTask(backbone="resnet50", weights="ResNet50_Weights.IMAGENET9K_V9")
    with pytest.raises(WeightsError, match="not a torchvision weights name"):
        DetectionTask(backbone="resnet50", weights="FasterRCNN_ResNet50_FPN_Weights.COCO_V7")
    resnet34_detector = torchvision.models.detection.faster_rcnn.FasterRCNN(
        torchvision.models.detection.backbone_utils.resnet_fpn_backbone(backbone_name="resnet34", weights=None),
        num_classes=91,
    )
    path = _save(resnet34_detector, tmp_path / "r34.pth")
    with pytest.raises(WeightsError) as err:
        DetectionTask(backbone="resnet50", weights=path)
    message = str(err.value)
    assert "shape mismatch" in message and "backbone.body.layer1.0.conv1.weight" in message
    assert "missing in the file" in message and "backbone.body.layer1.0.conv3.weight" in message
    with pytest.raises(ValueError, match="not a FCN state dict: it has no 'classifier.4.weight'"):
        SegmentationTask(backbone="resnet50", weights=path)
    with pytest.raises(ValueError, match="model.num_classes=5 but weights=.* have 90"):
        DetectionTask(backbone="resnet34", weights=path, num_classes=5)


@pytest.mark.parametrize(
    ("module", "config", "reference"),
    [
        (detect, "coco_torchvision_fasterrcnn_r50_fpn.yaml", "fasterrcnn_resnet50_fpn"),
        (instance_segment, "coco_torchvision_maskrcnn_r50_fpn.yaml", "maskrcnn_resnet50_fpn"),
        (segment, "coco_torchvision_fcn_resnet50.yaml", "fcn_resnet50"),
        (segment, "coco_torchvision_fcn_resnet101.yaml", "fcn_resnet101"),
    ],
)
def test_torchvision_configs_validate_on_coco_format_data(module, config, reference, monkeypatch, tmp_path):
    """The evaluation configs run `validate` end to end (the download replaced by a local state dict)."""
    root = write_coco(tmp_path / "coco", train_images=2, val_images=2)
    if module in (detect, instance_segment):
        model = getattr(torchvision.models.detection, reference)(weights=None, weights_backbone=None)
        shrink = ["--model.min_size", "96", "--model.max_size", "128"]
    else:
        model = getattr(torchvision.models.segmentation, reference)(weights=None, weights_backbone=None, aux_loss=True)
        # voc picks COCO's VOC categories by id and checks their names: give the generated ids 3 and 7 COCO's
        # names (car, train), as a COCO file has them; the other shapes are background
        for split in ("train2017", "val2017"):
            path = root / "annotations" / f"instances_{split}.json"
            data = json.loads(path.read_text())
            for category in data["categories"]:
                category["name"] = VOC_COCO_NAMES.get(category["id"], category["name"])
            path.write_text(json.dumps(data))
        shrink = ["--data.base_size", "64", "--data.cache_dir", str(tmp_path / "cache")]
    _fake_hub(monkeypatch, model)
    runs = ["--trainer.default_root_dir", str(tmp_path / "runs"), "--trainer.logger", "false"]
    data = ["--data.root", str(root), "--data.num_workers", "0"]
    cli = module.main(["validate", "--config", str(CONFIGS / config), *data, *shrink, *runs, *CPU])
    metrics = cli.trainer.callback_metrics
    expected = {detect: "val/mAP", instance_segment: "val/mask_mAP", segment: "val/mIoU"}[module]
    assert expected in metrics
