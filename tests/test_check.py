"""``python -m datamodules.check`` at scale: a process pool, progress as it goes, each split's report as soon as
it is done -- and, on one tree per format with one of each kind of bad input, the same reports as the
single-process check that came before (``tests/check_reports.txt``, written by the check of commit 45c4ac0)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from datasets import voc_object, voc_xml, write_coco, write_ilsvrc_det, write_imagefolder, write_voc_tree

from datamodules import check

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).with_name("check_reports.txt")


def bad_datasets(root: Path) -> dict[str, list[str]]:
    """One tree per format with one of each kind of bad input; the check's arguments for each."""
    from PIL import Image

    from datamodules.shapes_xml import generate_localization

    folder = write_imagefolder(root / "images", per_class=3, val_per_class=1, size=32)
    train = sorted((folder / "train" / "circle").iterdir())
    train[0].write_bytes(train[0].read_bytes()[:200])  # truncated
    train[1].write_bytes(b"")  # empty
    (folder / "train" / "ring" / "notes.txt").write_text("not an image")
    Image.new("RGB", (32, 32)).save(folder / "train" / "ring" / "extra.tif")  # a format it does not read
    for image in (folder / "val" / "star").iterdir():
        image.unlink()  # an evaluation class without images

    coco = write_coco(root / "coco", train_images=6, val_images=4)
    path = coco / "annotations" / "instances_train2017.json"
    data = json.loads(path.read_text())
    data["annotations"][0]["category_id"] = 99  # not a category
    data["annotations"][1]["bbox"] = [90.0, 90.0, 20.0, 20.0]  # reaches outside
    del data["annotations"][2]["area"]
    data["annotations"][3]["segmentation"] = [[1.0, 1.0, 5.0, 5.0]]  # a polygon of two points
    data["annotations"][4]["image_id"] = 12345  # an image not in the file
    data["images"].append(dict(data["images"][0]))  # listed twice
    path.write_text(json.dumps(data))
    images = sorted((coco / "train2017").iterdir())
    images[1].unlink()  # missing
    images[2].write_bytes(b"not a jpeg")  # does not decode
    images[3].write_bytes(b"")  # empty
    val = sorted((coco / "val2017").iterdir())
    Image.open(val[0]).resize((48, 40)).save(val[0])  # another size than the file records

    voc = write_voc_tree(root / "VOCdevkit", {
        "000001": voc_xml(voc_object("dog", (1, 1, 50, 40))),
        "000002": voc_xml(voc_object("unicorn", (1, 1, 50, 40))),
        "000003": None,
        "000004": voc_xml(voc_object("dog", (30, 5, 10, 20))),
        "000005": "<annotation><size><width>10",
        "000006": voc_xml(voc_object("dog", (50, 40, 140, 79))),
        "000008": voc_xml(voc_object("cat", (1, 1, 30, 30)), width=64),  # the image is 100 wide
    })  # fmt: skip
    (voc / "VOC2007" / "JPEGImages" / "000001.jpg").write_bytes(b"not a jpeg")
    listed = voc / "VOC2007" / "ImageSets" / "Main" / "trainval.txt"
    listed.write_text(listed.read_text() + "000007\n")

    det = write_ilsvrc_det(root / "det", trainval=4, test=2)
    xml = sorted((det / "Annotations" / "DET" / "val").glob("*.xml"))[0]
    xml.write_text(xml.read_text().replace("<name>n", "<name>x", 1))

    loc = generate_localization(root / "loc", train_per_class=3, val_per_class=1, size=32)
    solution = loc / "LOC_val_solution.csv"
    rows = solution.read_text().splitlines()
    rows[1] = rows[1].replace(",n", ",x", 1)
    solution.write_text("\n".join([*rows, "ILSVRC2012_val_00009999,n00000001 1 1 9 9"]) + "\n")
    loc_val = loc / "ILSVRC" / "Data" / "CLS-LOC" / "val"
    (loc_val / "ILSVRC2012_val_00000002.JPEG").rename(loc_val / "unlabeled.JPEG")
    (loc_val / "ILSVRC2012_val_00000003.JPEG").write_bytes(b"\xff\xd8\xff broken")

    return {
        "imagefolder": ["--data", "datamodules.ImageFolderDataModule", "--data.root", str(folder)],
        "coco": ["--data", "datamodules.COCODetectionDataModule", "--data.root", str(coco)],
        "voc": ["--data", "datamodules.VOCDetectionDataModule", "--data.root", str(voc),
                "--data.train_sets", '["2007:trainval"]', "--data.val_sets", '["2007:trainval"]'],
        "ilsvrc_det": ["--data", "datamodules.ILSVRCDetectionDataModule", "--data.root", str(det)],
        "ilsvrc_loc": ["--data", "datamodules.ILSVRCLocalizationDataModule", "--data.root", str(loc)],
    }  # fmt: skip


def reports(root: Path, extra: list[str], capsys) -> str:
    """Every bad tree's check output (decoded and not), paths relative to ``root``."""
    text = []
    for name, argv in bad_datasets(root).items():
        for decode in ([], ["--no_decode"]):
            code = check.main([*argv, *decode, *extra])
            out = capsys.readouterr().out.replace(str(root), "<root>")
            text.append(f"## {name} {' '.join(decode)}\nexit {code}\n{out}")
    return "\n".join(text)


@pytest.mark.parametrize("workers", [1, 3])
def test_reports_equal_the_single_process_check_before_it(workers, tmp_path, capsys):
    """The pool reads the files in other processes and the reports still come out exactly as before, in
    order, for every format and every kind of bad input (decoded and with ``--no_decode``)."""
    assert reports(tmp_path, ["--workers", str(workers)], capsys) == GOLDEN.read_text()


def test_the_command_says_it_started_at_once_and_prints_each_split_as_it_is_done(tmp_path):
    """Run as users run it (a log file, not a terminal): a first line before PyTorch is loaded, progress
    lines with count and rate on standard error, the training split's report before the validation split is
    read, no warning of any library in the output (``PYTHONWARNINGS=default`` shows every one), and the
    datamodule named by its short name."""

    coco = write_coco(tmp_path / "coco", train_images=40, val_images=4)
    env = {**os.environ, "PYTHONWARNINGS": "default"}
    start = time.monotonic()
    process = subprocess.Popen(
        [sys.executable, "-m", "datamodules.check", "--data", "COCODetectionDataModule", "--data.root", str(coco),
         "--workers", "2"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    first = process.stdout.readline()
    first_after = time.monotonic() - start
    rest = process.stdout.read()
    assert process.wait() == 0, first + rest
    lines = [first, *rest.splitlines()]
    assert first.startswith("python -m datamodules.check: starting"), lines
    assert first_after < 5.0, f"the first line came after {first_after:.1f} s"  # 0.1 s here; before: the end
    train_done = next(i for i, line in enumerate(lines) if line.endswith("annotations checked)") and "train" in line)
    assert any(line.startswith("reading instances_val2017.json") for line in lines[train_done:]), lines
    assert any(line.startswith("instances_train2017.json: images: 41/41 (") and "/s" in line for line in lines), lines
    assert not [line for line in lines if "Warning" in line or "warn(" in line], lines


def test_progress_on_a_terminal_and_in_a_log(monkeypatch):
    import io

    from rich.console import Console

    screen = io.StringIO()
    progress = check.Progress(Console(file=screen, force_terminal=True, width=150))
    progress("reading instances_train2017.json", 0, None)
    progress("images", 0, 1000)
    progress("images", 500, 1000)
    progress("images", 1000, 1000)
    progress.close()
    assert "1000/1000" in screen.getvalue() and "images" in screen.getvalue() and "/s" in screen.getvalue()

    log = io.StringIO()
    clock = iter([0.0, 0.0, 5.0, 30.0, 40.0, 50.0])
    monkeypatch.setattr(check.time, "monotonic", lambda: next(clock))
    progress = check.Progress(Console(file=log, force_terminal=False, width=150), every=10.0)
    progress("reading a.json", 0, None)
    progress("images", 0, 1000)
    progress("images", 100, 1000)  # 5 s later: not yet
    progress("images", 600, 1000)  # 30 s in: 20/s, 20 s left
    progress("images", 1000, 1000)
    progress("images", 1000, 1000)  # said once
    assert log.getvalue().splitlines() == [
        "reading a.json ...",
        "images: 1,000 to check",
        "images: 600/1,000 (20/s, 0:00:30 elapsed, 0:00:20 left)",
        "images: 1,000/1,000 (25/s, 0:00:40 elapsed)",
    ]
