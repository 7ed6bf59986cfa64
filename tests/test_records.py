"""The datasets' flat arrays (``datamodules.records.DetectionRecords``, ``datamodules.masks.InstanceRegions``)
give the same images, order, boxes, labels and masks as reading the annotation file through a
``pycocotools.coco.COCO`` index, as the datasets did before; and the datasets keep nothing else."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import pycocotools_semantic_mask, write_coco
from pycocotools import mask as mask_utils

from datamodules import COCODetectionDataModule, COCOSegmentationDataModule
from datamodules.coco_detection import coco_records
from datamodules.coco_files import load_coco, read_validated
from datamodules.coco_format import xywh_to_xyxy_clipped
from datamodules.masks import InstanceRegions, category_classes, semantic_mask


def quirky_coco(path: Path) -> Path:
    """Non-contiguous and unsorted image and category ids, an image without annotations, crowds as
    uncompressed RLE (as COCO ships them) and compressed RLE, several polygons per object, a polygon of
    two points, overlapping objects of two classes, a box a pixel thin, annotations out of image order."""
    rng = np.random.default_rng(3)
    images = [{"id": i, "file_name": f"{i:06d}.jpg", "width": w, "height": h}
              for i, w, h in [(1000, 48, 40), (7, 64, 64), (3, 40, 56), (55, 32, 32)]]  # fmt: skip
    categories = [{"id": 90, "name": "toothbrush"}, {"id": 3, "name": "car"}, {"id": 41, "name": "skateboard"}]
    anns = []

    def add(image, category, segmentation, crowd=0, bbox=None):
        x, y = (float(v) for v in rng.integers(0, 12, 2))
        bbox = bbox or [x, y, 14.0, 11.0]
        anns.append({"id": len(anns) + 1, "image_id": image["id"], "category_id": category, "iscrowd": crowd,
                     "area": float(bbox[2] * bbox[3]), "bbox": bbox, "segmentation": segmentation})  # fmt: skip

    for image in images[:3]:  # image 55 keeps no annotation
        w, h = image["width"], image["height"]
        for category in (90, 3, 41, 3):
            x, y = rng.uniform(0, w / 2), rng.uniform(0, h / 2)
            sx, sy = rng.uniform(6, w / 2), rng.uniform(6, h / 2)
            polygon = [x, y, x + sx, y + 1, x + sx * 0.8, y + sy, x + 1, y + sy * 0.9]
            second = [x + 2, y + 2, x + 6, y + 2, x + 4, y + 7]
            add(image, category, [[round(v, 2) for v in polygon], second, [1.0, 1.0, 3.0, 3.0]])
        crowd = np.zeros((h, w), dtype=np.uint8)
        crowd[2:9, w - 12 : w - 2] = 1
        encoded = mask_utils.encode(np.asfortranarray(crowd))
        flat = crowd.flatten(order="F").astype(np.int8)  # column-major runs, starting with background
        counts = np.diff(np.r_[0, np.flatnonzero(np.diff(flat)) + 1, flat.size]).tolist()
        counts = [0, *counts] if flat[0] else counts
        add(image, 3, {"size": [h, w], "counts": counts}, crowd=1)  # uncompressed RLE
        add(image, 90, {"size": [h, w], "counts": encoded["counts"].decode()})  # compressed RLE
        add(image, 41, [[2, 2, 20, 2, 20, 20]], bbox=[2.0, 2.0, 0.5, 18.0])  # a box half a pixel wide
    order = rng.permutation(len(anns))
    data = {"images": images, "categories": categories, "annotations": [anns[i] for i in order]}
    path.write_text(json.dumps(data))
    return path


def pycocotools_boxes(coco, image_id: int) -> tuple[list, list]:
    """Training boxes and labels the way the detection dataset read them from a COCO index."""
    info, boxes, labels = coco.imgs[image_id], [], []
    for ann in coco.imgToAnns.get(image_id, []):
        x1, y1, x2, y2 = xywh_to_xyxy_clipped(ann["bbox"], info["width"], info["height"])
        if not ann["iscrowd"] and x2 - x1 > 1 and y2 - y1 > 1:
            boxes.append((x1, y1, x2, y2))
            labels.append(ann["category_id"])
    return boxes, labels


@pytest.fixture(params=["quirky", "shapes"])
def annotation_file(request, tmp_path) -> Path:
    if request.param == "quirky":
        return quirky_coco(tmp_path / "instances.json")
    return write_coco(tmp_path / "shapes", train_images=8, val_images=2) / "annotations" / "instances_train2017.json"


def test_records_equal_a_pycocotools_index(annotation_file):
    coco, dataset = load_coco(annotation_file), read_validated(annotation_file)
    ids = sorted(coco.getImgIds())
    records, regions = coco_records(dataset), InstanceRegions.from_dataset(dataset)
    assert records.ids.tolist() == ids == regions.ids.tolist()
    for index, image_id in enumerate(ids):
        assert records.name(index) == coco.imgs[image_id]["file_name"] == regions.info(index)["file_name"]
        boxes, labels, _ = records.objects(index)
        want_boxes, want_labels = pycocotools_boxes(coco, image_id)
        np.testing.assert_array_equal(boxes, np.asarray(want_boxes, dtype=np.float32).reshape(-1, 4))
        assert labels.tolist() == want_labels
        classes = category_classes(dataset["categories"], "all")[0]
        for rules in ("default", "torchvision"):
            got = semantic_mask(regions, index, classes, rules)
            np.testing.assert_array_equal(got, pycocotools_semantic_mask(coco, image_id, classes, rules))
        area = sum(a["area"] for a in coco.imgToAnns.get(image_id, []) if a["category_id"] in classes)
        assert regions.annotated_areas(classes)[index] == area


def test_the_quirky_file_exercises_what_it_claims(tmp_path):
    """The case above is not vacuous: crowds, both RLE forms, an ignored overlap and an empty image."""
    path = quirky_coco(tmp_path / "instances.json")
    regions = InstanceRegions.from_dataset(read_validated(path))
    classes = category_classes(read_validated(path)["categories"], "all")[0]
    masks = [semantic_mask(regions, i, classes) for i in range(len(regions))]
    assert regions.crowd.sum() == 3 and (regions.rle_offsets[1:] > regions.rle_offsets[:-1]).sum() == 6
    assert all((masks[i] == 255).any() for i in (0, 1, 3)) and len(np.unique(masks[1])) >= 4
    assert regions.ids.tolist() == [3, 7, 55, 1000] and not masks[2].any()  # 55: no annotation


def test_datasets_keep_only_flat_arrays(tmp_path):
    """What a loader worker reads: numpy arrays, not the annotation file's dicts or a pycocotools index."""
    root = write_coco(tmp_path / "coco", train_images=4, val_images=2)
    detection = COCODetectionDataModule(str(root), num_workers=0)
    detection.setup("fit")
    segmentation = COCOSegmentationDataModule(str(root), categories="all", num_workers=0, min_area=0,
                                              cache_dir=str(tmp_path / "cache"))  # fmt: skip
    segmentation.setup("fit")
    for dataset, table in [(detection.datasets["train"], "records"), (segmentation.datasets["train"], "regions")]:
        fields = dataclasses.asdict(getattr(dataset, table))
        assert all(isinstance(v, np.ndarray) for v in fields.values()), table
        assert not hasattr(dataset, "coco")
        big = [k for k, v in vars(dataset).items() if isinstance(v, (list, dict)) and len(v) > 16]
        assert not big, big


def test_setup_reads_the_image_folders_listing_not_each_file(tmp_path, monkeypatch):
    """No stat per image at setup (minutes per start on a network filesystem at COCO's size): a missing file
    is still named at setup, an empty one when it is read (or skipped with ``skip_corrupt``)."""
    import os

    from datamodules.images import CorruptImageError

    root = write_coco(tmp_path / "coco", train_images=12, val_images=2)
    images = str(root / "train2017")
    stats = []
    real_stat = os.stat

    def counting_stat(path, *args, **kwargs):
        if str(path).startswith(images + os.sep):
            stats.append(str(path))
        return real_stat(path, *args, **kwargs)

    dataset = json.loads((root / "annotations" / "instances_train2017.json").read_text())
    empty = root / "train2017" / dataset["images"][0]["file_name"]
    empty.write_bytes(b"")
    monkeypatch.setattr(os, "stat", counting_stat)
    dm = COCODetectionDataModule(str(root), num_workers=0)
    dm.setup("fit")
    monkeypatch.setattr(os, "stat", real_stat)
    assert stats == []
    train = dm.datasets["train"]
    index = train.ids.index(dataset["images"][0]["id"])
    with pytest.raises(CorruptImageError, match=f"{empty}: the file is empty"):
        train[index]
    lenient = COCODetectionDataModule(str(root), num_workers=0, skip_corrupt=True)
    lenient.setup("fit")
    assert lenient.datasets["train"][index] is None
    (root / "train2017" / dataset["images"][1]["file_name"]).unlink()
    with pytest.raises(ValueError, match=f"{dataset['images'][1]['file_name']}: image id .*: the file does not exist"):
        COCODetectionDataModule(str(root), num_workers=0).setup("fit")


@pytest.mark.parametrize("task", ["detection", "segmentation"])
def test_setup_parses_each_annotation_file_once_with_the_collector_paused(task, tmp_path, monkeypatch):
    """``setup("fit")`` parses the validation file and the training file once each (the classes' list too),
    and the cyclic garbage collector is paused while they are parsed, checked and turned into records (a
    collection would visit every object of a parsed file: at COCO's size most of a setup's time)."""
    import gc

    from datamodules import coco_detection, coco_files

    root = write_coco(tmp_path / "coco", train_images=4, val_images=2)
    parsed, collecting = [], []

    def spy(module, name, record):
        real = getattr(module, name)

        def spied(*args, **kwargs):
            record(args)
            collecting.append(gc.isenabled())
            return real(*args, **kwargs)

        monkeypatch.setattr(module, name, spied)

    spy(coco_files, "read_coco_json", lambda a: parsed.append(Path(a[0]).name))
    spy(coco_files, "validate_coco", lambda a: None)
    if task == "detection":
        spy(coco_detection, "coco_records", lambda a: None)
        COCODetectionDataModule(str(root), num_workers=0).setup("fit")
    else:
        real = InstanceRegions.from_dataset
        monkeypatch.setattr(
            InstanceRegions, "from_dataset", staticmethod(lambda d: collecting.append(gc.isenabled()) or real(d))
        )
        COCOSegmentationDataModule(str(root), categories="all", num_workers=0, cache_dir=str(tmp_path / "masks")).setup(
            "fit"
        )
    # detection's classes are the validation file's: it is read first; segmentation's the first file read's
    first = "instances_val2017.json" if task == "detection" else "instances_train2017.json"
    assert parsed[0] == first and sorted(parsed) == ["instances_train2017.json", "instances_val2017.json"]
    assert len(collecting) == 6 and not any(collecting)
    assert gc.isenabled()


def test_the_checks_run_once_per_file_and_folder(tmp_path, monkeypatch):
    """A second setup (a requeued job) does not check the same file again; an edited file, or a file gone
    from the folder, is checked again; a file with errors is never marked."""
    from datamodules import coco_files

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    calls = []
    real = coco_files.validate_coco
    monkeypatch.setattr(coco_files, "validate_coco", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    root = write_coco(tmp_path / "coco", train_images=4, val_images=2)
    path = root / "annotations" / "instances_train2017.json"
    for _ in range(2):
        read_validated(path, root / "train2017")
    assert calls == [path]
    data = json.loads(path.read_text())
    data["info"] = {"edited": True}
    path.write_text(json.dumps(data))
    read_validated(path, root / "train2017")
    (root / "train2017" / data["images"][-1]["file_name"]).unlink()
    with pytest.raises(ValueError, match="the file does not exist"):
        read_validated(path, root / "train2017")
    with pytest.raises(ValueError, match="the file does not exist"):  # errors are reported every time
        read_validated(path, root / "train2017")
    assert calls == [path] * 6  # edited: 1; missing file: 2 (verdict, report) per try


def _rank_reads(rank: int, init: str, root: str) -> None:
    import torch.distributed as dist

    from datamodules import coco_files

    os.environ["XDG_CACHE_HOME"] = str(Path(root) / f"cache{rank}")  # no shared mark: only the verdict
    calls = []
    real = coco_files.validate_coco
    coco_files.validate_coco = lambda *a, **k: calls.append(1) or real(*a, **k)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        path = Path(root) / "coco" / "annotations" / "instances_train2017.json"
        dataset = read_validated(path, Path(root) / "coco" / "train2017")
        Path(root, f"{rank}.json").write_text(json.dumps({"calls": len(calls), "images": len(dataset["images"])}))
    finally:
        dist.destroy_process_group()


def test_under_ddp_only_rank_0_runs_the_checks(tmp_path):
    import torch.multiprocessing as mp

    write_coco(tmp_path / "coco", train_images=4, val_images=2)
    mp.spawn(_rank_reads, args=(f"file://{tmp_path / 'store'}", str(tmp_path)), nprocs=2)
    ranks = [json.loads((tmp_path / f"{r}.json").read_text()) for r in (0, 1)]
    assert [r["calls"] for r in ranks] == [1, 0] and ranks[0]["images"] == ranks[1]["images"] == 5


class _FreezeCount(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> int:
        import gc

        return gc.get_freeze_count()


def test_loader_workers_start_with_the_parents_objects_frozen():
    """What keeps a worker from copying the training process's objects: its garbage collector never visits
    them (``gc.freeze`` before the fork); the training process collects its own as before."""
    import gc

    from datamodules.loading import SharedHeapLoader

    before = len(gc.get_objects())
    loader = SharedHeapLoader(_FreezeCount(), batch_size=None, num_workers=1, multiprocessing_context="fork")
    counts = list(loader)
    assert min(counts) >= before * 0.5  # the worker's view: (about) all the parent's objects frozen
    assert gc.get_freeze_count() == 0  # the parent's: none
    assert list(SharedHeapLoader(_FreezeCount(), batch_size=None, num_workers=0)) == [0, 0, 0, 0]
