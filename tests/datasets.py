"""Tiny datasets in the real on-disk formats, written by the tests themselves."""

from __future__ import annotations

import pickle
from pathlib import Path

import lightning.pytorch as pl
import numpy as np

from datamodules.shapes import generate_classification


def write_cifar(root: Path, dataset: str = "cifar10", per_batch: int = 8, test: int = 12, seed: int = 0) -> Path:
    """CIFAR's python batches exactly as distributed: pickled dicts with bytes keys and uint8 rows."""
    rng = np.random.default_rng(seed)
    classes = 10 if dataset == "cifar10" else 100
    label_key = b"labels" if dataset == "cifar10" else b"fine_labels"

    def batch(n: int, name: str) -> dict:
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = [int(x) for x in rng.integers(0, classes, n)]
        out = {b"batch_label": name.encode(), label_key: labels, b"data": data, b"filenames": [b"x.png"] * n}
        if dataset == "cifar100":
            out[b"coarse_labels"] = [x // 5 for x in labels]
        return out

    if dataset == "cifar10":
        folder = root / "cifar-10-batches-py"
        files = {f"data_batch_{i}": batch(per_batch, f"training batch {i} of 5") for i in range(1, 6)}
        files["test_batch"] = batch(test, "testing batch 1 of 1")
        files["batches.meta"] = {b"label_names": [f"class{i}".encode() for i in range(10)], b"num_vis": 3072}
    else:
        folder = root / "cifar-100-python"
        files = {"train": batch(per_batch * 5, "training batch 1 of 1"), "test": batch(test, "testing batch 1 of 1")}
        files["meta"] = {
            b"fine_label_names": [f"fine{i}".encode() for i in range(100)],
            b"coarse_label_names": [f"coarse{i}".encode() for i in range(20)],
        }
    folder.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        with open(folder / name, "wb") as f:
            pickle.dump(content, f, protocol=2)
    return root


def write_imagefolder(root: Path, per_class: int = 4, val_per_class: int = 2, size: int = 32, seed: int = 0) -> Path:
    """A 5-class ImageFolder tree of real JPEG files (the shapes generator)."""
    return generate_classification(root, train_per_class=per_class, val_per_class=val_per_class, size=size, seed=seed)


#: Non-contiguous COCO category ids, as in COCO itself (which skips 12, 26, 29, ...).
CATEGORY_IDS = {"circle": 3, "square": 7, "triangle": 12, "star": 40, "ring": 90}


def edit_coco(coco: Path, split: str, change) -> Path:
    """``change(data)`` applied to ``<coco>/annotations/instances_<split>.json`` in place; the file's path."""
    import json

    path = coco / "annotations" / f"instances_{split}.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))
    return path


def write_coco(
    root: Path, train_images: int = 8, val_images: int = 6, size: tuple[int, int] = (96, 96), seed: int = 0, **kwargs
) -> Path:
    """COCO 2017 layout with the awkward cases real COCO has.

    Non-contiguous category ids; in both splits an extra image with no objects, a crowd annotation
    (RLE, ``iscrowd=1``) and a degenerate box (0.5 pixels wide) added to the first image.
    """
    import json

    from PIL import Image

    from datamodules.shapes import generate_coco

    generate_coco(root, train_images=train_images, val_images=val_images, size=size, seed=seed,
                  category_ids=CATEGORY_IDS, **kwargs)  # fmt: skip
    for split in ("train2017", "val2017"):
        path = root / "annotations" / f"instances_{split}.json"
        data = json.loads(path.read_text())
        width, height = size
        empty_id = max(i["id"] for i in data["images"]) + 1
        Image.new("RGB", size, (90, 120, 150)).save(root / split / f"{empty_id:012d}.jpg")
        data["images"].append({"id": empty_id, "file_name": f"{empty_id:012d}.jpg", "width": width, "height": height})
        next_id = max(a["id"] for a in data["annotations"]) + 1
        first = data["images"][0]["id"]
        crowd = np.zeros((height, width), dtype=np.uint8)
        crowd[:10, :20] = 1
        from pycocotools import mask as mask_utils

        rle = mask_utils.encode(np.asfortranarray(crowd))  # compressed RLE, as COCO stores crowds
        data["annotations"].append({
            "id": next_id, "image_id": first, "category_id": CATEGORY_IDS["square"], "iscrowd": 1,
            "segmentation": {"size": [height, width], "counts": rle["counts"].decode()},
            "area": float(crowd.sum()), "bbox": [0.0, 0.0, 20.0, 10.0],
        })  # fmt: skip
        data["annotations"].append({
            "id": next_id + 1, "image_id": first, "category_id": CATEGORY_IDS["star"], "iscrowd": 0,
            "segmentation": [[40.0, 40.0, 40.5, 40.0, 40.5, 60.0, 40.0, 60.0]],
            "area": 10.0, "bbox": [40.0, 40.0, 0.5, 20.0],
        })  # fmt: skip
        path.write_text(json.dumps(data))
    return root


def classify_checkpoint(tmp_path: Path, backbone: str = "resnet18") -> tuple[str, dict]:
    """Train ``backbone`` for one epoch with ``tasks.classify``; return its checkpoint and backbone state."""
    from tasks import classify

    data = write_imagefolder(tmp_path / "cls", per_class=2, val_per_class=1, size=32)
    cli = classify.main([
        "fit", "--data", "datamodules.ImageFolderDataModule", "--data.root", str(data), "--data.image_size", "32",
        "--data.eval_resize", "32", "--data.batch_size", "5", "--data.num_workers", "0", "--model.backbone", backbone,
        "--trainer.max_epochs", "1", "--trainer.default_root_dir", str(tmp_path / "runs"), "--trainer.logger", "false",
        "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false",
    ])  # fmt: skip
    return cli.trainer.checkpoint_callback.last_model_path, cli.model.backbone.state_dict()


#: Trainer options every in-process test run uses: CPU, no progress bar or model summary in the logs.
CPU = [
    "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"
]  # fmt: skip


class StepRecorder(pl.Callback):
    """Records each optimizer step's learning rate; optionally signals this process after a step.

    Args:
        path: JSON file the ``[global_step, lr]`` pairs are appended to.
        sigterm_at: send ``signal_name`` after this global step (as a cluster does before it kills a job).
        signal_name: ``SIGTERM`` or ``SIGUSR1`` (SLURM's warning before the time limit).
        stop: also ask the trainer to stop after that step (the job ends there).
    """

    def __init__(self, path: str, sigterm_at: int = -1, signal_name: str = "SIGTERM", stop: bool = False) -> None:
        self.path = Path(path)
        self.sigterm_at = sigterm_at
        self.signal_name = signal_name
        self.stop = stop

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        import json
        import os
        import signal

        rows = json.loads(self.path.read_text()) if self.path.exists() else []
        rows.append([trainer.global_step, trainer.optimizers[0].param_groups[0]["lr"]])
        self.path.write_text(json.dumps(rows))
        if trainer.global_step == self.sigterm_at:
            os.kill(os.getpid(), getattr(signal, self.signal_name))
            trainer.should_stop = trainer.should_stop or self.stop


class SigtermInValidation(pl.Callback):
    """Sends this process SIGTERM after the first batch of the first validation of ``fit`` after its sanity
    check (Lightning stops the validation at its next batch: give it two or more)."""

    def __init__(self) -> None:
        self.sent = False

    def on_validation_batch_end(self, trainer, *args) -> None:
        import os
        import signal

        if not trainer.sanity_checking and not self.sent:
            self.sent = True
            os.kill(os.getpid(), signal.SIGTERM)


class Pace(pl.Callback):
    """Sleeps after every training step of a SLURM job's first run (restart 0), so a time limit or a
    ``scontrol requeue`` finds it training; later runs of the job go at full speed. Only wall-clock time
    changes, never what is computed."""

    def __init__(self, seconds: float = 1.0, path: str | None = None) -> None:
        self.seconds = seconds
        self.path = Path(path) if path else None  # rank 0 writes the global step there after every step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        import os
        import time

        if self.path is not None and trainer.is_global_zero:
            self.path.write_text(str(trainer.global_step))
        if os.environ.get("SLURM_RESTART_COUNT", "0") == "0":
            time.sleep(self.seconds)


class WeightRecorder(pl.Callback):
    """Keeps a copy of the classifier's weights (``backbone.fc.weight``) after every optimizer step."""

    def __init__(self) -> None:
        self.weights: list = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.weights.append(pl_module.backbone.fc.weight.detach().clone())


def logged_run(run_dir: Path, timeout: float = 30.0) -> dict:
    """The W&B offline run under ``run_dir``, read once the W&B service has written all of it to disk.

    ``run.finish()`` returns when the W&B service has the records; the service writes the ``.wandb``
    file from its own process, a moment later under load (a read in between saw 9 of a run's 10 epochs):
    wait for the run's closing ``exit`` record, and after ``timeout`` return what is there.
    """
    import time

    from google.protobuf.message import DecodeError
    from wandb_offline import read_offline_run

    deadline = time.monotonic() + timeout
    while True:
        try:
            run = read_offline_run(run_dir)
            if run["exited"] or time.monotonic() > deadline:
                return run
        except (FileNotFoundError, ValueError, DecodeError):  # not there yet, or its last record half written
            if time.monotonic() > deadline:
                raise
        time.sleep(0.5)


class MetricsDump(pl.Callback):
    """Writes the trainer's metrics to a JSON file after validation (on global rank 0)."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero and not trainer.sanity_checking:
            import json

            self.path.write_text(json.dumps({k: float(v) for k, v in trainer.callback_metrics.items()}))


class NormKinds(pl.Callback):
    """Writes how many normalization layers of each type the model trains with (on global rank 0)."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def on_train_start(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            import json
            from collections import Counter

            kinds = Counter(type(m).__name__ for m in pl_module.modules() if "Norm" in type(m).__name__)
            self.path.write_text(json.dumps(kinds))


def write_ilsvrc_det(root: Path, trainval: int = 12, test: int = 4, size: int = 64) -> Path:
    """The shapes in ILSVRC DET's layout (0-based boxes, synset ids as names, per-class train files with a
    negative image, ``devkit/data/map_det.txt``), converted from their VOC layout; returns the ILSVRC folder."""
    import re
    import shutil

    from datamodules.shapes_xml import SHAPE_SYNSETS, generate_voc

    voc = generate_voc(root / "voc", trainval=trainval, test=test, size=size) / "VOC2007"
    ilsvrc = root / "ILSVRC"
    names = sorted(p.stem for p in (voc / "JPEGImages").glob("*.jpg"))
    train = set((voc / "ImageSets" / "Main" / "trainval.txt").read_text().split())
    for name in names:
        subset = "train" if name in train else "val"
        for kind in ("Data", "Annotations"):
            (ilsvrc / kind / "DET" / subset).mkdir(parents=True, exist_ok=True)
        shutil.copy(voc / "JPEGImages" / f"{name}.jpg", ilsvrc / "Data" / "DET" / subset / f"{name}.JPEG")
        text = (voc / "Annotations" / f"{name}.xml").read_text()
        for shape, wnid in SHAPE_SYNSETS.items():
            text = text.replace(f"<name>{shape}</name>", f"<name>{wnid}</name>")
        text = re.sub(r"<(xmin|ymin|xmax|ymax)>(\d+)</", lambda m: f"<{m[1]}>{int(m[2]) - 1}</", text)
        (ilsvrc / "Annotations" / "DET" / subset / f"{name}.xml").write_text(text)
    from PIL import Image

    Image.new("RGB", (size, size), (80, 90, 100)).save(ilsvrc / "Data" / "DET" / "train" / "negative.JPEG")
    (ilsvrc / "ImageSets" / "DET").mkdir(parents=True)
    listed = [n for n in names if n in train]
    (ilsvrc / "ImageSets" / "DET" / "train_1.txt").write_text("".join(f"{n} 1\n" for n in listed) + "negative -1\n")
    (ilsvrc / "ImageSets" / "DET" / "val.txt").write_text(
        "".join(f"{n} {k}\n" for k, n in enumerate(names) if n not in train)
    )
    (root / "devkit" / "data").mkdir(parents=True)
    (root / "devkit" / "data" / "map_det.txt").write_text(
        "".join(f"{wnid} {k} {shape}\n" for k, (shape, wnid) in enumerate(SHAPE_SYNSETS.items(), start=1))
    )
    return ilsvrc


def pycocotools_semantic_mask(coco, image_id: int, classes: dict[int, int], rules: str = "default") -> np.ndarray:
    """The class-index mask as the datamodule made it before its flat arrays: straight from a
    ``pycocotools.coco.COCO`` index, each region by ``annToMask`` (degenerate polygons left out), the
    same overlap and crowd rules. The reference ``datamodules.masks.semantic_mask`` must equal."""
    from datamodules.coco_format import is_polygon

    info = coco.imgs[image_id]
    class_map = np.zeros((info["height"], info["width"]), dtype=np.uint8)
    ignore = np.zeros(class_map.shape, dtype=bool)
    coverage = np.zeros(class_map.shape, dtype=np.uint16)
    for ann in coco.imgToAnns.get(image_id, []):
        cls = classes.get(ann["category_id"])
        if cls is None:
            continue
        if isinstance(ann.get("segmentation"), list):
            ann = {**ann, "segmentation": [p for p in ann["segmentation"] if is_polygon(p)]}
        if ann.get("segmentation") == []:
            region = np.zeros(class_map.shape, dtype=bool)
        else:
            region = coco.annToMask(ann).astype(bool)
        if rules == "torchvision":
            coverage += region
            np.maximum(class_map, np.where(region, cls, 0).astype(np.uint8), out=class_map)
        elif ann.get("iscrowd", 0):
            ignore |= region
        else:
            ignore |= region & (class_map > 0) & (class_map != cls)
            class_map[region & (class_map == 0)] = cls
    class_map[coverage > 1 if rules == "torchvision" else ignore] = 255
    return class_map


# -- PASCAL VOC XML ------------------------------------------------------------------------------------
def voc_xml(objects: str, width: int = 100, height: int = 80) -> str:
    return (f"<annotation><filename>x.jpg</filename><size><width>{width}</width><height>{height}</height>"
            f"<depth>3</depth></size>{objects}</annotation>")  # fmt: skip


def voc_object(name: str, box: tuple | None, difficult: int = 0, truncated: int = 0) -> str:
    bnd = "" if box is None else "<bndbox>" + "".join(
        f"<{k}>{v}</{k}>" for k, v in zip(("xmin", "ymin", "xmax", "ymax"), box)
    ) + "</bndbox>"  # fmt: skip
    return (
        f"<object><name>{name}</name><difficult>{difficult}</difficult><truncated>{truncated}</truncated>{bnd}</object>"
    )


def write_voc_tree(root: Path, annotations: dict[str, str], split: str = "trainval") -> Path:
    from PIL import Image

    folder = root / "VOC2007"
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    for name, text in annotations.items():
        Image.new("RGB", (100, 80)).save(folder / "JPEGImages" / f"{name}.jpg")
        if text is not None:
            (folder / "Annotations" / f"{name}.xml").write_text(text)
    (folder / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(annotations) + "\n")
    return root
