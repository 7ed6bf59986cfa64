"""``python -m datamodules.check`` at scale: a thread pool reading the images, progress as it goes, each split's
report as soon as it is done -- and, on one tree per format with one of each kind of bad input, the same reports
as the single-process check that came before (``tests/check_reports.txt``, written by the check of commit
45c4ac0, since updated where the wording changed on purpose: VOC's box outside the image clipped for training
only and kept as written for evaluation; one line for the annotations of an unusable image, each still checked
for its own problems; a negative width said as such); the whole-list screen of COCO annotations gives the
report of checking every one."""

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
    """The pool reads the files in other threads and the reports still come out exactly as before, in
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


def _messy_annotations() -> dict:
    """Annotations with every kind of problem the per-entry check reports, between clean ones."""
    images = [{"id": i, "file_name": f"{i}.jpg", "width": 40, "height": 30} for i in (3, 7, 11)]
    triangle = [1.0, 1.0, 20.0, 1.0, 10.0, 15.0]
    rle = {"size": [30, 40], "counts": [5, 10, 1185]}
    kinds = [
        {"bbox": [1, 2, 10, 12], "segmentation": [triangle]},  # clean, integer box
        {"bbox": [1.5, 2.5, 10.0, 12.0], "segmentation": rle, "iscrowd": 1},  # clean crowd
        {"bbox": [1.0, 2.0, 10.0, 12.0]},  # clean, no segmentation
        {"bbox": [1.0, 2.0, 10.0, 12.0], "segmentation": []},  # clean, no polygon
        {"bbox": [1.0, 2.0, 10.0, 12.0], "category_id": 99},  # unknown category
        {"bbox": [1.0, 2.0, 10.0, 12.0], "image_id": 5},  # no such image
        {"bbox": [1.0, 2.0, 0.5, 12.0]},  # degenerate
        {"bbox": [1.0, 2.0, 10.0, 1.0]},  # degenerate (exactly one pixel)
        {"bbox": [-2.0, 2.0, 10.0, 12.0]},  # outside, left
        {"bbox": [35.0, 2.0, 10.0, 12.0]},  # outside, right
        {"bbox": [1.0, 25.0, 10.0, 12.0]},  # outside, bottom
        {"bbox": [1.0, 2.0, float("inf"), 12.0]},  # outside: infinite
        {"bbox": [float("nan"), 2.0, 10.0, 12.0]},  # NaN: no comparison holds, as one by one
        {"bbox": [1.0, 2.0, 10.0, 12.0], "segmentation": [triangle, [1.0, 2.0, 3.0, 4.0]]},  # short polygon
        {"bbox": [1.0, 2.0, 10.0, 12.0], "segmentation": [[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]]},  # odd
    ]
    annotations = []
    for k, extra in enumerate(kinds * 3):
        ann = {"id": k + 1, "image_id": images[k % 3]["id"], "category_id": 1, "area": 50.0, "iscrowd": 0}
        annotations.append({**ann, **extra})
    return {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "a"}]}


def _structural(data: dict, change) -> dict:
    data = json.loads(json.dumps(data))  # (NaN and inf survive Python's json)
    change(data["annotations"])
    return data


@pytest.mark.parametrize(
    "change",
    [
        lambda anns: None,
        lambda anns: anns[4].pop("area"),  # lacks a field COCOeval reads
        lambda anns: anns[5].pop("bbox"),
        lambda anns: anns[6]["bbox"].__setitem__(0, True),  # a bool is not a number
        lambda anns: anns[7]["bbox"].__setitem__(1, "2"),
        lambda anns: anns[8]["bbox"].append(3.0),
        lambda anns: anns[9].__setitem__("category_id", [1]),  # unhashable
        lambda anns: anns[10]["segmentation"].append(7) if isinstance(anns[10].get("segmentation"), list) else None,
        lambda anns: anns[13]["segmentation"].append(None),
        lambda anns: anns.insert(2, "not an annotation"),
    ],
    ids=[
        "as is",
        "no area",
        "no bbox",
        "bool",
        "str",
        "five",
        "unhashable",
        "number polygon",
        "None polygon",
        "not a dict",
    ],  # fmt: skip
)
def test_screened_annotations_give_the_report_of_checking_every_one(change, monkeypatch):
    """``validate_coco`` checks one by one only the annotations the whole-list screen flags: the report and
    the cleaned copy equal those of checking every annotation, on each kind of problem and structure."""
    from datamodules import validation

    data = _structural(_messy_annotations(), change)
    screened = validation.validate_coco(data, Path("instances.json"))
    monkeypatch.setattr(validation, "annotation_suspects", lambda anns, *_: __import__("numpy").arange(len(anns)))
    every = validation.validate_coco(data, Path("instances.json"))
    assert screened[0].text(limit=1000) == every[0].text(limit=1000)
    assert screened[0].problems, "the messy file has problems"
    assert json.dumps(screened[1]) == json.dumps(every[1])


@pytest.mark.parametrize("value", [{"1": {}}, "annotations", 5])
def test_annotations_that_are_not_a_list_are_one_error(value):
    from datamodules.validation import validate_coco

    data = {**_messy_annotations(), "annotations": value}
    report, cleaned = validate_coco(data, Path("instances.json"))
    assert [str(p) for p in report.errors] == [
        f"ERROR   instances.json annotations: 'annotations' must be a list of objects, got a {type(value).__name__}"
    ]
    assert cleaned["annotations"] == [] and len(cleaned["images"]) == 3


def test_the_screen_leaves_clean_annotations_out():
    """On clean annotations (the four clean kinds above) the screen flags none: nothing is checked one by one;
    on the others it flags all, the NaN box too (a NaN passes every comparison: it is flagged as not finite)."""
    from datamodules.validation import annotation_suspects

    data = _messy_annotations()
    clean = [ann for ann in data["annotations"] if ann["id"] % 15 in (1, 2, 3, 4)]
    images = {image["id"]: image for image in data["images"]}
    assert len(clean) == 12
    assert annotation_suspects(clean, images, {1}).tolist() == []
    assert annotation_suspects(data["annotations"], images, {1}).tolist() == [
        k for k, ann in enumerate(data["annotations"]) if ann["id"] % 15 not in (1, 2, 3, 4)
    ]
