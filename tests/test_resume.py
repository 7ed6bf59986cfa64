"""A run stopped by SIGTERM in the middle of an epoch and resumed with ``--ckpt_path last`` ends with the same
weights, bit for bit, as the run that was never stopped -- for every task and every option that draws random
numbers on the model side (the RPN's and RoI heads' sampling, dropout, MixUp/CutMix, the localizer's sampled
anchors and its R-CNN stage's sampled regions: ``tasks.core.draws``), beside the data side's
(``tests/test_reliability.py`` has the classification recipes: plain, and torchvision's modern one with EMA
and repeated augmentation). A resume that would change
what the run trains is refused, naming the argument."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from datasets import CPU, write_coco, write_imagefolder

from datamodules.shapes_xml import generate_localization
from tasks import classify, detect, localize, segment

DETECTOR = ["--model.backbone", "resnet18", "--model.norm", "bn", "--model.freeze_at", "0", "--model.min_size", "64",
            "--model.max_size", "64", "--model.fpn_channels", "16",
            "--model.detector_args", '{"rpn_batch_size_per_image": 32, "box_batch_size_per_image": 16}']  # fmt: skip


def _case(name: str, tmp: Path):
    """``(command module, data and model flags)``: each draws random numbers while it trains."""
    if name in ("detect", "detect_c4_context", "segment"):
        root = write_coco(tmp / "coco", train_images=6, val_images=2, size=(64, 64), object_size=(16, 30))
        if name.startswith("detect"):
            context = ["--model.head", "c4", "--model.global_context", "true"] if name != "detect" else []
            return detect, ["--data", "datamodules.COCODetectionDataModule", "--data.root", str(root),
                            "--data.batch_size", "2", *DETECTOR, *context]  # fmt: skip
        return segment, ["--data", "datamodules.COCOSegmentationDataModule", "--data.root", str(root),
                         "--data.categories", "all", "--data.min_area", "0", "--data.base_size", "48",
                         "--data.crop_size", "32", "--data.batch_size", "2", "--data.cache_dir", str(tmp / "masks"),
                         "--model.backbone", "resnet18", "--model.head", "skip", "--model.dropout", "0.5"]  # fmt: skip
    if name.startswith("localize"):
        root = generate_localization(tmp / "loc", train_per_class=2, val_per_class=1, size=48)
        args = ["--data", "datamodules.ILSVRCLocalizationDataModule", "--data.root", str(root),
                "--data.image_size", "32", "--data.batch_size", "3", "--model.backbone", "resnet18"]  # fmt: skip
        if name == "localize":
            return localize, args
        # the R-CNN stage (its regions sampled) on the proposals of an RPN localizer trained for one epoch
        rpn = _fit(localize, args, tmp / "rpn", "rpn", ["--trainer.max_epochs", "1"])
        rpn_weights = rpn.trainer.checkpoint_callback.best_model_path
        return localize, [*args, "--model.head", "rpn_rcnn", "--model.rpn_weights", rpn_weights, "--model.rcnn_crop",
                          "16", "--model.rcnn_proposals", "8", "--model.rcnn_regions", "12"]  # fmt: skip
    root = write_imagefolder(tmp / "cls", per_class=3, val_per_class=1, size=32)
    return classify, ["--data", "datamodules.ImageFolderDataModule", "--data.root", str(root), "--data.image_size",
                      "32", "--data.batch_size", "5", "--model.backbone", "cifar_resnet20",
                      "--model.mixup_alpha", "0.2", "--model.cutmix_alpha", "1.0"]  # fmt: skip


def _fit(module, args: list[str], runs: Path, name: str, extra: list[str]):
    return module.main([
        "fit", *args, "--data.num_workers", "0", "--trainer.max_epochs", "2", "--seed_everything", "0",
        "--trainer.logger", "false", "--trainer.num_sanity_val_steps", "0", "--trainer.default_root_dir", str(runs),
        "--run_name", name, *CPU, *extra,
    ])  # fmt: skip


def _recorder(path: Path, at: int = -1) -> list[str]:
    return ["--trainer.callbacks+=datasets.StepRecorder", "--trainer.callbacks.path", str(path),
            "--trainer.callbacks.sigterm_at", str(at)]  # fmt: skip


@pytest.mark.parametrize(
    "name",
    [
        "detect",
        pytest.param("detect_c4_context", marks=pytest.mark.slow),
        "segment",
        "localize",
        "localize_rpn_rcnn",
        "mixup_cutmix",
    ],  # fmt: skip
)
def test_sigterm_mid_epoch_then_resume_equals_the_uninterrupted_run(name, tmp_path):
    module, args = _case(name, tmp_path)
    whole = _fit(module, args, tmp_path / "a", "a", _recorder(tmp_path / "a.json"))
    steps = whole.trainer.global_step
    assert steps >= 4 and steps % 2 == 0
    stop_at = steps // 2 + 1  # in the middle of the second epoch
    with pytest.raises(SystemExit):
        _fit(module, args, tmp_path / "b", "b", _recorder(tmp_path / "b.json", stop_at))
    last = next((tmp_path / "b").rglob("last.ckpt"))
    assert torch.load(last, weights_only=True)["global_step"] == stop_at
    resumed = _fit(module, args, tmp_path / "b", "b", ["--ckpt_path", "last", *_recorder(tmp_path / "b.json")])
    assert resumed.trainer.global_step == steps
    assert json.loads((tmp_path / "a.json").read_text()) == json.loads((tmp_path / "b.json").read_text())
    ours, reference = resumed.model.state_dict(), whole.model.state_dict()
    different = [k for k in reference if not torch.equal(ours[k], reference[k])]
    assert not different, different[:5]


@pytest.mark.parametrize(("per_class", "schedule"), [(3, []), (6, ["--trainer.val_check_interval", "3"])],
                         ids=["at_the_epochs_end", "mid_epoch"])  # fmt: skip
def test_sigterm_during_a_validation_of_fit_saves_last_ckpt_and_resumes_to_the_same_weights(
    per_class, schedule, tmp_path
):
    """A signal in validation once saved nothing (the save was for training steps only): a cluster stopping a
    job while it validated lost everything since the last checkpoint. The first validation comes after 3 steps,
    at the end of the epoch or in its middle."""
    root = write_imagefolder(tmp_path / "cls", per_class=per_class, val_per_class=2, size=32)  # 2 val batches
    module, args = classify, ["--data", "datamodules.ImageFolderDataModule", "--data.root", str(root),
                              "--data.image_size", "32", "--data.batch_size", "5", "--model.backbone", "cifar_resnet20",
                              "--model.mixup_alpha", "0.2", *schedule]  # fmt: skip
    whole = _fit(module, args, tmp_path / "a", "a", [])
    with pytest.raises(SystemExit):
        _fit(module, args, tmp_path / "b", "b", ["--trainer.callbacks+=datasets.SigtermInValidation"])
    last = next((tmp_path / "b").rglob("last.ckpt"))
    assert torch.load(last, weights_only=True)["global_step"] == 3
    resumed = _fit(module, args, tmp_path / "b", "b", ["--ckpt_path", "last"])
    assert resumed.trainer.global_step == whole.trainer.global_step
    ours, reference = resumed.model.state_dict(), whole.model.state_dict()
    different = [k for k in reference if not torch.equal(ours[k], reference[k])]
    assert not different, different[:5]


def test_resuming_with_another_batch_size_or_backbone_is_refused_naming_it(tmp_path):
    module, args = _case("mixup_cutmix", tmp_path)
    _fit(module, args, tmp_path / "runs", "r", ["--trainer.max_steps", "2"])
    with pytest.raises(ValueError, match=r"resuming with data.batch_size=3 \(checkpoint: 5\) would not resume"):
        _fit(module, [*args, "--data.batch_size", "3"], tmp_path / "runs", "r", ["--ckpt_path", "last"])
    with pytest.raises(ValueError, match=r"model.backbone='cifar_resnet32' \(checkpoint: 'cifar_resnet20'\)"):
        _fit(module, [*args, "--model.backbone", "cifar_resnet32"], tmp_path / "runs", "r", ["--ckpt_path", "last"])
