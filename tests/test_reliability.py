"""Bad data, bad configs, crashes and untrusted files: every failure early, clear and recoverable."""

from __future__ import annotations

import csv
import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from commands import Result, run_commands_once
from datasets import CATEGORY_IDS, CPU, edit_coco, write_coco, write_imagefolder

from backbones import WeightsError, build_backbone, load_weights
from backbones.export import export
from datamodules import COCODetectionDataModule, COCOSegmentationDataModule, ImageFolderDataModule
from datamodules.check import DataValidationError
from datamodules.check import main as check_main
from datamodules.coco_files import read_validated
from datamodules.images import CorruptImageError
from tasks import classify, detect
from tasks.core.guards import NonFiniteLossError
from tasks.run.checkpointing import AtomicCheckpointIO

ROOT = Path(__file__).resolve().parents[1]


# -- bad data: one case per kind of bad input ----------------------------------------------------------
@pytest.fixture
def folder(tmp_path) -> Path:
    return write_imagefolder(tmp_path / "images", per_class=3, val_per_class=1, size=32)


def _dm(root: Path, **kwargs) -> ImageFolderDataModule:
    return ImageFolderDataModule(root=str(root), image_size=32, eval_resize=32, batch_size=2, num_workers=0, **kwargs)


def test_truncated_jpeg_is_named_and_the_rest_still_loads(folder):
    bad = folder / "train" / "ring" / "ring_0001.jpg"
    bad.write_bytes(bad.read_bytes()[:300])
    assert check_main(["--data", "datamodules.ImageFolderDataModule", "--data.root", str(folder)]) == 1
    dm = _dm(folder, skip_corrupt=True)
    dm.setup("fit")
    seen = [batch for batch in dm.train_dataloader()]
    skipped, kept = sum(b["skipped"] for b in seen), sum(len(b["label"]) for b in seen)
    assert skipped == 1 and kept + skipped == 14  # 15 images, 7 full batches of 2
    strict = _dm(folder)
    strict.setup("fit")
    index = [p for p, _ in strict.datasets["train"].samples].index(str(bad))
    with pytest.raises(CorruptImageError, match=f"{bad}.*truncated"):
        strict.datasets["train"][index]


def test_zero_byte_file_is_named_when_read_skipped_or_found_by_the_check(folder, tmp_path, capsys):
    """Setup lists folders and opens no file (a stat per file costs minutes per start at ImageNet's size on a
    network filesystem): an empty file stops the run when it is read, naming it, with no checkpoint left
    half-written; ``skip_corrupt`` drops it; the check command finds it beforehand."""
    empty = folder / "train" / "star" / "star_0000.jpg"
    empty.write_bytes(b"")
    dm = _dm(folder)
    dm.setup("fit")
    index = [p for p, _ in dm.datasets["train"].samples].index(str(empty))
    with pytest.raises(CorruptImageError, match=f"{empty}: the file is empty"):
        dm.datasets["train"][index]
    runs = tmp_path / "runs"
    with pytest.raises(CorruptImageError, match=f"{empty}: the file is empty"):
        classify.main(["fit", "--data", "datamodules.ImageFolderDataModule", "--data.root", str(folder),
                       "--data.image_size", "32", "--data.num_workers", "0", "--data.batch_size", "15",
                       "--model.backbone", "cifar_resnet20", "--trainer.logger", "false",
                       "--trainer.default_root_dir", str(runs), *CPU])  # fmt: skip
    assert not list(runs.rglob("*.ckpt"))
    lenient = _dm(folder, skip_corrupt=True)
    lenient.setup("fit")
    assert lenient.datasets["train"][index] is None
    assert check_main(["--data", "datamodules.ImageFolderDataModule", "--data.root", str(folder), "--no_decode"]) == 1
    assert f"{empty}: the file is empty (0 bytes)" in capsys.readouterr().out


def test_non_image_file_is_reported_by_the_check(folder, capsys):
    fake = folder / "val" / "circle" / "circle_0000.jpg"
    fake.write_text("this is a note, not a picture")
    code = check_main(["--data", "datamodules.ImageFolderDataModule", "--data.root", str(folder)])
    out = capsys.readouterr().out
    assert code == 1 and f"ERROR   {fake}: cannot decode the image (Unsupported image file" in out
    assert "1 errors, 0 warnings (5 classes, 5 images checked)" in out
    assert check_main(["--data", "datamodules.ImageFolderDataModule", "--data.root", str(folder), "--no_decode"]) == 0


def test_empty_class_folder_is_named_or_dropped(folder):
    for image in (folder / "train" / "square").iterdir():
        image.unlink()
    with pytest.raises(DataValidationError, match=r"train/square: class folder without images"):
        _dm(folder).setup("fit")
    dm = _dm(folder, drop_invalid=True)
    dm.setup("fit")
    assert dm.classes == ["circle", "ring", "star", "triangle"] and dm.num_classes == 4
    labels = {label for _, label in dm.datasets["val"].samples}
    assert labels == {0, 1, 2, 3} and len(dm.datasets["val"]) == 4  # square's val image left out


def test_a_flat_validation_folder_says_how_to_sort_it(folder):
    """ImageNet's validation archive extracts flat (no class folders): the error says so, not "no images"."""
    for image in list((folder / "val").glob("*/*")):
        image.rename(folder / "val" / image.name)
        image.parent.rmdir()
    with pytest.raises(ValueError, match=r"val holds 5 images but not in class folders.*ILSVRC2012_img_val"):
        _dm(folder).setup("validate")


def test_an_unextracted_imagenet_train_folder_says_to_extract_it(tmp_path):
    for wnid in ("n01440764", "n01443537"):
        (tmp_path / "train").mkdir(exist_ok=True)
        (tmp_path / "train" / f"{wnid}.tar").write_bytes(b"")
    with pytest.raises(ValueError, match=r"train has no class folders. It holds 2 .tar files.*extract each"):
        _dm(tmp_path).setup("fit")


def test_images_in_formats_it_cannot_read_are_named(folder, capsys):
    """A class of .bmp files is not "without images": the error says what the files are and what to do;
    the check warns about unreadable files mixed in with readable ones (the loader ignores them)."""
    from PIL import Image

    for image in (folder / "train" / "square").iterdir():
        Image.open(image).save(image.with_suffix(".bmp"))
        image.unlink()
    Image.new("RGB", (32, 32)).save(folder / "train" / "ring" / "extra.tif")
    (folder / "train" / "ring" / ".DS_Store").write_bytes(b"\0")  # hidden files are not mentioned
    with pytest.raises(DataValidationError, match=r"train/square: class folder without images it can read: it "
                       r"holds 3 \.bmp files; the readable formats are \.jpg, .*convert the files"):  # fmt: skip
        _dm(folder).setup("fit")
    assert check_main(["--data", "datamodules.ImageFolderDataModule", "--data.root", str(folder), "--no_decode"]) == 1
    assert f"WARNING {folder / 'train' / 'ring'}: 1 files not in a readable image format are ignored" in (
        capsys.readouterr().out
    )


@pytest.fixture
def coco(tmp_path) -> Path:
    return write_coco(tmp_path / "coco", train_images=6, val_images=4)


def test_malformed_json_names_the_file(coco):
    path = coco / "annotations" / "instances_train2017.json"
    path.write_text(path.read_text()[:-40])
    dm = COCODetectionDataModule(str(coco), num_workers=0)
    with pytest.raises(ValueError, match=f"{path}: not valid JSON"):
        dm.setup("fit")


def test_wrong_category_id_names_the_annotation(coco, capsys):
    def change(data):
        data["annotations"][0]["category_id"] = 999

    path = edit_coco(coco, "train2017", change)
    with pytest.raises(DataValidationError, match=r"annotations\[0\]: annotation id 1: category_id 999 is not in"):
        COCODetectionDataModule(str(coco), num_workers=0).setup("fit")
    dm = COCODetectionDataModule(str(coco), num_workers=0, drop_invalid=True)
    dm.setup("fit")
    kept = read_validated(coco / "annotations" / "instances_train2017.json", drop_invalid=True)["annotations"]
    assert 1 not in {a["id"] for a in kept} and len(kept) > 3
    assert check_main(["--data", "datamodules.COCODetectionDataModule", "--data.root", str(coco), "--fix"]) == 1
    fixed = path.with_name("instances_train2017.fixed.json")
    assert fixed.is_file()
    assert check_main(["--data", "datamodules.COCODetectionDataModule", "--data.root", str(coco),
                       "--data.train_annotations", "annotations/instances_train2017.fixed.json"]) == 0  # fmt: skip


def test_degenerate_and_out_of_image_boxes_are_reported_and_handled(coco, capsys):
    def change(data):
        data["annotations"][0]["bbox"] = [90.0, 90.0, 30.0, 30.0]  # the 96 x 96 image ends at 96
        data["annotations"][1]["bbox"] = [10.0, 10.0, -4.0, 5.0]

    edit_coco(coco, "val2017", change)
    check_main(["--data", "datamodules.COCODetectionDataModule", "--data.root", str(coco), "--no_decode"])
    out = capsys.readouterr().out
    assert "annotation id" in out and "reaches outside the 96x96 image (clipped)" in out
    assert "box [10.0, 10.0, -4.0, 5.0] has a negative width (an inverted box): dropped for training" in out
    dm = COCODetectionDataModule(str(coco), num_workers=0)
    dm.setup("validate")  # warnings do not stop anything
    dataset = dm.datasets["val"]
    image_id = json.loads((coco / "annotations" / "instances_val2017.json").read_text())["annotations"][0]["image_id"]
    boxes, _ = dataset.targets[image_id]
    assert boxes[:, 2:].max() <= 96  # clipped to the image


def test_annotations_without_area_or_iscrowd_are_named_and_fixed(coco, capsys):
    """Without 'area' faster-coco-eval files every object as small (APs/APm/APl silently wrong) and pycocotools
    raises KeyError; the check names them, --fix fills them in as COCO defines them, drop_invalid refuses."""
    original = json.loads((coco / "annotations" / "instances_val2017.json").read_text())["annotations"]
    original = [a for a in original if a["bbox"][2] > 1]  # --fix also drops the fixture's degenerate box

    def strip(data):
        for ann in data["annotations"]:
            if not ann["iscrowd"]:
                del ann["area"]
        del data["annotations"][0]["iscrowd"]

    path = edit_coco(coco, "val2017", strip)
    with pytest.raises(DataValidationError, match=r"lacks 'area' and 'iscrowd'; COCOeval sorts objects"):
        COCODetectionDataModule(str(coco), num_workers=0).setup("validate")
    with pytest.raises(DataValidationError, match=r"annotations lack 'area' or 'iscrowd'.*--fix"):
        COCODetectionDataModule(str(coco), num_workers=0, drop_invalid=True).setup("validate")
    assert check_main(["--data", "datamodules.COCODetectionDataModule", "--data.root", str(coco), "--fix"]) == 1
    assert "lacks 'area'" in capsys.readouterr().out
    fixed = json.loads(path.with_name("instances_val2017.fixed.json").read_text())["annotations"]
    assert [a["area"] for a in fixed] == pytest.approx([a["area"] for a in original])  # the masks' areas
    assert [a["iscrowd"] for a in fixed] == [a["iscrowd"] for a in original]


def test_training_categories_the_validation_file_lacks_stop_at_setup(coco):
    """The detector's classes come from the validation file: a training category it lacks is named at setup,
    not met as an unknown label in the middle of the first epoch."""

    def drop_ring(data):
        data["categories"] = [c for c in data["categories"] if c["name"] != "ring"]
        data["annotations"] = [a for a in data["annotations"] if a["category_id"] != CATEGORY_IDS["ring"]]

    edit_coco(coco, "val2017", drop_ring)
    with pytest.raises(DataValidationError, match=r"instances_train2017.json annotates categories \[90\] that .*val"):
        COCODetectionDataModule(str(coco), num_workers=0).setup("fit")
    COCODetectionDataModule(str(coco), num_workers=0).setup("validate")  # evaluating needs only the val file
    # segmentation's class list comes from the first file read (training, for fit): a category only the
    # validation file has would be scored as background
    edit_coco(coco, "train2017", drop_ring)
    val = json.loads((coco / "annotations" / "instances_val2017.json").read_text())
    train = json.loads((coco / "annotations" / "instances_train2017.json").read_text())

    def ring_in_val(data):  # a ring annotation on the first validation image, with its category
        data["categories"].append({"id": 90, "name": "ring"})
        data["annotations"].append({**val["annotations"][0], "id": 999, "category_id": 90})

    assert all(a["category_id"] != 90 for a in train["annotations"])
    edit_coco(coco, "val2017", ring_in_val)
    segmentation = COCOSegmentationDataModule(str(coco), categories="all", num_workers=0, cache_dir=str(coco / "c"))
    with pytest.raises(DataValidationError, match=r"instances_val2017.json annotates categories \[90\] that the class"):
        segmentation.setup("fit")


def test_missing_image_file_and_duplicates_are_named(coco):
    missing = coco / "train2017" / "000000000002.jpg"
    missing.unlink()

    def change(data):
        data["images"].append(dict(data["images"][0]))  # listed twice

    edit_coco(coco, "train2017", change)
    with pytest.raises(DataValidationError) as err:
        COCODetectionDataModule(str(coco), num_workers=0).setup("fit")
    assert f"{missing}: image id 2: the file does not exist" in str(err.value)
    assert "image id 1 is listed twice" in str(err.value)
    dm = COCOSegmentationDataModule(str(coco), categories="all", num_workers=0, min_area=0, drop_invalid=True,
                                    base_size=64, crop_size=48, batch_size=2)  # fmt: skip
    dm.setup("fit")
    assert 2 not in dm.datasets["train"].ids and len(dm.datasets["train"]) >= 5
    next(iter(dm.train_dataloader()))  # the rest loads


def test_an_image_of_another_size_than_its_annotations_is_an_error_not_misplaced_boxes(coco, capsys):
    """A resized copy of a COCO image would put every box and mask in the wrong place without a word."""
    from PIL import Image

    path = (
        coco
        / "val2017"
        / json.loads((coco / "annotations" / "instances_val2017.json").read_text())["images"][0]["file_name"]
    )
    Image.open(path).resize((48, 40)).save(path)
    detection = COCODetectionDataModule(str(coco), num_workers=0)
    segmentation = COCOSegmentationDataModule(str(coco), categories="all", num_workers=0, cache_dir=str(coco / "c"))
    for dm in (detection, segmentation):
        dm.setup("validate")
        with pytest.raises(DataValidationError, match=f"{path}: the image is 48x40 but the annotation file says 96x96"):
            dm.datasets["val"][0]
        dm.datasets["val"][1]  # the other images load
    # the data check, which decodes every image, names it too
    assert check_main(["--data", "datamodules.COCODetectionDataModule", "--data.root", str(coco)]) == 1
    assert f"{path}: image id" in capsys.readouterr().out


def test_polygons_of_fewer_than_three_points_are_left_out_of_masks_and_reported(tmp_path):
    """pycocotools reads a polygon of 4 numbers as a box, and rejects the annotation with a TypeError when it
    comes first; such polygons (exported by some annotation tools) are dropped from the mask and warned of."""
    from datamodules.masks import InstanceRegions, semantic_mask
    from datamodules.validation import validate_coco

    triangle = [10, 10, 50, 10, 50, 50]

    def dataset(*segmentations):
        anns = [
            {"id": i + 1, "image_id": 1, "category_id": 7, "iscrowd": 0, "bbox": [10, 10, 40, 40], "area": 800.0,
             "segmentation": seg}
            for i, seg in enumerate(segmentations)
        ]  # fmt: skip
        image = {"id": 1, "file_name": "a.jpg", "width": 64, "height": 64}
        return {"images": [image], "annotations": anns, "categories": [{"id": 7, "name": "x"}]}

    def mask(data):
        return semantic_mask(InstanceRegions.from_dataset(data), 0, {7: 1})

    clean = mask(dataset([triangle]))
    assert (clean == 1).sum() > 700
    assert (mask(dataset([[5, 5, 6, 6], triangle])) == clean).all()  # pycocotools alone: TypeError
    assert (mask(dataset([[5, 5, 6, 6]])) == 0).all()  # nothing left: no region, no box
    report, _ = validate_coco(dataset([[5, 5, 6, 6], triangle]), tmp_path / "instances.json")
    assert not report.errors and "polygons of 4 coordinates are not polygons" in report.text()


# -- untrusted files ---------------------------------------------------------------------------------
class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_a_malicious_pickle_is_refused_by_every_loading_path(tmp_path, monkeypatch, folder):
    monkeypatch.chdir(tmp_path)
    evil = tmp_path / "evil.ckpt"
    with open(evil, "wb") as f:
        pickle.dump({"state_dict": {"backbone.conv1.weight": _Exploit()}, "hyper_parameters": {}}, f)
    paths = [
        lambda: load_weights(build_backbone("resnet18"), evil),
        lambda: classify.ClassificationTask(backbone="resnet18", weights=str(evil)),
        lambda: classify.ClassificationTask(backbone="resnet18", num_classes=3, weights_backbone=str(evil)),
        lambda: detect.DetectionTask(backbone="resnet18", weights=str(evil)),
        lambda: detect.DetectionTask(backbone="resnet18", num_classes=3, weights_backbone=str(evil)),
        lambda: AtomicCheckpointIO().load_checkpoint(evil),
        lambda: export(evil, tmp_path / "out.safetensors"),
        lambda: classify.main(
            [
                "validate",
                "--data",
                "datamodules.ImageFolderDataModule",
                "--data.root",
                str(folder),
                "--ckpt_path",
                str(evil),
                "--trainer.logger",
                "false",
                *CPU,
            ]
        ),  # fmt: skip
    ]
    from tasks.segment import SegmentationTask

    paths.append(lambda: SegmentationTask(backbone="resnet18", weights=str(evil)))
    for load in paths:
        with pytest.raises(WeightsError, match="refused to load"):
            load()
    assert not (tmp_path / "PWNED").exists()


# -- checkpoints survive kills; runs resume exactly --------------------------------------------------
def test_sigkill_during_a_checkpoint_write_leaves_the_previous_one(tmp_path):
    target = tmp_path / "last.ckpt"
    script = textwrap.dedent(f"""
        import sys, time, torch
        sys.path.insert(0, {str(ROOT)!r})
        from tasks.run.checkpointing import AtomicCheckpointIO
        io = AtomicCheckpointIO()
        io.save_checkpoint({{"step": 1, "weights": torch.ones(4)}}, {str(target)!r})
        real_save = torch.save
        def slow_save(obj, f, *args, **kwargs):
            f.write(b"PK" + b"x" * 1_000_000)  # half a checkpoint on disk ...
            f.flush()
            print("writing", flush=True)
            time.sleep(60)  # ... when the kill comes
        torch.save = slow_save
        io.save_checkpoint({{"step": 2, "weights": torch.zeros(4)}}, {str(target)!r})
    """)
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "writing"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    restored = AtomicCheckpointIO().load_checkpoint(target)
    assert restored["step"] == 1 and torch.equal(restored["weights"], torch.ones(4))


def _fit_args(root: Path, runs: Path, name: str, extra: list[str]) -> list[str]:
    return [
        "fit", "--data", "datamodules.ImageFolderDataModule", "--data.root", str(root), "--data.image_size", "32",
        "--data.eval_resize", "32", "--data.batch_size", "4", "--data.num_workers", "0",
        "--data.train_augment", "random_resized_crop", "--model.backbone", "cifar_resnet20",
        "--model.optimizer", "torch.optim.SGD", "--model.optimizer.lr", "0.1", "--model.optimizer.momentum", "0.9",
        "--model.scheduler", "tasks.core.schedulers.WarmupMultiStepLR", "--model.scheduler.milestones", "[10, 20]",
        "--model.scheduler.warmup_iters", "5", "--model.scheduler_interval", "step", "--seed_everything", "0",
        "--trainer.deterministic", "true", "--trainer.max_epochs", "4", "--trainer.default_root_dir", str(runs),
        "--run_name", name, *CPU, *extra,
    ]  # fmt: skip


def _recorder(path: Path, sigterm_at: int = -1) -> list[str]:
    return ["--trainer.callbacks+=datasets.StepRecorder", "--trainer.callbacks.path", str(path),
            "--trainer.callbacks.sigterm_at", str(sigterm_at)]  # fmt: skip


#: torchvision's modern recipe's parts (issue 18): a policy, erasing, repeated augmentation, EMA
MODERN = [
    "--data.auto_augment", "trivial_wide", "--data.random_erase", "0.25", "--data.repeated_augment", "2",
    "--trainer.callbacks+=tasks.core.ema.ExponentialMovingAverage", "--trainer.callbacks.every_n_steps", "3",
    "--trainer.callbacks.decay", "0.9", "--trainer.callbacks.adjust", "false", "--trainer.callbacks.warmup_epochs", "1",
]  # fmt: skip


@pytest.mark.parametrize("recipe", [[], MODERN], ids=["paper", "modern"])
def test_sigterm_writes_last_ckpt_and_the_resumed_run_equals_an_uninterrupted_one(tmp_path, monkeypatch, recipe):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    root = write_imagefolder(tmp_path / "data", per_class=6, val_per_class=2, size=32)
    whole = classify.main(_fit_args(root, tmp_path / "a", "a", [*recipe, *_recorder(tmp_path / "a.json")]))
    with pytest.raises(SystemExit):  # SIGTERM in the middle of the second epoch (7 steps per epoch)
        classify.main(_fit_args(root, tmp_path / "b", "b", [*recipe, *_recorder(tmp_path / "b.json", sigterm_at=10)]))
    last = next((tmp_path / "b").rglob("last.ckpt"))
    state = torch.load(last, weights_only=True)
    assert state["global_step"] == 10 and state["epoch"] == 1
    run_id = (last.parent.parent / "wandb_id").read_text()
    resumed = classify.main(
        _fit_args(root, tmp_path / "b", "b", ["--ckpt_path", "last", *recipe, *_recorder(tmp_path / "b.json")])
    )
    assert Path(resumed.trainer.default_root_dir) == last.parent.parent  # the same run directory ...
    assert (last.parent.parent / "wandb_id").read_text() == run_id  # ... and W&B run
    assert sorted(p.name for p in last.parent.iterdir()) == ["best.ckpt", "last.ckpt"]  # no last-v1.ckpt
    with open(last.parent.parent / "metrics.csv", newline="") as file:  # kept, and appended to
        rows = list(csv.DictReader(file))
    assert sorted(int(r["epoch"]) for r in rows if r.get("val/acc1")) == [0, 1, 2, 3]
    assert torch.load(last, weights_only=True)["global_step"] == 28
    steps_a = json.loads((tmp_path / "a.json").read_text())
    steps_b = json.loads((tmp_path / "b.json").read_text())
    assert steps_a == steps_b and len(steps_a) == 28  # the same learning rate at every step
    assert resumed.trainer.global_step == whole.trainer.global_step == 28
    ours, reference = resumed.model.backbone.state_dict(), whole.model.backbone.state_dict()
    assert all(torch.equal(ours[k], reference[k]) for k in reference)  # bit for bit
    optimizer_a = whole.trainer.optimizers[0].state_dict()["state"]
    optimizer_b = resumed.trainer.optimizers[0].state_dict()["state"]
    assert all(torch.equal(optimizer_a[k]["momentum_buffer"], optimizer_b[k]["momentum_buffer"]) for k in optimizer_a)
    if recipe:  # the trained weights too (the model ends holding the EMA's), and the EMA's count
        ends = [torch.load(next((tmp_path / r).rglob("last.ckpt")), weights_only=True) for r in "ab"]
        raw_a, raw_b = (e["current_model_state"] for e in ends)
        assert all(torch.equal(raw_a[k], raw_b[k]) for k in raw_a)
        assert ends[0]["averaging_state"]["n_averaged"] == ends[1]["averaging_state"]["n_averaged"] == 7


def test_last_ckpt_follows_the_run_when_the_metric_stops_improving(tmp_path, folder):
    """Lightning 2.6 writes ``last.ckpt`` only with a new best; a run whose metric is flat (lr 0) must still
    leave its latest epoch in ``last.ckpt`` (``tasks.run.checkpointing.RunCheckpoint``)."""
    classify.main([
        "fit", "--data", "datamodules.ImageFolderDataModule", "--data.root", str(folder), "--data.image_size", "32",
        "--data.batch_size", "5", "--data.num_workers", "0", "--model.backbone", "cifar_resnet20",
        "--model.optimizer", "torch.optim.SGD", "--model.optimizer.lr", "0.0", "--trainer.max_epochs", "3",
        "--trainer.logger", "false", "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir",
        str(tmp_path / "runs"), "--run_name", "flat",
    ])  # fmt: skip
    best = torch.load(next((tmp_path / "runs").rglob("best.ckpt")), weights_only=True)
    last = torch.load(next((tmp_path / "runs").rglob("last.ckpt")), weights_only=True)
    assert best["epoch"] == 0 and (last["epoch"], last["global_step"]) == (2, 9)


def test_ckpt_path_last_without_a_checkpoint_is_an_error(tmp_path, folder):
    with pytest.raises(FileNotFoundError, match="--ckpt_path last: no .*last.ckpt to resume from"):
        classify.main(_fit_args(folder, tmp_path / "runs", "nothing", ["--ckpt_path", "last"]))
    with pytest.raises(FileNotFoundError, match="no such checkpoint file"):
        classify.main(_fit_args(folder, tmp_path / "runs", "nothing", ["--ckpt_path", str(tmp_path / "gone.ckpt")]))


# -- training faults ---------------------------------------------------------------------------------
def test_a_nan_loss_stops_the_run_naming_the_step_batch_and_checkpoint(folder, tmp_path, monkeypatch):
    original = torch.nn.functional.cross_entropy
    calls = {"n": 0}

    def poisoned(*args, **kwargs):  # the fifth training loss is NaN
        loss = original(*args, **kwargs)
        if torch.is_grad_enabled():
            calls["n"] += 1
            if calls["n"] == 5:
                return loss * float("nan")
        return loss

    monkeypatch.setattr(torch.nn.functional, "cross_entropy", poisoned)
    args = _fit_args(folder, tmp_path / "runs", "nan", ["--trainer.logger", "false", "--trainer.max_epochs", "3",
                                                         "--trainer.num_sanity_val_steps", "0"])  # fmt: skip
    with pytest.raises(NonFiniteLossError) as err:
        classify.main(args)
    message = str(err.value)
    assert "the training loss is nan at step" in message and "epoch 1" in message
    assert str(folder / "train") in message  # the batch's image paths
    assert "Last good checkpoint:" in message and "last.ckpt" in message and "nonfinite_loss=skip" in message
    calls["n"] = 0
    done = classify.main([*args, "--model.nonfinite_loss", "skip", "--run_name", "nan_skip"])
    assert done.model.skipped_nonfinite == 1 and done.trainer.global_step == 9  # all steps ran


def test_exported_weights_are_safetensors_that_load_back(tmp_path):
    from datasets import classify_checkpoint

    ckpt, trained = classify_checkpoint(tmp_path, "resnet18")
    out = export(ckpt, tmp_path / "resnet18.safetensors")
    assert out.read_bytes()[8:9] == b"{"  # a safetensors header, no pickle
    net = build_backbone("resnet18", num_classes=5)
    load_weights(net, out)
    assert all(torch.equal(net.state_dict()[k], v) for k, v in trained.items())


CLI_ERRORS = [
    ("classify", "datamodules.ImageFolderDataModule", "{root}/train does not exist"),
    ("classify", "datamodules.CIFARDataModule", "cifar10: {root}/cifar-10-batches-py lacks data_batch_1"),
    ("detect", "datamodules.COCODetectionDataModule", "image folder {root}/train2017 does not exist"),
]


@pytest.fixture(scope="session")
def cli_errors(tmp_path_factory) -> tuple[Path, list[Result]]:
    """Every case's command, run as ``python -m`` runs it, in one interpreter (``tests/commands.py``), once for
    the session: the folder they ran in and their results."""

    def commands_in(cwd: Path) -> list[list[str]]:
        commands = []
        for task, data, _ in CLI_ERRORS:
            scratch = ["--model.norm", "bn", "--model.freeze_at", "0"] if task == "detect" else []  # (else refused)
            commands.append([f"tasks.{task}", "fit", "--data", data, "--data.root", str(cwd / "nowhere"),
                             "--model.num_classes", "3", "--trainer.accelerator", "cpu", *scratch])  # fmt: skip
        return commands

    return run_commands_once(tmp_path_factory, "cli_errors", commands_in)


@pytest.mark.parametrize("case", range(len(CLI_ERRORS)), ids=lambda i: f"{CLI_ERRORS[i][0]}-{CLI_ERRORS[i][1]}")
def test_cli_errors_are_one_clear_line_and_leave_no_run_behind(case, cli_errors):
    """A mistyped data.root stops before the W&B run starts: one line naming the path, no run directory."""
    cwd, results = cli_errors
    result, message = results[case], CLI_ERRORS[case][2]
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip().splitlines()[-2].startswith(f"error: {message.format(root=cwd / 'nowhere')}")
    assert "Traceback" not in result.stderr
    assert not (cwd / "runs").exists()  # no version_0 taken, no crashed W&B run
    assert not list(cwd.rglob("wandb"))


class _Unreadable(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 2

    def __getitem__(self, index: int):
        if index == 0:
            raise CorruptImageError("photos/a.jpg: cannot decode the image (truncated).\nReplace or delete it.")
        raise DataValidationError("data/b.json has errors:\n  image id 3: no such file\ntotal: 1 errors")


@pytest.mark.parametrize("index", [0, 1])
def test_errors_raised_in_loader_workers_keep_their_own_message(index):
    """A DataLoader re-raises a worker's error wrapped in its traceback; the CLI shows the original message."""
    from zoo_common.command import message

    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(_Unreadable(), [index]), num_workers=1)
    with pytest.raises((CorruptImageError, DataValidationError)) as caught:
        next(iter(loader))
    assert str(caught.value).startswith("Caught ")  # what the loader raises ...
    expected = [
        "photos/a.jpg: cannot decode the image (truncated).\nReplace or delete it.",
        "data/b.json has errors:\n  image id 3: no such file\ntotal: 1 errors",
    ][index]
    assert message(caught.value) == expected  # ... and what the user reads
    assert message(ValueError("plain")) == "plain"


OTHER_COMMANDS = {
    "export": (["backbones.export", "{tmp}/missing.ckpt", "{tmp}/out.safetensors"],
               "checkpoint {tmp}/missing.ckpt: not a"),
    "check": (["datamodules.check", "--data", "datamodules.ImageFolderDataModule", "--data.root", "{tmp}/nowhere"],
              "{tmp}/nowhere/train does not exist"),
    "studies": (["studies", "run", "degradation_cifar", "--data.root", "{tmp}/nowhere", "--trainer.max_epochs", "1"],
                "cifar10: {tmp}/nowhere/cifar-10-batches-py lacks"),
}  # fmt: skip


@pytest.fixture(scope="session")
def other_commands(tmp_path_factory) -> tuple[Path, dict[str, Result]]:
    def commands_in(cwd: Path) -> list[list[str]]:
        return [[part.format(tmp=cwd) for part in OTHER_COMMANDS[n][0]] for n in OTHER_COMMANDS]

    cwd, results = run_commands_once(tmp_path_factory, "other_commands", commands_in)
    return cwd, dict(zip(OTHER_COMMANDS, results, strict=True))


@pytest.mark.parametrize("name", list(OTHER_COMMANDS))
def test_the_other_commands_also_answer_user_errors_in_one_line(name, other_commands):
    cwd, results = other_commands
    result, message = results[name], OTHER_COMMANDS[name][1]
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip().splitlines()[-2].startswith(f"error: {message.format(tmp=cwd)}"), result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("task", "backbone", "options"),
    [
        ("detect", "resnet18", {"head": "c4"}),
        ("detect", "preact_resnet18", {"head": "c4"}),
        ("detect", "resnet18", {"head": "fpn"}),
        ("segment", "resnet18", {}),
    ],
)
def test_detection_and_segmentation_checkpoints_export_the_whole_backbone(task, backbone, options, tmp_path):
    """C4 detectors keep res5 in the box head; the export puts it back, so every trained tensor is in the file."""
    from tasks.detect import DetectionTask
    from tasks.segment import SegmentationTask

    torch.manual_seed(0)
    if task == "detect":
        model = DetectionTask(backbone=backbone, num_classes=3, min_size=64, max_size=64, **options)
    else:
        model = SegmentationTask(backbone=backbone, num_classes=3)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(torch.randn_like(tensor))  # every tensor distinct from a fresh network's
    ckpt = tmp_path / "task.ckpt"
    checkpoint = {"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}
    model.on_save_checkpoint(checkpoint)  # what Lightning adds to it: the task's record of where its backbone is
    torch.save(checkpoint, ckpt)
    net = build_backbone(backbone, num_classes=0)
    load_weights(net, export(ckpt, tmp_path / "backbone.safetensors"))
    values = {tuple(t.flatten()[:8].tolist()) for t in model.state_dict().values() if t.is_floating_point()}
    exported = [k for k, t in net.state_dict().items() if t.is_floating_point()]
    assert exported and all(tuple(net.state_dict()[k].flatten()[:8].tolist()) in values for k in exported)
    if options.get("head") == "c4":
        assert torch.equal(net.layer4[0].conv1.weight, model.detector.roi_heads.box_head.res5[0][0].conv1.weight)


@pytest.mark.parametrize("warned_at", [3, 4], ids=["mid_epoch", "an_epochs_last_step"])
def test_slurms_warning_at_any_step_saves_a_checkpoint_that_resumes_to_the_same_weights(
    warned_at, tmp_path, monkeypatch
):
    """``tasks.run.slurm.SlurmRequeue`` (the real cluster's job in tests/test_slurm.py) with the warning at a
    chosen step: mid-epoch it saves there; at an epoch's last step -- a state Lightning resumes past the epoch's
    validation and the next epoch (a CI run's requeued job stopped at step 14 of 21) -- at the next epoch's first
    step. Either way the resumed run ends with the uninterrupted run's weights, bit for bit."""
    from tasks import classify
    from tasks.run import slurm

    root = write_imagefolder(tmp_path / "cls", per_class=2, val_per_class=1, size=32)  # 10 images: 2 steps of 5
    args = ["fit", "--data", "datamodules.ImageFolderDataModule", "--data.root", str(root), "--data.image_size", "32",
            "--data.batch_size", "5", "--data.num_workers", "0", "--model.backbone", "cifar_resnet20",
            "--trainer.max_epochs", "3", "--seed_everything", "0", "--trainer.logger", "false", *CPU]  # fmt: skip
    whole = classify.main([*args, "--trainer.default_root_dir", str(tmp_path / "a")])
    seen = {"step": 0}
    check = slurm.SlurmRequeue._check

    def checked_at(callback, trainer):
        seen["step"] = trainer.global_step
        return check(callback, trainer)

    monkeypatch.setattr(slurm.SlurmRequeue, "_check", checked_at)
    monkeypatch.setattr(slurm, "warned", lambda: seen["step"] >= warned_at)
    monkeypatch.setenv("SLURM_JOB_ID", "0")  # (its requeue fails without a cluster, and says so)
    classify.main([*args, "--trainer.default_root_dir", str(tmp_path / "b"),
                   "--trainer.callbacks+=tasks.run.slurm.SlurmRequeue"])  # fmt: skip
    saved = next((tmp_path / "b").rglob("hpc_ckpt_1.ckpt"))
    assert torch.load(saved, weights_only=True)["global_step"] == (5 if warned_at == 4 else 3)
    monkeypatch.setattr(slurm, "warned", lambda: False)
    resumed = classify.main([*args, "--trainer.default_root_dir", str(tmp_path / "b"), "--ckpt_path", str(saved)])
    assert resumed.trainer.global_step == whole.trainer.global_step == 6
    ours, reference = resumed.model.state_dict(), whole.model.state_dict()
    assert not [k for k in reference if not torch.equal(ours[k], reference[k])]
