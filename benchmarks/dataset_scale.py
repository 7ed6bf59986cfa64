"""Setup time and memory of the datasets at a fraction of COCO train2017 / ImageNet's size, beside the
reference loaders on the same files.

    python -m benchmarks.dataset_scale --fraction 0.125            # 1/8 of train2017 and of ImageNet
    python -m benchmarks.dataset_scale --fraction 0.01 --skip imagefolder

Written under ``--root`` (a temporary folder by default): a COCO-format annotation file with train2017's
images and annotations per image (118,287 images, 860,001 annotations at fraction 1; 20-point polygons,
COCO's 80 non-contiguous category ids, 1 % crowds as RLE) with one small real JPEG per image, a 2-image
validation file; and an ImageFolder tree of 1000 classes with ImageNet's 1,281,167 files at fraction 1.

Each measurement runs in a fresh process (``fork``), one JSON line each:

- ``coco_setup``: ``COCODetectionDataModule.setup("fit")`` (read, validate, build the flat records) against
  ``pycocotools.coco.COCO`` loading the same two files: seconds, the ratio (``ratio_again``: a second setup,
  as a requeued job's, which finds the files checked before), and the memory added at the
  peak over the process's size before (modules imported first; peak RSS by ``getrusage``, a lower bound
  of the added memory when the process was larger before it forked).
- ``worker_memory`` (detection and segmentation): a loader worker's private memory (``/proc/self/smaps_rollup``
  ``Private_*``) grows while it reads every sample of the training set once; the same for a reference
  dataset holding only a numpy array of the file paths and reading the same images. ``allowed`` is the
  reference's growth plus 10 % of what the dataset added to the parent process. Each is measured in
  ``--passes`` fresh processes (one builds the dataset and forks the worker): the median and each value --
  the growth varies by a few MiB from one process to the next (where the parent's freed memory lies) and
  hardly within one. The first segmentation pass rasterizes and caches the masks, the others read them.
- ``worker_memory_full_pass`` (detection): one epoch of the training loader a run builds
  (``train_dataloader()``: its aspect-ratio sampler, batches, collate, ``--full_pass_workers`` workers, 2 by
  default) against the same loader over a paths-only dataset doing the same reading and transforms; each
  worker's private memory read from the main process when the first and the last batch arrive (the growth
  in between, per worker and their mean; ``excess_of_dataset``: ours less the reference's, as a share of what
  the records added to the parent).
  Segmentation also beside a reference doing its per-sample work from paths alone (``same_work_*``: image
  and cached mask paths in numpy arrays, the same transforms), which tells the records' cost from the
  work's (resizing, cropping and PNG decoding warm up the worker's allocator).
- ``check``: ``python -m datamodules.check`` on the COCO tree with a thread per core (``--workers``) against one thread
  (``speedup``), writing to a pipe as in a batch job: seconds to its first line, to the check's start (the
  imports done, the annotation file being read), from there to its first count, and in all; and with
  ``--no_decode``.
- ``imagefolder_setup``: ``ImageFolderDataModule.setup("fit")`` against ``torchvision.datasets.ImageFolder``
  on the same tree.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import tempfile
import time
from pathlib import Path

import numpy as np

TRAIN2017 = {"images": 118_287, "annotations": 860_001}
IMAGENET_FILES = 1_281_167
#: COCO's 80 category ids
CATEGORY_IDS = [i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]
SIZE = (64, 48)  # width, height of every image file (--image_size)


def _jpeg() -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (SIZE[1], SIZE[0], 3), dtype=np.uint8)).save(
        buffer, format="JPEG", quality=85
    )
    return buffer.getvalue()


def write_coco(root: Path, fraction: float, seed: int = 0) -> Path:
    """train2017-sized (times ``fraction``) annotation file, its image files, and a 2-image val split."""
    rng = np.random.default_rng(seed)
    jpeg = _jpeg()
    width, height = SIZE
    for split, count in (("train2017", round(TRAIN2017["images"] * fraction)), ("val2017", 2)):
        folder = root / split
        folder.mkdir(parents=True, exist_ok=True)
        images, annotations = [], []
        per_image = TRAIN2017["annotations"] / TRAIN2017["images"]
        for k in range(count):
            image_id = 9 + 7 * k  # sparse ids, as COCO's
            name = f"{image_id:012d}.jpg"
            (folder / name).write_bytes(jpeg)
            images.append({"id": image_id, "file_name": name, "width": width, "height": height})
            for _ in range(rng.poisson(per_image)):
                cx, cy = rng.uniform(8, width - 8), rng.uniform(8, height - 8)
                angles = np.sort(rng.uniform(0, 2 * np.pi, 10))
                radius = rng.uniform(3, 8, 10)
                polygon = np.stack([cx + radius * np.cos(angles), cy + radius * np.sin(angles)], 1)
                polygon = np.clip(polygon, 0, [width, height]).round(2)
                x1, y1 = polygon.min(0)
                x2, y2 = polygon.max(0)
                crowd = rng.random() < 0.01
                if crowd:
                    mask = np.zeros((height, width), dtype=np.uint8)
                    mask[int(y1) : int(y2) + 1, int(x1) : int(x2) + 1] = 1
                    flat = mask.flatten(order="F")
                    counts = np.diff(np.r_[0, np.flatnonzero(np.diff(flat)) + 1, flat.size]).tolist()
                    segmentation = {"size": [height, width], "counts": [0, *counts] if flat[0] else counts}
                else:
                    segmentation = [polygon.flatten().tolist()]
                annotations.append({
                    "id": len(annotations) + 1, "image_id": image_id, "category_id": int(rng.choice(CATEGORY_IDS)),
                    "iscrowd": int(crowd), "area": float((x2 - x1) * (y2 - y1)),
                    "bbox": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)], "segmentation": segmentation,
                })  # fmt: skip
        (root / "annotations").mkdir(exist_ok=True)
        data = {"images": images, "annotations": annotations,
                "categories": [{"id": c, "name": f"c{c}"} for c in CATEGORY_IDS]}  # fmt: skip
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))
    return root


def write_imagefolder(root: Path, fraction: float, classes: int = 1000) -> Path:
    """ImageNet's number of training files (times ``fraction``) in ``classes`` folders; tiny files (the
    setup reads names, not pixels)."""
    per_class = max(1, round(IMAGENET_FILES * fraction / classes))
    for split, count in (("train", per_class), ("val", 1)):
        for c in range(classes):
            folder = root / split / f"n{c:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            for k in range(count):
                with open(folder / f"n{c:08d}_{k}.JPEG", "wb") as f:
                    f.write(b"\xff\xd8")
    return root


def _private_kib(pid: int | str = "self") -> int:
    """Private memory (``Private_Clean`` + ``Private_Dirty``) of this process or of process ``pid``, in KiB."""
    total = 0
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith(("Private_Clean", "Private_Dirty")):
                total += int(line.split()[1])
    return total


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _measured(step) -> dict:
    """Seconds of ``step()`` and the memory it added at its peak (modules are imported before)."""
    before = _rss_mib()
    start = time.perf_counter()
    step()
    return {"s": time.perf_counter() - start, "peak_added_mib": _peak_mib() - before}


def _in_child(function, *args) -> dict:
    """``function(*args)`` in a fresh forked process (its own peak RSS); its dict comes back."""
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    process = ctx.Process(target=lambda: queue.put(function(*args)))
    process.start()
    out = queue.get()
    process.join()
    return out


def _setup_ours(root: str) -> dict:
    from datamodules import COCODetectionDataModule

    return _measured(lambda: COCODetectionDataModule(root, num_workers=0).setup("fit"))


def _setup_pycocotools(root: str) -> dict:
    import contextlib
    import io

    from pycocotools.coco import COCO

    def load() -> None:
        with contextlib.redirect_stdout(io.StringIO()):
            for split in ("train2017", "val2017"):
                COCO(str(Path(root) / "annotations" / f"instances_{split}.json"))

    return _measured(load)


class PathsDataset:
    """The reference: file paths in one numpy array, images read and decoded as ours are."""

    def __init__(self, folder: Path) -> None:
        self.paths = np.array(sorted(str(p) for p in folder.iterdir()))

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        from datamodules.images import read_image

        return read_image(str(self.paths[index]))


class _Probe:
    """Wraps a dataset: the worker's private memory before its first sample and after its last."""

    def __init__(self, dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        before = _private_kib() if index == 0 else None
        self.dataset[index]
        return before if index == 0 else (_private_kib() if index == len(self) - 1 else None)


class SameWorkDataset:
    """The segmentation reference doing the same work from paths alone: each image and its cached mask
    (paths in numpy arrays, the masks written by a first pass of ``dataset``), the same transforms."""

    def __init__(self, dataset) -> None:
        rows = dataset.rows.tolist()
        for row in rows:
            dataset.mask(row)  # cached now, read below
        self.paths = np.array([str(dataset.images_dir / dataset.regions.name(row)) for row in rows])
        self.masks = np.array([str(dataset.mask.folder / f"{int(dataset.regions.ids[row])}.png") for row in rows])
        self.transform = dataset.transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        from torchvision import tv_tensors
        from torchvision.io import ImageReadMode, decode_png, read_file

        from datamodules.images import read_image

        mask = decode_png(read_file(str(self.masks[index])), mode=ImageReadMode.GRAY)
        return self.transform(tv_tensors.Image(read_image(str(self.paths[index]))), tv_tensors.Mask(mask))


def _worker_growth(build) -> dict:
    """Build a dataset (its cost to the parent), then a fork worker reads every sample once."""

    import datamodules

    datamodules.load_all()  # imports are not the dataset's memory
    from datamodules.images import read_image  # noqa: F401

    parent = _private_kib()
    dataset = build()
    added = _private_kib() - parent
    dataset[0]  # lazy imports of the reading path happen here, not in the measured worker
    from datamodules.loading import SharedHeapLoader  # the training loaders' class, for both datasets

    loader = SharedHeapLoader(_Probe(dataset), batch_size=None, num_workers=1, multiprocessing_context="fork")
    marks = [m for m in loader if m is not None]
    return {"worker_growth_mib": (marks[-1] - marks[0]) / 1024, "dataset_mib": added / 1024, "samples": len(dataset)}


def _median_growth(build, passes: int) -> dict:
    """:func:`_worker_growth` in ``passes`` fresh processes: the median growth, each one, the dataset's size."""
    runs = [_in_child(_worker_growth, build) for _ in range(passes)]
    growth = [run["worker_growth_mib"] for run in runs]
    return {**runs[0], "worker_growth_mib": float(np.median(growth)), "passes_mib": growth,
            "dataset_mib": float(np.median([run["dataset_mib"] for run in runs]))}  # fmt: skip


class PathsDetectionDataset(PathsDataset):
    """The full pass's reference: paths in a numpy array, each image through the same training transforms
    with a fixed one-box target, returned as ours returns a sample."""

    def __init__(self, folder: Path, transform) -> None:
        super().__init__(folder)
        self.transform = transform

    def __getitem__(self, index: int) -> dict:
        import torch
        from torchvision import tv_tensors

        image = tv_tensors.Image(super().__getitem__(index))
        box = tv_tensors.BoundingBoxes(torch.tensor([[1.0, 1.0, 9.0, 9.0]]), format="XYXY",
                                       canvas_size=tuple(image.shape[-2:]))  # fmt: skip
        image, target = self.transform(image, {"boxes": box, "labels": torch.tensor([1])})
        return {"image": image.as_subclass(torch.Tensor), "image_id": index, "path": str(self.paths[index]),
                "target": {"boxes": target["boxes"].as_subclass(torch.Tensor), "labels": target["labels"]}}  # fmt: skip


def _full_pass(root: str, ours: bool, workers: int) -> dict:
    """One epoch of the training loader a run uses -- ``COCODetectionDataModule.train_dataloader()``: its
    sampler, batches and collate, ``workers`` forked workers -- or the same loader over
    :class:`PathsDetectionDataset`. Each worker's private memory is read from this process
    (``/proc/<worker>/smaps_rollup``) when the first batch arrives and when the last one does."""
    import datamodules
    from datamodules import COCODetectionDataModule
    from datamodules.detection import detection_collate
    from datamodules.loading import make_loader

    datamodules.load_all()
    dm = COCODetectionDataModule(root, num_workers=workers, persistent_workers=False)
    parent = _private_kib()
    if ours:
        dm.setup("fit")
        dataset = dm.datasets["train"]
    else:
        dataset = PathsDetectionDataset(Path(root) / "train2017", dm._transform(True))
    added = _private_kib() - parent
    dataset[0]  # lazy imports of the reading path happen here, not in the measured workers
    loader = dm.train_dataloader() if ours else make_loader(
        dataset, batch_size=dm.batch_size, num_workers=workers, train=True, collate_fn=detection_collate,
        persistent_workers=False,
    )  # fmt: skip
    iterator, first, last = iter(loader), [], []
    for k, _ in enumerate(iterator):
        if k == 0:
            first = [_private_kib(w.pid) for w in iterator._workers]
        if k == len(loader) - 1:
            last = [_private_kib(w.pid) for w in iterator._workers]
    return {"growth_mib": [(b - a) / 1024 for a, b in zip(first, last)], "last_private_mib": [b / 1024 for b in last],
            "dataset_mib": added / 1024, "batches": len(loader), "batch_size": dm.batch_size}  # fmt: skip


def _dataset(root: str, kind: str, cache: str):
    from datamodules import COCODetectionDataModule, COCOSegmentationDataModule

    if kind == "detection":
        dm = COCODetectionDataModule(root, num_workers=0)
    else:
        dm = COCOSegmentationDataModule(root, categories="all", num_workers=0, min_area=0, cache_dir=cache,
                                        base_size=48, crop_size=48)  # fmt: skip
    dm.setup("fit")
    return dm.datasets["train"]


def _setup_imagefolder(root: str, ours: bool) -> dict:
    if ours:
        from datamodules import ImageFolderDataModule

        return _measured(lambda: ImageFolderDataModule(root, num_workers=0).setup("fit"))
    from torchvision.datasets import ImageFolder

    return _measured(lambda: [ImageFolder(str(Path(root) / split)) for split in ("train", "val")])


def _check_run(root: str, workers: int, *extra: str) -> dict:
    """``python -m datamodules.check`` on the COCO tree as a user runs it (output to a pipe, not a terminal):
    when its first line, the check's start (after the imports: reading the annotation file) and its first
    count came, and when it ended."""
    import subprocess
    import sys

    command = [sys.executable, "-m", "datamodules.check", "--data", "COCODetectionDataModule", "--data.root", root,
               "--workers", str(workers), *extra]  # fmt: skip
    start = time.monotonic()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               cwd=Path(__file__).resolve().parents[1])  # fmt: skip
    lines = [(time.monotonic() - start, line.rstrip("\n")) for line in process.stdout]
    process.wait()
    started = next(t for t, line in lines if line.startswith("reading "))
    counted = next(t for t, line in lines if t >= started and (" to check" in line or "/s," in line))
    return {"first_line_s": lines[0][0], "check_started_s": started, "progress_after_start_s": counted - started,
            "total_s": lines[-1][0], "exit": process.returncode}  # fmt: skip


def run(args: argparse.Namespace) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.root or tmp)
        if "coco" not in args.skip:
            coco = str(write_coco(root / "coco", args.fraction))
            os.environ["XDG_CACHE_HOME"] = str(root / "cache")  # cold: no validation mark yet
            ours, reference = _in_child(_setup_ours, coco), _in_child(_setup_pycocotools, coco)
            again = _in_child(_setup_ours, coco)  # a requeued job: the files were checked before
            rows.append({"benchmark": "dataset_scale", "measure": "coco_setup", "fraction": args.fraction,
                         "ours_s": ours["s"], "ours_again_s": again["s"], "pycocotools_s": reference["s"],
                         "ratio": ours["s"] / reference["s"], "ratio_again": again["s"] / reference["s"],
                         "ours_added_mib": ours["peak_added_mib"],
                         "pycocotools_added_mib": reference["peak_added_mib"]})  # fmt: skip
            if "worker_memory" not in args.skip:
                paths = _median_growth(lambda: PathsDataset(Path(coco) / "train2017"), args.passes)
            masks = str(root / "masks")
            for kind in ("detection", "segmentation") if "worker_memory" not in args.skip else ():
                got = _median_growth(lambda kind=kind: _dataset(coco, kind, masks), args.passes)
                allowed = paths["worker_growth_mib"] + 0.1 * got["dataset_mib"]
                row = {"benchmark": "dataset_scale", "measure": "worker_memory", "dataset": kind,
                       "fraction": args.fraction, "samples": got["samples"], "passes": args.passes,
                       "ours_worker_growth_mib": got["worker_growth_mib"], "ours_passes_mib": got["passes_mib"],
                       "paths_worker_growth_mib": paths["worker_growth_mib"], "paths_passes_mib": paths["passes_mib"],
                       "dataset_mib": got["dataset_mib"], "allowed_mib": allowed,
                       "within": got["worker_growth_mib"] <= allowed}  # fmt: skip
                if kind == "segmentation":
                    work = _median_growth(lambda: SameWorkDataset(_dataset(coco, "seg", masks)), args.passes)
                    bound = work["worker_growth_mib"] + 0.1 * got["dataset_mib"]
                    row.update({"same_work_worker_growth_mib": work["worker_growth_mib"],
                                "same_work_passes_mib": work["passes_mib"], "same_work_allowed_mib": bound,
                                "within_same_work": got["worker_growth_mib"] <= bound})  # fmt: skip
                rows.append(row)
            workers = args.full_pass_workers
            ours, paths = (_in_child(_full_pass, coco, flag, workers) for flag in (True, False))
            growth, reference = float(np.mean(ours["growth_mib"])), float(np.mean(paths["growth_mib"]))
            rows.append({"benchmark": "dataset_scale", "measure": "worker_memory_full_pass", "dataset": "detection",
                         "fraction": args.fraction, "image_size": list(SIZE), "workers": workers,
                         "batch_size": ours["batch_size"], "batches": ours["batches"],
                         "ours_worker_growth_mib": growth, "ours_workers_mib": ours["growth_mib"],
                         "ours_last_private_mib": ours["last_private_mib"],
                         "paths_worker_growth_mib": reference, "paths_workers_mib": paths["growth_mib"],
                         "paths_last_private_mib": paths["last_private_mib"], "dataset_mib": ours["dataset_mib"],
                         "excess_of_dataset": (growth - reference) / ours["dataset_mib"],
                         "allowed_mib": reference + 0.1 * ours["dataset_mib"],
                         "within": growth <= reference + 0.1 * ours["dataset_mib"]})  # fmt: skip
        if "check" not in args.skip:
            coco = str(root / "coco") if (root / "coco").is_dir() else str(write_coco(root / "coco", args.fraction))
            cores = len(os.sched_getaffinity(0))
            one, pool = _check_run(coco, 1), _check_run(coco, cores)
            fast = _check_run(coco, cores, "--no_decode")
            rows.append({"benchmark": "dataset_scale", "measure": "check", "fraction": args.fraction,
                         "image_size": list(SIZE), "workers": cores, "first_line_s": pool["first_line_s"],
                         "check_started_s": pool["check_started_s"],
                         "progress_after_start_s": pool["progress_after_start_s"],
                         "total_s": pool["total_s"], "one_process_total_s": one["total_s"],
                         "speedup": one["total_s"] / pool["total_s"], "no_decode_total_s": fast["total_s"],
                         "exit": pool["exit"]})  # fmt: skip
        if "imagefolder" not in args.skip:
            folder = str(write_imagefolder(root / "imagefolder", args.fraction, args.classes))
            ours = _in_child(_setup_imagefolder, folder, True)
            reference = _in_child(_setup_imagefolder, folder, False)
            rows.append({"benchmark": "dataset_scale", "measure": "imagefolder_setup", "fraction": args.fraction,
                         "ours_s": ours["s"], "torchvision_s": reference["s"], "ratio": ours["s"] / reference["s"],
                         "ours_added_mib": ours["peak_added_mib"],
                         "torchvision_added_mib": reference["peak_added_mib"]})  # fmt: skip
    for row in rows:
        print(json.dumps(row))
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    global SIZE
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fraction", type=float, default=0.125, help="of train2017 and ImageNet (1 = full)")
    parser.add_argument("--root", default=None, help="where to write the data (default: a temporary folder)")
    parser.add_argument("--classes", type=int, default=1000, help="ImageFolder classes")
    parser.add_argument("--passes", type=int, default=3, help="worker_memory: processes measured (median)")
    parser.add_argument("--full_pass_workers", type=int, default=2, help="worker_memory_full_pass: loader workers")
    parser.add_argument(
        "--skip",
        nargs="*",
        default=[],
        choices=["coco", "worker_memory", "check", "imagefolder"],
        help="worker_memory: the median-of-processes rows (the full pass is measured with coco)",
    )
    parser.add_argument(
        "--image_size",
        nargs=2,
        type=int,
        default=list(SIZE),
        metavar=("W", "H"),
        help="of the COCO image files (64 48: setup and memory; COCO's 640 480: the check's decoding)",
    )
    args = parser.parse_args(argv)
    SIZE = tuple(args.image_size)
    return run(args)


if __name__ == "__main__":
    main()
