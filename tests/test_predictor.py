"""tasks.load_predictor: the CLI's predict numbers from Python, for every kind of input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import CPU, write_coco, write_imagefolder
from PIL import Image

from backbones.weights import WeightsError
from datamodules.images import read_image
from tasks import classify, detect, load_predictor, segment

SMALL = {"rpn_post_nms_top_n_train": 100, "rpn_post_nms_top_n_test": 100, "box_batch_size_per_image": 64}


def _fit_and_predict(module, args: list[str], folder: Path, output: list[str], steps: int = 4) -> str:
    """Train ``steps`` steps, then run the CLI's ``predict`` on ``folder``; return the checkpoint."""
    common = [*args, "--trainer.logger", "false", *CPU]
    cli = module.main(["fit", *common, "--trainer.max_steps", str(steps), "--trainer.limit_val_batches", "1"])
    ckpt = cli.trainer.checkpoint_callback.last_model_path
    module.main(["predict", *common, "--ckpt_path", ckpt, "--data.predict_root", str(folder), *output])
    return ckpt


def _same_image_every_way(predict, path: Path) -> dict:
    """The predictor's result for ``path``, asserted equal for each way of giving the same pixels (alone:
    bit for bit; in a batch of two: to float rounding)."""
    pixels = read_image(path)
    ways = {
        "path": predict(str(path)),
        "Path": predict(path),
        "tensor": predict(pixels),
        "PIL": predict(Image.fromarray(pixels.permute(1, 2, 0).numpy())),
        "numpy": predict(pixels.permute(1, 2, 0).numpy()),
        "list": predict([pixels, str(path)])[1],
        "batch": predict(torch.stack([pixels, pixels]))[0],
    }
    reference = ways["path"]
    for way, found in ways.items():
        for key, value in reference.items():
            if key == "path":
                continue
            other = found[key]
            if isinstance(value, torch.Tensor) and value.is_floating_point() and way in ("list", "batch"):
                # in a batch of two the convolutions may sum in another order: equal to float rounding
                torch.testing.assert_close(other, value, atol=1e-4, rtol=0, msg=f"{way} {key}")
            elif isinstance(value, torch.Tensor):
                assert torch.equal(value, other), (way, key)
            elif way in ("list", "batch") and key == "scores":
                assert other == pytest.approx(value, abs=1e-5), (way, key)
            else:
                assert value == other, (way, key)
    return reference


def test_classifier_predictor_equals_predict_for_every_input_type(tmp_path):
    root = write_imagefolder(tmp_path / "cls", per_class=3, val_per_class=2, size=40)
    args = ["--data", "datamodules.ImageFolderDataModule", "--data.root", str(root), "--data.image_size", "32",
            "--data.batch_size", "5", "--data.num_workers", "0", "--model.backbone", "resnet18",
            "--trainer.default_root_dir", str(tmp_path / "runs")]  # fmt: skip
    rows_file = tmp_path / "predictions.json"
    ckpt = _fit_and_predict(classify, args, root / "val", ["--model.predictions_file", str(rows_file)], steps=3)
    written = {row["path"]: row for row in json.loads(rows_file.read_text())}
    predict = load_predictor(ckpt, top_k=5)
    paths = sorted(written)
    found = predict(paths)
    assert [f["path"] for f in found] == paths
    for row in found:  # the same top five, names and probabilities as the file predict wrote
        want = written[row["path"]]
        assert row["classes"] == want["classes"] and row["indices"] == want["indices"]
        assert row["scores"] == pytest.approx(want["scores"], abs=2e-6)
    one = _same_image_every_way(predict, Path(paths[0]))
    assert one["classes"] == written[paths[0]]["classes"]  # 40-px images: resized to 37, center crop 32
    assert predict.class_names == ["circle", "ring", "square", "star", "triangle"]
    with pytest.raises(FileNotFoundError, match="nope.jpg"):
        predict(tmp_path / "nope.jpg")
    with pytest.raises(TypeError, match="give paths, PIL images or uint8 tensors"):
        predict(3.0)


def test_detector_predictor_equals_predicts_detections_file(tmp_path):
    coco = write_coco(tmp_path / "coco", train_images=8, val_images=3, size=(80, 64), object_size=(16, 36))
    args = ["--data", "datamodules.COCODetectionDataModule", "--data.root", str(coco), "--data.batch_size", "2",
            "--data.num_workers", "0", "--model.backbone", "resnet18", "--model.norm", "bn", "--model.freeze_at", "0",
            "--model.min_size", "96", "--model.max_size", "96", "--model.fpn_channels", "32",
            "--model.box_score_thresh", "0.0", "--model.detector_args", json.dumps(SMALL),
            "--trainer.default_root_dir", str(tmp_path / "runs")]  # fmt: skip
    out = tmp_path / "detections.json"
    ckpt = _fit_and_predict(detect, args, coco / "val2017", ["--model.detections_file", str(out)])
    written = json.loads(out.read_text())
    predict = load_predictor(ckpt)
    images = sorted((coco / "val2017").glob("*.jpg"))
    to_category = predict.task.label_to_category()
    for path, found in zip(images, predict(images)):
        rows = sorted((r for r in written if Path(r["file_name"]).name == path.name), key=lambda r: -r["score"])
        assert len(rows) == len(found["scores"]) > 0
        boxes = found["boxes"].clone()
        boxes[:, 2:] -= boxes[:, :2]  # COCO's x, y, w, h, in the original image's pixels
        np.testing.assert_allclose(boxes.numpy(), [r["bbox"] for r in rows], atol=1e-3)
        np.testing.assert_allclose(found["scores"].numpy(), [r["score"] for r in rows], atol=1e-5)
        assert [to_category[int(k)] for k in found["labels"]] == [r["category_id"] for r in rows]
        assert found["classes"] == [predict.task.class_name(int(k)) for k in found["labels"]]
        assert float(found["boxes"][:, 2].max()) <= Image.open(path).size[0] + 1e-3
    _same_image_every_way(predict, images[0])
    one_view = load_predictor(ckpt, tta=True, tta_flip=False)(images[0])  # merged by NMS: the same detections
    torch.testing.assert_close(one_view["boxes"], predict(images[0])["boxes"], atol=0, rtol=0)
    mirrored = load_predictor(ckpt, tta=True, tta_scales=[1.0, 1.25])(images[0])
    assert 0 < len(mirrored["boxes"]) <= 100 and float(mirrored["boxes"][:, 2].max()) <= 80 + 1e-3


def test_segmenter_predictor_equals_predicts_masks_at_the_original_size(tmp_path):
    coco = write_coco(tmp_path / "coco", train_images=6, val_images=3, size=(72, 56), object_size=(16, 36))
    args = ["--data", "datamodules.COCOSegmentationDataModule", "--data.root", str(coco), "--data.categories", "all",
            "--data.min_area", "0", "--data.base_size", "64", "--data.crop_size", "48", "--data.batch_size", "2",
            "--data.num_workers", "0", "--data.cache_dir", str(tmp_path / "cache"), "--model.backbone", "resnet18",
            "--model.head", "skip", "--trainer.default_root_dir", str(tmp_path / "runs")]  # fmt: skip
    out = tmp_path / "masks"
    ckpt = _fit_and_predict(segment, args, coco / "val2017", ["--model.predictions_dir", str(out)])
    predict = load_predictor(ckpt)
    images = sorted((coco / "val2017").glob("*.jpg"))
    for path, found in zip(images, predict(images)):
        written = np.asarray(Image.open(out / f"{path.stem}.png"))
        assert found["mask"].shape == (56, 72)  # the input's size, not the network's
        np.testing.assert_array_equal(found["mask"].numpy(), written)
        assert found["classes"] == [predict.class_names[int(k)] for k in np.unique(written)]
    _same_image_every_way(predict, images[0])


def test_the_predictor_refuses_pickled_code(tmp_path):
    class_path = tmp_path / "code.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {}, "x": Payload()}, class_path)
    with pytest.raises(WeightsError, match="code.ckpt"):
        load_predictor(class_path)


class Payload:
    """An object of a class of ours: ``weights_only`` loading refuses to rebuild it."""


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_the_predictor_runs_channels_last_in_bf16_and_agrees_with_the_cpu(tmp_path):
    from datasets import classify_checkpoint

    ckpt, _ = classify_checkpoint(tmp_path, "resnet18")
    images = sorted((tmp_path / "cls" / "val").rglob("*.jpg"))
    on_cpu, on_gpu = load_predictor(ckpt), load_predictor(ckpt, device="cuda")
    assert on_gpu.task.backbone.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    for a, b in zip(on_cpu(images), on_gpu(images)):
        assert a["scores"] == pytest.approx(b["scores"], abs=0.05)  # bfloat16 autocast
