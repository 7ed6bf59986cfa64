"""The benchmarks run (tiny sizes, CPU: correct, not timed) and the GPU decoding path computes the CPU path."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from datasets import write_imagefolder

from benchmarks import coco_eval, dataloader, fit_loop, train_step
from datamodules import ImageFolderDataModule
from datamodules.folders import find_classes, list_images, list_samples
from datamodules.gpu_decode import GPUAugment, collate_raw, crop_batch, decode_batch, unpack_encoded
from datamodules.imagefolder import ImageFolderDataset
from datamodules.images import CorruptImageError
from datamodules.loading import EpochSeeded
from datamodules.transforms import train_transform


@pytest.mark.parametrize(
    ("task", "model", "size"), [("classify", "resnet50", 32), ("detect", "resnet18", 64), ("segment", "resnet50", 32)]
)
def test_train_step_benchmark_reports_ratios(task, model, size, capsys):
    (row,) = train_step.main(["--task", task, "--models", model, "--device", "cpu", "--batch", "2",
                              "--size", str(size), "--steps", "1", "--warmup", "1"])  # fmt: skip
    assert row["speed_ratio"] > 0 and row["ours_img_per_s"] > 0 and row["torchvision_img_per_s"] > 0
    # the same network keeps exactly as many activations for backward as torchvision's (in-place ReLU, add)
    assert row["memory_ratio"] <= 1.0
    assert '"benchmark": "train_step"' in capsys.readouterr().out


def test_fit_loop_benchmark_reports_a_ratio(capsys):
    (row,) = fit_loop.main(["--models", "resnet18", "--device", "cpu", "--batch", "2", "--size", "32",
                            "--steps", "2", "--warmup", "1", "--repeats", "1", "--no-progress-bar"])  # fmt: skip
    assert row["ours_steps"] == row["torchvision_steps"] == 2  # both loops timed the steps asked for
    assert row["speed_ratio"] > 0 and row["ours_img_per_s"] > 0 and row["torchvision_img_per_s"] > 0
    assert '"benchmark": "fit_loop"' in capsys.readouterr().out


def test_fit_loop_benchmark_compares_the_same_training():
    """From the same weights, Lightning's loop over ClassificationTask and the reference loop end at the same
    weights: same batches, normalization, loss, optimizer and weight decay -- only the loop differs."""
    import torchvision

    torch.manual_seed(0)
    init = torchvision.models.resnet18(num_classes=1000).state_dict()
    settings = dict(device=torch.device("cpu"), batch=4, size=32, steps=2, warmup=1, init=init)
    reference = fit_loop.reference_loop("resnet18", **settings)["model"].state_dict()
    ours = fit_loop.task_loop("resnet18", progress_bar=False, **settings)["model"].state_dict()
    assert reference.keys() == ours.keys()
    moved = max((reference[k].float() - init[k].float()).abs().max().item() for k in init)
    assert moved > 1e-3  # three SGD steps changed the weights ...
    for key, value in reference.items():  # ... and changed them alike
        torch.testing.assert_close(ours[key], value, rtol=1e-6, atol=1e-7, msg=key)


def test_dataloader_benchmark(tmp_path):
    (row,) = dataloader.main(["--root", str(tmp_path), "--images", "16", "--batch", "4", "--workers", "0"])
    assert row["images"] == 16 and row["ratio"] > 0 and 60 < row["mean_file_kb"] < 200


def test_coco_eval_benchmark_backends_agree():
    row = coco_eval.main(["--images", "40", "--detections", "800"])
    assert row["detections"] == 800 and row["max_stat_difference"] < 1e-9 and 0 < row["mAP"] < 1


def test_decoders_benchmark_times_ours_and_keeps_the_stored_orientation():
    """Without TorchCodec installed (it is not a dependency) ours is timed alone and the row says so; the
    EXIF-rotated JPEG comes out as stored (32 high, 64 wide), the orientation COCO-style boxes are on."""
    from benchmarks import decoders

    rows = decoders.main(["--images", "3", "--size", "64", "48", "--passes", "1"])
    assert [r.get("format") for r in rows[:2]] == ["JPEG", "PNG"] and all(r["ours_ms"] > 0 for r in rows[:2])
    assert rows[2]["exif_rotated_64x32_jpeg"]["ours"] == [32, 64]
    if decoders.torchcodec_decoder() is None:
        assert "torchcodec not installed" in rows[0]["reference"]
    else:
        assert rows[0]["max_pixel_difference"] <= 1 and rows[0]["ratio"] > 0


def _jpeg_folder(tmp_path):
    root = write_imagefolder(tmp_path / "jpegs", per_class=2, val_per_class=2, size=96)
    return [str(p) for p in list_images(root / "val")]


def test_gpu_pipeline_logic_on_the_cpu(tmp_path):
    """The batched crop and the eval path, run on CPU tensors: the code the CUDA path runs."""
    paths = _jpeg_folder(tmp_path)
    from torchvision.io import read_file

    from datamodules.transforms import eval_transform

    images = decode_batch([read_file(p) for p in paths], torch.device("cpu"), paths)
    pipeline = GPUAugment(image_size=64, eval_resize=72)
    expected = torch.stack([eval_transform(image_size=64, resize_size=72)(im) for im in images])
    assert torch.equal(pipeline.eval(images), expected)  # identical ops, identical decoder
    multi = GPUAugment(eval_crops="multiscale", eval_scales=(40, 80)).eval(images)
    reference = [eval_transform(crops="multiscale", scales=(40, 80))(im) for im in images]
    assert all(torch.equal(a, b) for views, ref in zip(multi, reference) for a, b in zip(views, ref))
    ten = GPUAugment(image_size=64, eval_resize=72, eval_crops="ten").eval(images)
    assert torch.equal(
        ten, torch.stack([eval_transform(image_size=64, resize_size=72, crops="ten")(im) for im in images])
    )
    draws = [pipeline.sample(*im.shape[-2:]) for im in images]
    train = pipeline.train(images, torch.stack([d["box"] for d in draws]), torch.stack([d["flip"] for d in draws]))
    assert train.shape == (len(paths), 3, 64, 64) and train.dtype == torch.uint8
    # a full-image box resamples like an area-averaging resize
    full = crop_batch(images[:1], torch.tensor([[0, 0, 96, 96]]), 48)[0].float()
    reference = torch.nn.functional.avg_pool2d(images[0].float()[None], 2)[0]
    assert (full - reference).abs().mean() < 1.0


@pytest.mark.parametrize(
    ("augment", "jitter"), [("random_resized_crop", 0.0), ("scale", 0.0), ("none", 0.0), ("random_resized_crop", 0.4)]
)
def test_gpu_training_crops_are_the_cpu_paths_draws(augment, jitter, tmp_path):
    """For the same ``(epoch, index)``, the GPU path's worker draws the CPU path's crop box, flip and
    color jitter.

    Both run under ``EpochSeeded``: the box comes from torchvision's ``RandomResizedCrop`` on the JPEG
    header's size, the flip and the ``ColorJitter`` parameters from the next draws, so a GPU-decoded run
    is as reproducible (and resumable mid-epoch) as a CPU one. Resampled by ``roi_align`` on the CPU, the
    crops equal the CPU transforms' to a fraction of a level; a wrong box, flip or jitter would differ by
    tens of levels.
    """
    root = write_imagefolder(tmp_path / "jpegs", per_class=3, val_per_class=1, size=96)
    samples = list_samples(root / "train", find_classes(root / "train"))
    pipeline = GPUAugment(augment=augment, image_size=64, scale_range=(72, 90), color_jitter=jitter)
    raw = EpochSeeded(ImageFolderDataset(samples, None, raw=True, draw=pipeline.sample), seed=7)
    transform = train_transform(augment=augment, image_size=64, scale_range=(72, 90), color_jitter=jitter)
    cpu = EpochSeeded(ImageFolderDataset(samples, transform), seed=7)
    batch = collate_raw([raw[(2, i)] for i in range(len(samples))])
    assert batch["box"].shape == (len(samples), 4) and batch["flip"].dtype == torch.bool
    if augment == "random_resized_crop":
        assert 0 < batch["flip"].sum() < len(samples)  # both branches are exercised
    images = decode_batch(unpack_encoded(batch["image"]), torch.device("cpu"))
    gpu_path = pipeline.train(images, batch["box"], batch["flip"], batch.get("jitter"))
    cpu_path = torch.stack([cpu[(2, i)]["image"] for i in range(len(samples))])
    difference = (gpu_path.float() - cpu_path.float()).abs()
    assert difference.mean() < 0.6 and difference.mean(dim=(1, 2, 3)).max() < 1.0, difference.mean(dim=(1, 2, 3))
    assert torch.equal(raw[(2, 4)]["box"], batch["box"][4])  # the same draw every time


def test_raw_items_for_unreadable_files(tmp_path):
    """A GPU-path worker decodes what nvJPEG cannot take (PNG) on the CPU and names a corrupt file."""
    root = write_imagefolder(tmp_path / "jpegs", per_class=1, val_per_class=1, size=40)
    png, broken = tmp_path / "a.png", tmp_path / "b.JPEG"
    from torchvision.io import write_png

    write_png(torch.zeros(3, 30, 50, dtype=torch.uint8), str(png))
    broken.write_bytes(b"\xff\xd8\xff" + b"\x00" * 20)  # a JPEG signature and nothing else
    samples = [(str(png), 0), (str(broken), 0), *list_samples(root / "train", find_classes(root / "train"))]
    draw = GPUAugment(image_size=16).sample
    item = ImageFolderDataset(samples, None, raw=True, draw=draw)[0]
    assert item["image"].shape == (3, 30, 50) and item["box"][2] <= 50 and item["box"][3] <= 30
    with pytest.raises(CorruptImageError, match="b.JPEG"):
        ImageFolderDataset(samples, None, raw=True, draw=draw)[1]
    skipping = ImageFolderDataset(samples, None, raw=True, draw=draw, skip_corrupt=True)
    items = [skipping[i] for i in range(len(samples))]
    batch = collate_raw(items)
    assert batch["skipped"] == 1 and len(batch["label"]) == len(samples) - 1
    # the worker packs the files' bytes into one buffer; the training process gets each file back intact
    unpacked = unpack_encoded(batch["image"])
    kept = [item["image"] for item in items if item is not None]
    assert len(unpacked) == len(kept) and all(torch.equal(a, b) for a, b in zip(unpacked, kept))
    assert unpacked[0].ndim == 3 and batch["image"]["encoded"].numel() == sum(im.numel() for im in kept[1:])
    assert collate_raw([None]) == {"skipped": 1}


def test_packed_batches_cross_worker_processes(tmp_path):
    """Loader workers send a batch's files as one shared-memory buffer; every file arrives byte for byte."""
    root = write_imagefolder(tmp_path / "jpegs", per_class=3, val_per_class=1, size=40)
    samples = list_samples(root / "train", find_classes(root / "train"))
    dataset = ImageFolderDataset(samples, None, raw=True, draw=GPUAugment(image_size=16).sample)
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, num_workers=2, collate_fn=collate_raw)
    received = [(image, path) for batch in loader for image, path in zip(unpack_encoded(batch["image"]), batch["path"])]
    assert len(received) == len(samples)
    for image, path in received:
        assert image.ndim == 1 and image.numpy().tobytes() == Path(path).read_bytes()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_decoding_matches_the_cpu_path(tmp_path):
    root = tmp_path / "jpegs"
    write_imagefolder(root, per_class=2, val_per_class=2, size=96)
    batches = {}
    for device in ("cpu", "cuda"):
        dm = ImageFolderDataModule(root=str(root), image_size=64, eval_resize=72, batch_size=10, eval_batch_size=10,
                                   num_workers=0, decode_device=device)  # fmt: skip
        dm.setup("validate")
        batch = next(iter(dm.val_dataloader()))
        batch = dm.on_after_batch_transfer(dm.transfer_batch_to_device(batch, torch.device("cuda"), 0), 0)
        batches[device] = batch["image"].float()
    difference = (batches["cuda"] - batches["cpu"]).abs().flatten()
    # nvJPEG and libjpeg-turbo differ in rounding and in chroma upsampling, which at sharp color edges
    # reaches tens of levels in a few pixels (seen on an H200: mean 0.018, 99th percentile 0.175, max 0.64
    # in normalized units, std ~0.225 = 57 levels): the bulk must agree to a few levels.
    p99 = difference.quantile(0.99)
    assert difference.mean() < 0.025 and p99 < 0.25, (difference.mean(), p99)


def _header_only_jpeg(path: Path) -> None:
    """A JPEG whose header (and so its size) reads fine but whose image data is missing: only the decoder fails."""
    data = path.read_bytes()
    start = data.index(b"\xff\xc0")
    end = start + 2 + int.from_bytes(data[start + 2 : start + 4], "big")
    path.write_bytes(data[:end] + b"\xff\xd9")


@pytest.mark.parametrize("train", [True, False])
def test_gpu_path_skips_files_only_the_decoder_rejects(train, tmp_path):
    """With ``skip_corrupt`` the batch loses the bad file (labels, boxes and paths with it); without, the
    error names it."""
    root = write_imagefolder(tmp_path / "jpegs", per_class=2, val_per_class=1, size=40)
    samples = list_samples(root / "train", find_classes(root / "train"))
    bad = Path(samples[1][0])
    _header_only_jpeg(bad)
    outcomes = {}
    for skip in (True, False):
        dm = ImageFolderDataModule(
            root=str(root), image_size=16, eval_resize=20, skip_corrupt=skip, train_augment="random_resized_crop"
        )
        dataset = ImageFolderDataset(samples, None, raw=True, draw=dm.gpu.sample if train else None)
        batch = collate_raw([dataset[i] for i in range(len(samples))])
        try:
            outcomes[skip] = dm.decoding.prepare(batch, torch.device("cpu"), train=train)
        except CorruptImageError as err:
            outcomes[skip] = err
    assert isinstance(outcomes[False], CorruptImageError) and str(bad) in str(outcomes[False])
    out = outcomes[True]
    n = len(samples) - 1
    assert out["skipped"] == 1 and out["image"].shape == (n, 3, 16, 16) and str(bad) not in out["path"]
    assert out["label"].tolist() == [label for path, label in samples if path != str(bad)] and len(out["index"]) == n
    # a batch of nothing but unreadable files becomes a batch the task skips
    dm = ImageFolderDataModule(root=str(root), image_size=16, skip_corrupt=True, train_augment="random_resized_crop")
    dataset = ImageFolderDataset([samples[1]], None, raw=True, draw=dm.gpu.sample)
    assert dm.decoding.prepare(collate_raw([dataset[0]]), torch.device("cpu"), train=True) == {"skipped": 1}


def test_raw_items_decode_on_the_cpu_what_pil_will_not_size(tmp_path, monkeypatch):
    """PIL's decompression-bomb guard refuses to read some headers; such files are decoded in the worker."""
    from PIL import Image

    root = write_imagefolder(tmp_path / "jpegs", per_class=1, val_per_class=1, size=40)
    samples = list_samples(root / "train", find_classes(root / "train"))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 40x40 = 1,600 pixels > 2 x 100: refused
    item = ImageFolderDataset(samples, None, raw=True, draw=GPUAugment(image_size=16).sample)[0]
    assert item["image"].shape == (3, 40, 40) and item["box"].shape == (4,)


def test_a_cpu_share_of_the_gpu_path_gives_the_same_batch(tmp_path):
    """``cpu_share``: the workers finish some images themselves; the batch is the same augmentation."""
    root = write_imagefolder(tmp_path / "jpegs", per_class=3, val_per_class=1, size=96)
    samples = list_samples(root / "train", find_classes(root / "train"))
    dm = ImageFolderDataModule(root=str(root), image_size=64, color_jitter=0.4)
    batches = {}
    for share in (0.0, 0.5):
        dataset = ImageFolderDataset(samples, dm._transform(True), raw=True, draw=dm.gpu.sample, cpu_share=share)
        seeded = EpochSeeded(dataset, seed=3)
        batch = collate_raw([seeded[(1, i)] for i in range(len(samples))])
        assert int(batch["done"].sum()) == sum(dataset.on_cpu(i) for i in range(len(samples)))
        batches[share] = dm.decoding.prepare(batch, torch.device("cpu"), train=True)
    assert (
        5
        <= sum(ImageFolderDataset(samples, None, draw=dm.gpu.sample, cpu_share=0.5).on_cpu(i) for i in range(15))
        <= 10
    )
    assert torch.equal(batches[0.0]["label"], batches[0.5]["label"])
    difference = (batches[0.0]["image"].float() - batches[0.5]["image"].float()).abs()
    assert difference.mean(dim=(1, 2, 3)).max() < 1.0, difference.mean(dim=(1, 2, 3))
    with pytest.raises(ValueError, match="cpu_share=1.5 must be a fraction"):
        ImageFolderDataModule(root=str(root), cpu_share=1.5)


def test_prefetcher_keeps_order_reraises_and_stops():
    """The prefetch thread's logic (on the CPU, without streams): batches in order, a failure in
    ``prepare`` raised in the training loop, and the thread gone when the loop stops early."""
    import threading
    import time

    from datamodules.prefetch import CUDAPrefetcher

    batches = [{"x": torch.tensor([i])} for i in range(6)]
    double = CUDAPrefetcher(batches, lambda b: {"x": b["x"] * 2}, torch.device("cpu"))
    assert [int(b["x"]) for b in double] == [0, 2, 4, 6, 8, 10] and len(double) == 6

    def fail_at_3(batch):
        if int(batch["x"]) == 3:
            raise ValueError("corrupt batch 3")
        return batch

    seen = []
    with pytest.raises(ValueError, match="corrupt batch 3"):
        for batch in CUDAPrefetcher(batches, fail_at_3, torch.device("cpu")):
            seen.append(int(batch["x"]))
    assert seen == [0, 1, 2]

    iterator = iter(CUDAPrefetcher(batches * 50, lambda b: b, torch.device("cpu"), depth=2))
    next(iterator)
    iterator.close()  # the training loop stops early (end of limit_train_batches, an exception, ...)
    deadline = time.time() + 5
    while any(t.name == "cuda-prefetch" for t in threading.enumerate()) and time.time() < deadline:
        time.sleep(0.05)
    assert not any(t.name == "cuda-prefetch" for t in threading.enumerate())


def test_dataset_scale_benchmark_runs_every_measure_beside_its_reference(tmp_path, monkeypatch, capsys):
    """At a tiny fraction: each COCO and ImageFolder measure beside its reference, in the JSON it prints."""
    from benchmarks import dataset_scale

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    rows = dataset_scale.main(["--fraction", "0.0002", "--classes", "8", "--passes", "2", "--skip", "check",
                               "--root", str(tmp_path)])  # fmt: skip
    setup, detection, segmentation, full_pass, folder = rows
    assert setup["measure"] == "coco_setup" and setup["ours_s"] > 0 and setup["pycocotools_s"] > 0
    # one epoch of the training loader itself, two workers, each worker measured
    assert full_pass["measure"] == "worker_memory_full_pass" and full_pass["workers"] == 2
    assert full_pass["batches"] == 24 // full_pass["batch_size"]  # drop_last, every training image once
    assert len(full_pass["ours_workers_mib"]) == len(full_pass["paths_workers_mib"]) == 2
    assert full_pass["ours_worker_growth_mib"] == sum(full_pass["ours_workers_mib"]) / 2
    assert full_pass["allowed_mib"] == full_pass["paths_worker_growth_mib"] + 0.1 * full_pass["dataset_mib"]
    assert detection["samples"] == segmentation["samples"] == 24  # every training image has instances here
    for row in (detection, segmentation):
        assert len(row["ours_passes_mib"]) == len(row["paths_passes_mib"]) == 2
        assert row["allowed_mib"] == row["paths_worker_growth_mib"] + 0.1 * row["dataset_mib"]
    assert len(segmentation["same_work_passes_mib"]) == 2 and "same_work_worker_growth_mib" not in detection
    assert folder["measure"] == "imagefolder_setup" and folder["ratio"] > 0
    assert capsys.readouterr().out.count('"benchmark": "dataset_scale"') == 5
