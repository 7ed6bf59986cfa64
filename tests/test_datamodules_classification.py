"""Decoding real-world files, the ImageFolder and CIFAR datamodules."""

from __future__ import annotations

import io
import os
import pickle

import numpy as np
import pytest
import torch
from datasets import write_cifar, write_imagefolder
from PIL import Image

from datamodules import CIFARDataModule, ImageFolderDataModule
from datamodules.images import CorruptImageError, read_image
from datamodules.loading import collate_skipping


def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


@pytest.fixture
def photo() -> np.ndarray:
    rng = np.random.default_rng(0)
    smooth = np.kron(rng.integers(0, 255, (6, 8, 3)), np.ones((10, 10, 1)))
    return smooth.astype(np.uint8)  # 60 x 80, compressible


def test_grayscale_cmyk_and_png_named_jpeg_decode_as_rgb(tmp_path, photo):
    rgb = Image.fromarray(photo)
    files = {
        "gray.JPEG": _encode(rgb.convert("L"), "JPEG", quality=95),
        "cmyk.JPEG": _encode(rgb.convert("CMYK"), "JPEG", quality=95),
        "png_in_disguise.JPEG": _encode(rgb, "PNG"),  # real ImageNet has PNG files named .JPEG
        "rgba.png": _encode(Image.fromarray(np.dstack([photo, photo[..., :1]])), "PNG"),
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        image = read_image(tmp_path / name)
        assert image.shape == (3, 60, 80) and image.dtype == torch.uint8, name
        reference = np.asarray(Image.open(tmp_path / name).convert("RGB"))
        assert np.abs(image.permute(1, 2, 0).numpy().astype(int) - reference.astype(int)).max() <= 2, name
    gray = read_image(tmp_path / "gray.JPEG")
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])


def test_16_bit_pngs_become_8_bit_like_every_other_image(tmp_path, photo):
    """Scientific and remote-sensing sets hold 16-bit PNGs; they decode to uint16, which the pipeline
    (uint8 batches, normalized by /255) would silently misread."""
    deep = photo[..., 0].astype(np.uint16) * 256 + 200  # 16-bit values whose top byte is the photo
    Image.fromarray(deep).save(tmp_path / "deep.png")
    image = read_image(tmp_path / "deep.png")
    assert image.dtype == torch.uint8 and image.shape == (3, 60, 80)
    assert torch.equal(image[0], torch.from_numpy(photo[..., 0])) and torch.equal(image[0], image[2])


def test_unreadable_files_name_the_file_and_the_fix(tmp_path, photo):
    good = _encode(Image.fromarray(photo), "JPEG")
    cases = {
        "truncated.JPEG": (good[: len(good) // 2], "truncated"),
        "empty.JPEG": (b"", "empty"),
        "notes.JPEG": (b"these are not pixels", "Unsupported image file"),
    }
    for name, (data, reason) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(CorruptImageError, match=reason) as err:
            read_image(tmp_path / name)
        assert str(tmp_path / name) in str(err.value)
    with pytest.raises(CorruptImageError, match="skip_corrupt"):
        read_image(tmp_path / "truncated.JPEG")


def _corrupt_tree(tmp_path):
    root = write_imagefolder(tmp_path / "data", per_class=2, val_per_class=1, size=32)
    bad = root / "train" / "circle" / "circle_0000.jpg"
    bad.write_bytes(bad.read_bytes()[:200])
    return root, bad


def test_a_corrupt_file_fails_with_its_path_or_is_skipped_and_counted(tmp_path):
    root, bad = _corrupt_tree(tmp_path)
    strict = ImageFolderDataModule(root=str(root), image_size=32, eval_resize=32, batch_size=4, num_workers=0)
    strict.setup("fit")
    dataset = strict.datasets["train"]
    index = [p for p, _ in dataset.samples].index(str(bad))
    with pytest.raises(CorruptImageError, match=str(bad)):
        dataset[index]
    lenient = ImageFolderDataModule(
        root=str(root), image_size=32, eval_resize=32, batch_size=4, num_workers=0, skip_corrupt=True
    )
    lenient.setup("fit")
    assert lenient.datasets["train"][index] is None
    batch = collate_skipping([lenient.datasets["train"][i] for i in range(index, index + 3)])
    assert batch["skipped"] == 1 and batch["image"].shape == (2, 3, 32, 32)
    seen = sum(len(b["label"]) + b["skipped"] for b in lenient.train_dataloader())
    assert seen == 8  # the rest of the dataset still loads (drop_last keeps whole batches: 10 -> 8)


def test_imagefolder_classes_synsets_and_layout_errors(tmp_path):
    root = write_imagefolder(tmp_path / "imagenet", per_class=2, val_per_class=1, size=32)
    (root / "LOC_synset_mapping.txt").write_text("circle round thing, disc\nstar five-pointed star\n")
    dm = ImageFolderDataModule(root=str(root), image_size=32, eval_resize=32, batch_size=2, num_workers=0)
    assert dm.classes == ["circle", "ring", "square", "star", "triangle"]
    assert dm.class_names == ["round thing", "ring", "square", "five-pointed star", "triangle"]
    dm.setup("fit")
    batch = next(iter(dm.val_dataloader()))
    assert batch["image"].dtype == torch.uint8 and batch["image"].shape == (2, 3, 32, 32)  # workers ship uint8
    raw = batch["image"].clone()
    batch = dm.on_after_batch_transfer(batch, 0)  # normalized where the batch lands
    mean, std = torch.tensor(dm.hparams.mean).view(1, 3, 1, 1), torch.tensor(dm.hparams.std).view(1, 3, 1, 1)
    assert batch["image"].dtype == torch.float32
    assert torch.allclose(batch["image"], (raw.float() / 255 - mean) / std, atol=1e-6)
    assert batch["label"].tolist() == [0, 1]  # sorted folder order
    for image in (root / "train" / "star").iterdir():
        image.unlink()
    with pytest.raises(ValueError, match=r"train/star: class folder without images"):
        ImageFolderDataModule(root=str(root), image_size=32, batch_size=2, num_workers=0).setup("fit")
    os.rmdir(root / "train" / "star")
    with pytest.raises(ValueError, match=r"class folders \['star'\] do not exist in the training split"):
        ImageFolderDataModule(root=str(root), image_size=32, batch_size=2, num_workers=0).setup("fit")


@pytest.mark.parametrize("augment", ["random_resized_crop", "scale", "none"])
def test_training_augmentations_produce_crops(tmp_path, augment):
    root = write_imagefolder(tmp_path / "d", per_class=1, val_per_class=1, size=48)
    dm = ImageFolderDataModule(
        root=str(root), image_size=32, train_augment=augment, scale_range=(36, 48), pca_lighting=0.1,
        color_jitter=0.4, batch_size=5, num_workers=0,
    )  # fmt: skip
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (5, 3, 32, 32) and batch["image"].dtype == torch.uint8
    plain = dm.normalize(batch["image"], train=False)
    lit = dm.normalize(batch["image"], train=True)  # PCA lighting: one RGB shift per image
    shift = (lit - plain) * torch.tensor(dm.hparams.std).view(1, 3, 1, 1)
    assert torch.allclose(shift, shift[:, :, :1, :1].expand_as(shift), atol=1e-5) and shift.abs().max() > 0


def test_cifar_reads_official_batches_and_subtracts_the_pixel_mean(tmp_path):
    write_cifar(tmp_path, "cifar10", per_batch=8, test=12)
    dm = CIFARDataModule(root=str(tmp_path), batch_size=4, num_workers=0)
    assert dm.num_classes == 10 and dm.classes[3] == "class3"
    dm.setup("fit")
    train, val = dm.datasets["train"], dm.datasets["val"]
    assert len(train) == 40 and len(val) == 12  # val is the test batch unless val_split is set
    stacked = torch.stack([train.images[i].float() / 255 - train.mean for i in range(len(train))])
    assert stacked.mean(0).abs().max() < 1e-5  # per-pixel mean removed
    image = val[0]["image"]
    assert torch.allclose(image, val.images[0].float() / 255 - val.mean)
    augmented = train[0]["image"]
    assert augmented.shape == (3, 32, 32)
    held_out = CIFARDataModule(root=str(tmp_path), batch_size=4, num_workers=0, val_split=10)
    held_out.setup("fit")
    assert len(held_out.datasets["train"]) == 30 and len(held_out.datasets["val"]) == 10
    c100 = CIFARDataModule(root=str(write_cifar(tmp_path / "c100", "cifar100")), dataset="cifar100")
    assert c100.num_classes == 100 and c100.classes[0] == "fine0"


def test_cifar_batches_cannot_run_code(tmp_path, monkeypatch):
    write_cifar(tmp_path, "cifar10")
    monkeypatch.chdir(tmp_path)

    class Exploit:
        def __reduce__(self):
            return (os.system, ("touch PWNED",))

    with open(tmp_path / "cifar-10-batches-py" / "data_batch_1", "wb") as f:
        pickle.dump({b"data": Exploit(), b"labels": []}, f, protocol=2)
    with pytest.raises(ValueError, match="refusing to unpickle posix.system"):
        CIFARDataModule(root=str(tmp_path)).setup("fit")
    assert not (tmp_path / "PWNED").exists()


@pytest.mark.parametrize("seed", [0, 2**31 - 1, 2**32 - 1])
def test_training_draws_work_for_any_run_seed(tmp_path, seed):
    """LightningCLI draws a uint32 seed when none is set; every one must seed the per-sample RNG, reproducibly."""
    root = write_imagefolder(tmp_path / "d", per_class=1, val_per_class=1, size=48)
    batches = []
    for _ in range(2):
        torch.manual_seed(seed)
        dm = ImageFolderDataModule(root=str(root), image_size=32, batch_size=5, num_workers=0)
        dm.setup("fit")
        batches.append(next(iter(dm.train_dataloader())))
    assert torch.equal(batches[0]["image"], batches[1]["image"]) and torch.equal(
        batches[0]["index"], batches[1]["index"]
    )


def test_ten_crop_evaluation_batches(tmp_path):
    """``eval_crops: ten`` gives torchvision's TenCrop views; view 4 is the single-crop protocol's center crop."""
    root = write_imagefolder(tmp_path / "d", per_class=1, val_per_class=2, size=48)
    batches = {}
    for crops in ("center", "ten"):
        dm = ImageFolderDataModule(root=str(root), image_size=32, eval_resize=40, eval_crops=crops, batch_size=4,
                                   num_workers=0)  # fmt: skip
        dm.setup("validate")
        batches[crops] = next(iter(dm.val_dataloader()))["image"]
    ten, center = batches["ten"], batches["center"]
    assert ten.shape == (4, 10, 3, 32, 32) and torch.equal(ten[:, 4], center)
    # views 5-9 are the mirror image's top-left, top-right, bottom-left, bottom-right and center crops
    assert torch.equal(ten[:, 5], ten[:, 1].flip(-1)) and torch.equal(ten[:, 6], ten[:, 0].flip(-1))
    assert torch.equal(ten[:, 9], center.flip(-1)) and not torch.equal(ten[:, 0], ten[:, 3])


def test_multiscale_and_larger_evaluation_views(tmp_path):
    """``multiscale``: each image whole at every shorter side, a list per image; ``eval_size``: a larger test crop."""
    root = write_imagefolder(tmp_path / "d", per_class=1, val_per_class=2, size=48)
    dm = ImageFolderDataModule(root=str(root), image_size=32, eval_crops="multiscale", eval_scales=(24, 40),
                               batch_size=4, num_workers=0)  # fmt: skip
    dm.setup("validate")
    batch = next(iter(dm.val_dataloader()))
    assert len(batch["image"]) == 4 == len(batch["label"])
    assert all([tuple(v.shape) for v in views] == [(3, 24, 24), (3, 40, 40)] for views in batch["image"])
    normalized = dm.normalize(batch["image"])
    assert normalized[0][1].shape == (3, 40, 40) and normalized[0][1].dtype == torch.float32
    dm = ImageFolderDataModule(root=str(root), image_size=32, eval_size=40, eval_resize=44, batch_size=4,
                               num_workers=0)  # fmt: skip
    dm.setup("validate")
    assert next(iter(dm.val_dataloader()))["image"].shape == (4, 3, 40, 40)
    # a crop larger than the resized image would be padded with black: refused, naming the fix
    # (eval_resize follows the crop unless given: these set it, as a config reusing 256 would)
    with pytest.raises(ValueError, match="data.eval_size=320 is larger than data.eval_resize=256.*at least 320"):
        ImageFolderDataModule(root=str(root), eval_size=320, eval_resize=256)
    with pytest.raises(ValueError, match="data.image_size=288 is larger than data.eval_resize=256"):
        ImageFolderDataModule(root=str(root), image_size=288, eval_resize=256, eval_crops="ten")
    ImageFolderDataModule(root=str(root), image_size=288, eval_crops="multiscale")  # whole images: no crop
