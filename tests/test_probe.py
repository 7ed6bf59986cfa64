"""What a probe of bad files, interrupted runs and hostile inputs found, each case fixed: data that would train
wrongly is refused at setup and named by ``python -m datamodules.check``; one run per run directory; a run
that skips non-finite losses still never keeps non-finite weights; the predictor reads an image in memory as
the file decoder reads the file; the mistakes a user makes get one line naming the file, field and fix."""

from __future__ import annotations

import json
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from commands import run_commands
from datasets import CPU, edit_coco, voc_object, voc_xml, write_cifar, write_coco, write_imagefolder, write_voc_tree

from datamodules import (
    CIFARDataModule,
    COCODetectionDataModule,
    ILSVRCLocalizationDataModule,
    ImageFolderDataModule,
    VOCDetectionDataModule,
)
from datamodules.check import DataValidationError
from datamodules.check import main as check_main
from datamodules.shapes_xml import generate_localization
from tasks import classify

ROOT = Path(__file__).resolve().parents[1]


def _command(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "offline"}
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


def _one_line_error(result) -> str:
    """The ``error: ...`` line of a command that failed as a user's mistake should: no traceback."""
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.strip().splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, result.stderr[-3000:]
    return lines[0]


# -- 5. data that would train wrongly: refused at setup, named by the check -----------------------------------
def _cifar_batch(root: Path, name: str, change) -> None:
    path = root / "cifar-10-batches-py" / name
    with open(path, "rb") as f:
        batch = pickle.load(f, encoding="bytes")
    change(batch)
    with open(path, "wb") as f:
        pickle.dump(batch, f, protocol=2)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda b: b.__setitem__(b"labels", b[b"labels"][:-1]), r"data_batch_2: 8 images but 7 labels"),
        (lambda b: b[b"labels"].__setitem__(3, 10), r"data_batch_2: image 3 has label 10, outside the 10 classes"),
        (lambda b: b.__setitem__(b"data", b[b"data"][:, :3000]), r"data_batch_2: 'data' is 8x3000; CIFAR's batches"),
    ],
    ids=["fewer_labels", "label_outside", "row_size"],
)
def test_a_cifar_batch_that_would_shift_labels_or_crash_mid_run_is_refused(change, message, tmp_path, capsys):
    root = write_cifar(tmp_path / "cifar")
    _cifar_batch(root, "data_batch_2", change)
    with pytest.raises(ValueError, match=message):
        CIFARDataModule(str(root), num_workers=0).setup("fit")
    assert check_main(["--data", "datamodules.CIFARDataModule", "--data.root", str(root)]) == 1
    assert "data_batch_2" in capsys.readouterr().out


def _rle_of_other_size(data):
    crowd = next(a for a in data["annotations"] if a["iscrowd"])
    crowd["segmentation"] = {"size": [50, 60], "counts": [3000]}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d["categories"].append({"id": d["categories"][0]["id"], "name": "twin"}),
         r"category id 3 is listed 2 times \('circle', 'twin'\): one of those classes would never be trained"),
        (_rle_of_other_size, r"its RLE mask is 50x60 \(height x width\) but the image is 96x96"),
        (lambda d: d["annotations"][2]["bbox"].__setitem__(0, float("nan")), r"'bbox' must be four numbers"),
        (lambda d: d["annotations"][2]["segmentation"][0].__setitem__(1, float("nan")),
         r"a polygon holds a coordinate that is not a finite number"),
        (lambda d: d["annotations"][2].__setitem__("category_id", str(d["annotations"][2]["category_id"])),
         r"category_id must be an integer \(one of \[3, 7, 12, 40, 90\]\), got '\d+'"),
    ],
    ids=["duplicate_category", "crowd_rle_size", "nan_box", "nan_polygon", "string_category_id"],
)  # fmt: skip
def test_coco_annotations_that_would_train_wrongly_are_refused_and_named(change, message, tmp_path, capsys):
    coco = write_coco(tmp_path / "coco", train_images=4, val_images=2)
    edit_coco(coco, "train2017", change)
    with pytest.raises(DataValidationError, match=message):
        COCODetectionDataModule(str(coco), num_workers=0).setup("fit")
    assert check_main(["--data", "datamodules.COCODetectionDataModule", "--data.root", str(coco), "--no_decode"]) == 1
    assert "instances_train2017.json" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (voc_xml(voc_object("dog", (1, 1, 50, 40)), width=0, height=0), r"<size> records the image as 0x0"),
        (voc_xml(voc_object("dog", (1, "nan", 50, 40))), r"holds a coordinate that is not a finite number"),
    ],
    ids=["size_0x0", "nan_coordinate"],
)
def test_voc_objects_that_would_be_dropped_or_misplaced_are_refused(text, message, tmp_path, capsys):
    other = voc_xml(voc_object("cat", (5, 5, 40, 40)))
    root = write_voc_tree(tmp_path / "VOCdevkit", {"000001": text, "000002": other})
    dm = VOCDetectionDataModule(str(root), train_sets=["2007:trainval"], val_sets=["2007:trainval"], num_workers=0)
    with pytest.raises(DataValidationError, match=message):
        dm.setup("validate")  # the evaluation ground truth too: before, every box was dropped from it
    args = ["--data", "datamodules.VOCDetectionDataModule", "--data.root", str(root), "--data.train_sets",
            '["2007:trainval"]', "--data.val_sets", '["2007:trainval"]', "--no_decode"]  # fmt: skip
    assert check_main(args) == 1 and "000001.xml" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ("ILSVRC2012_val_00000001,{wnid} 40 30 10 20", r"LOC_val_solution.csv:\d+: inverted box"),
        ("ILSVRC2012_val_00000001,{wnid} 1 1 9 9", r"LOC_val_solution.csv:\d+: image ILSVRC2012_val_00000001 is "
                                                    r"listed again"),
        ("ILSVRC2012_val_00000002,{wnid} 1 one 9 9", r"LOC_val_solution.csv:\d+: '1 one 9 9' are not four numbers"),
        ("ILSVRC2012_val_00000002,{wnid} 1 nan 9 9", r"holds a value that is not a finite number"),
    ],
    ids=["inverted", "repeated_image", "not_a_number", "nan"],
)  # fmt: skip
def test_a_localization_solution_row_that_would_change_a_label_or_box_is_refused(row, message, tmp_path, capsys):
    root = generate_localization(tmp_path / "loc", train_per_class=2, val_per_class=1, size=32)
    solution = root / "LOC_val_solution.csv"
    lines = solution.read_text().splitlines()
    wnid = lines[1].split(",")[1].split()[0]
    lines = [lines[0], *[line for line in lines[1:] if not line.startswith(row.split(",")[0]) or "again" in message]]
    solution.write_text("\n".join([*lines, row.format(wnid=wnid)]) + "\n")
    with pytest.raises(DataValidationError, match=message):
        ILSVRCLocalizationDataModule(str(root), num_workers=0).setup("validate")
    assert check_main(["--data", "datamodules.ILSVRCLocalizationDataModule", "--data.root", str(root),
                       "--no_decode"]) == 1  # fmt: skip
    assert "LOC_val_solution.csv" in capsys.readouterr().out


def test_an_imagefolder_symlink_loop_is_named_not_multiplied(tmp_path, capsys):
    root = write_imagefolder(tmp_path / "images", per_class=3, val_per_class=1, size=32)
    os.symlink(root / "train" / "ring", root / "train" / "ring" / "again")  # a class folder linking to itself
    with pytest.raises(DataValidationError, match=r"ring/again: links back to .*ring, a folder it is in: a loop"):
        ImageFolderDataModule(str(root), image_size=32, num_workers=0).setup("fit")
    lenient = ImageFolderDataModule(str(root), image_size=32, num_workers=0, drop_invalid=True)
    lenient.setup("fit")
    assert len(lenient.datasets["train"]) == 15  # each image once (the loop listed ring's ~40 times)
    assert check_main(["--data", "datamodules.ImageFolderDataModule", "--data.root", str(root), "--no_decode"]) == 1
    assert "a loop" in capsys.readouterr().out


def test_images_the_decoder_cannot_read_are_said_once_at_setup(tmp_path, caplog):
    from PIL import Image

    root = write_imagefolder(tmp_path / "images", per_class=3, val_per_class=1, size=32)
    Image.new("RGB", (32, 32)).save(root / "train" / "ring" / "extra.bmp")
    Image.new("RGB", (32, 32)).save(root / "train" / "star" / "extra.tif")
    with caplog.at_level("WARNING"):
        ImageFolderDataModule(str(root), image_size=32, num_workers=0).setup("fit")
    said = [r.getMessage() for r in caplog.records if "formats the decoder does not read" in r.getMessage()]
    assert len(said) == 1 and "2 files in 2 class folders" in said[0]


def test_an_exif_turned_image_is_named_as_such(tmp_path, capsys):
    from PIL import Image

    coco = write_coco(tmp_path / "coco", train_images=2, val_images=2, size=(96, 64), object_size=(16, 30))
    first = json.loads((coco / "annotations" / "instances_val2017.json").read_text())["images"][0]
    path = coco / "val2017" / first["file_name"]
    turned = Image.open(path).transpose(Image.Transpose.ROTATE_90)  # stored 64 x 96 ...
    exif = Image.Exif()
    exif[0x0112] = 6  # ... and tagged "turn 90 degrees to display", as phones write them
    turned.save(path, exif=exif.tobytes())
    assert check_main(["--data", "datamodules.COCODetectionDataModule", "--data.root", str(coco)]) == 1
    out = capsys.readouterr().out
    assert "the image is 64x96 but the annotation file says 96x64" in out and "EXIF orientation tag (6" in out


def test_a_zero_std_is_refused_before_training(tmp_path):
    root = write_imagefolder(tmp_path / "images", per_class=2, val_per_class=1, size=32)
    with pytest.raises(ValueError, match=r"data.std=\[0.229, 0.0, 0.225\] must be three positive numbers"):
        ImageFolderDataModule(str(root), std=(0.229, 0.0, 0.225))


# -- 4 and 9. one run directory, one run; a killed save's leftovers ----------------------------------------
def test_a_second_run_into_a_running_runs_directory_is_refused_naming_it(tmp_path):
    from tasks.run.run_dirs import RunDirectory, RunDirectoryBusy

    root = write_imagefolder(tmp_path / "images", per_class=2, val_per_class=1, size=32)
    run = tmp_path / "runs" / "shared" / "v"
    (run / "checkpoints").mkdir(parents=True)
    leftover = run / "checkpoints" / ".last.ckpt.partial-12345"
    leftover.write_bytes(b"half a checkpoint")
    running = RunDirectory(run)
    running.claim()  # the first run, still running
    args = ["fit", "--data", "datamodules.ImageFolderDataModule", "--data.root", str(root), "--data.image_size", "32",
            "--data.num_workers", "0", "--data.batch_size", "5", "--model.backbone", "cifar_resnet20",
            "--trainer.max_steps", "1", "--trainer.logger", "false",
            "--trainer.default_root_dir", str(tmp_path / "runs"), "--run_name", "shared", "--run_version", "v",
            *CPU]  # fmt: skip
    try:
        with pytest.raises(RunDirectoryBusy, match=rf"{run} is in use by another run \(process {os.getpid()} on"):
            classify.main(args)
        assert sorted(p.name for p in run.iterdir()) == [".lock", "checkpoints"]  # nothing of the second run
    finally:
        running.release()
    assert not leftover.exists()  # removed when the first run claimed the directory
    classify.main(args)  # the first run has ended: the directory is free again
    assert (run / "checkpoints" / "last.ckpt").is_file()


def test_a_read_only_run_directory_is_named_with_its_cause(tmp_path, monkeypatch):
    """(As root every folder is writable: the read-only file system is what the kernel would say, simulated.)"""
    import errno

    root = write_imagefolder(tmp_path / "images", per_class=2, val_per_class=1, size=32)
    runs = tmp_path / "runs"
    real_mkdir = Path.mkdir

    def read_only(self, *args, **kwargs):
        if str(self).startswith(str(runs)):
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", read_only)
    with pytest.raises(OSError, match=r"cannot write into the run directory .*: the file system is read-only"):
        classify.main(["fit", "--data", "datamodules.ImageFolderDataModule", "--data.root", str(root),
                       "--trainer.default_root_dir", str(runs), "--trainer.logger", "false", *CPU])  # fmt: skip


def test_a_failed_checkpoint_write_names_the_folder_and_the_cause(tmp_path, monkeypatch):
    import errno

    from tasks.run.checkpointing import AtomicCheckpointIO

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(OSError, match=rf"cannot write into the run directory {tmp_path}: no space left on the device"):
        AtomicCheckpointIO().save_checkpoint({"x": torch.ones(1)}, tmp_path / "last.ckpt")
    assert not list(tmp_path.iterdir())  # no staging file left


# -- 6. skipping non-finite losses never ends with non-finite weights ---------------------------------------
def test_a_run_exiting_with_its_loader_workers_still_running_exits(tmp_path):
    """Found under load: a SIGTERM'd fit whose loader iterator an exception's traceback kept alive hung at
    exit -- the workers ignore SIGTERM, and multiprocessing's exit terminates, then joins them for ever."""
    script = tmp_path / "exits.py"
    script.write_text(
        "import sys\n"
        "from datamodules.loading import SharedHeapLoader\n"
        "loader = SharedHeapLoader(list(range(64)), batch_size=2, num_workers=2)\n"
        "kept = iter(loader)  # alive to the exit, as a traceback keeps a failed fit's iterator\n"
        "next(kept)\n"
        "sys.exit(3)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    try:
        result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("the process did not exit within 120 s with its loader workers alive")
    assert result.returncode == 3, result.stderr
    assert "Traceback" not in result.stderr, result.stderr


def test_skipped_nonfinite_losses_never_leave_nonfinite_weights(tmp_path, monkeypatch):
    from tasks.core.guards import NonFiniteLossError

    root = write_imagefolder(tmp_path / "images", per_class=4, val_per_class=1, size=32)
    step = torch.optim.SGD.step
    calls = {"n": 0}

    def exploding(self, *args, **kwargs):  # the third update sends the weights to infinity; its loss was finite
        out = step(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 3:
            with torch.no_grad():
                self.param_groups[0]["params"][0].fill_(float("inf"))
        return out

    monkeypatch.setattr(torch.optim.SGD, "step", exploding)
    with pytest.raises(NonFiniteLossError, match=r"the weights became non-finite at step 3 .*skips non-finite losses"):
        classify.main(
            [
                "fit",
                "--data",
                "datamodules.ImageFolderDataModule",
                "--data.root",
                str(root),
                "--data.image_size",
                "32",
                "--data.batch_size",
                "4",
                "--data.num_workers",
                "0",
                "--model.backbone",
                "cifar_resnet20",
                "--model.optimizer",
                "torch.optim.SGD",
                "--model.optimizer.lr",
                "0.01",
                "--model.nonfinite_loss",
                "skip",
                "--trainer.max_epochs",
                "3",
                "--trainer.logger",
                "false",
                "--trainer.default_root_dir",
                str(tmp_path / "runs"),
                *CPU,
            ]
        )
    for ckpt in (tmp_path / "runs").rglob("*.ckpt"):
        state = torch.load(ckpt, weights_only=True)["state_dict"]
        assert all(v.isfinite().all() for v in state.values() if v.is_floating_point()), ckpt


# -- 7. the same image, the same answer ----------------------------------------------------------------------
def test_a_16_bit_image_in_memory_gives_what_its_file_gives(tmp_path):
    from PIL import Image

    from datamodules.images import read_image
    from tasks.inference.predictor import _as_images

    values = (np.arange(40 * 48).reshape(40, 48) * 33 % 65536).astype(np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    opened = Image.open(tmp_path / "deep.png")
    assert opened.mode.startswith("I")
    (memory,) = _as_images([opened])
    assert torch.equal(read_image(memory), read_image(tmp_path / "deep.png"))  # not clipped to 255 by convert()
    with pytest.raises(ValueError, match=r"must be a 3 x H x W uint8 RGB tensor with H, W > 0, got \(3, 0, 0\)"):
        _as_images([torch.zeros(3, 0, 0, dtype=torch.uint8)])


# -- 8. one line for each mistake ----------------------------------------------------------------------------
def test_checkpoint_paths_that_are_not_checkpoints_of_the_task_are_one_line(tmp_path):
    from backbones import build_backbone

    root = write_imagefolder(tmp_path / "images", per_class=2, val_per_class=1, size=32)
    plain = tmp_path / "plain.pth"
    torch.save(build_backbone("cifar_resnet20", num_classes=5).state_dict(), plain)
    from safetensors.torch import save_file

    save_file({"w": torch.ones(2)}, str(tmp_path / "weights.safetensors"))
    truncated = tmp_path / "cut.ckpt"
    truncated.write_bytes(b"PK\x03\x04 half a zip")
    data = ["--data", "datamodules.ImageFolderDataModule", "--data.root", str(root), "--trainer.logger", "false"]
    cases = [
        (["tasks.classify", "validate", *data, "--ckpt_path", str(plain)],
         rf"error: --ckpt_path {plain}: a plain state dict \(\d+ tensors, no hyperparameters\): give it as "
         r"--model.weights"),
        (["tasks.classify", "validate", *data, "--ckpt_path", str(tmp_path / "weights.safetensors")],
         r"is a .safetensors weight file, not a checkpoint of a run: start a run from it with --model.weights"),
        (["tasks.export", str(truncated), str(tmp_path / "out.onnx")],
         rf"error: checkpoint {truncated}: not a readable"),
        (["tasks.classify", "fit", "--config", "http://127.0.0.1:9/recipe.yaml"],
         r"configs are read from files only, never fetched from a URL"),
    ]  # fmt: skip
    for (args, message), result in zip(cases, run_commands([args for args, _ in cases], tmp_path), strict=True):
        line = _one_line_error(result)
        assert re.search(message, line), (args, line)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "out.onnx").exists()
