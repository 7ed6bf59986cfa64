"""Decoding and augmenting JPEG batches on the GPU (``ImageFolderDataModule(decode_device="cuda")``).

A compiled ResNet-50 on one H100/H200 trains at several thousand images/s, more than the host's cores
can decode (about 800 JPEGs/s per core). On this path loader workers only read the files' bytes; after
the transfer the batch is decoded by nvJPEG in one ``torchvision.io.decode_jpeg(list, device="cuda")``
call, and

* training crops (random-resized, the ResNet paper's scale augmentation, or resize + center crop),
  flips and color jitter are drawn in the loader workers from each file's header by the CPU path's own
  torchvision transforms (:meth:`GPUAugment.sample`: the same draws), then the crops are resampled for
  the whole batch at once by ``torchvision.ops.roi_align`` with adaptive sampling (an area average, like
  an antialiased resize), flipped and jittered;
* evaluation views (center crop, ten crops, multi-scale) use the same ``transforms.v2`` functions as the
  CPU path, image by image, so GPU and CPU evaluation tensors differ only by the JPEG decoders' rounding.

The workers send a batch's files as one shared-memory buffer (:func:`pack_encoded`). Files that are not
baseline JPEGs for nvJPEG (PNG named ``.JPEG``, CMYK) are decoded on the CPU, by the worker, as on the
CPU path, and ``data.cpu_share`` of the training images are finished there entirely.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_image, decode_jpeg
from torchvision.ops import roi_align
from torchvision.transforms.v2 import (
    ColorJitter,
    RandomCrop,
    RandomHorizontalFlip,
    RandomResizedCrop,
    RandomShortestSize,
)

from .images import CorruptImageError, read_image_or_skip
from .loading import collate_skipping
from .transforms import PAPER_SCALES, eval_transform, resolve_augment, train_transform

JPEG_MAGIC = b"\xff\xd8\xff"

log = logging.getLogger(__name__)


def pack_encoded(images: Sequence[torch.Tensor]) -> dict:
    """A batch of encoded files (1-D uint8 tensors) as one flat buffer, built in the loader worker.

    The buffer crosses to the training process as one shared-memory tensor instead of one pickled
    ``bytes`` object or one shared-memory segment per file: the receiving thread does almost no work
    under the GIL, which the training loop needs to launch its kernels. Images the worker had to decode
    itself (``ndim == 3``) travel beside it.
    """
    encoded = [image for image in images if image.ndim == 1]
    return {
        "encoded": torch.cat(encoded) if encoded else torch.empty(0, dtype=torch.uint8),
        "sizes": torch.tensor([image.numel() if image.ndim == 1 else 0 for image in images], dtype=torch.int64),
        "decoded": [image for image in images if image.ndim != 1],
    }


def is_packed(images) -> bool:
    return isinstance(images, dict) and "encoded" in images and "sizes" in images


def unpack_encoded(packed: dict) -> list[torch.Tensor]:
    """The per-sample list of :func:`pack_encoded`: views into the flat buffer and the decoded images."""
    sizes = packed["sizes"].tolist()
    parts = iter(torch.split(packed["encoded"], [size for size in sizes if size > 0]))
    decoded = iter(packed["decoded"])
    return [next(parts) if size > 0 else next(decoded) for size in sizes]


def decode_batch(
    items: Sequence[torch.Tensor], device: torch.device, paths: Sequence[str] | None = None, skip: bool = False
) -> list[torch.Tensor | None]:
    """uint8 ``3 x H x W`` images on ``device`` from a list of JPEG files' bytes or decoded images.

    Encoded files (1-D uint8 tensors) go to nvJPEG in one batched call; decoded images are
    moved. A batch nvJPEG rejects is decoded image by image, falling back to the CPU decoder; a file
    neither can decode raises ``CorruptImageError`` naming it, or with ``skip`` is logged and left
    ``None`` (``data.skip_corrupt``).
    """
    images: list[torch.Tensor | None] = [None] * len(items)
    encoded = []
    for i, item in enumerate(items):
        if item.ndim == 1:
            encoded.append((i, item))
        else:
            images[i] = item.to(device, non_blocking=True)
    if encoded:
        try:
            decoded = decode_jpeg([data for _, data in encoded], mode=ImageReadMode.RGB, device=device)
        except RuntimeError:
            decoded = []
            for i, data in encoded:
                try:
                    decoded.append(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
                except RuntimeError:
                    try:
                        decoded.append(decode_image(data, mode=ImageReadMode.RGB).to(device))
                    except RuntimeError as err:
                        name = paths[i] if paths else f"batch item {i}"
                        error = CorruptImageError(f"{name}: cannot decode the image ({err})")
                        if not skip:
                            raise error from None
                        log.warning("skipping unreadable image: %s", error)
                        decoded.append(None)
        for (i, _), image in zip(encoded, decoded):
            images[i] = image
    return images


def select_samples(batch: dict, keep: Sequence[int], size: int) -> dict:
    """The samples ``keep`` of a collated batch of ``size``: tensors and lists indexed along their first axis."""
    out = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor) and value.ndim and value.shape[0] == size:
            value = value[torch.as_tensor(keep, dtype=torch.long, device=value.device)]
        elif isinstance(value, list) and len(value) == size:
            value = [value[i] for i in keep]
        out[key] = value
    return out


def header_size(data: bytes) -> tuple[int, int]:
    """``(height, width)`` of an encoded image, read from its header alone (PIL parses no pixels).

    Like ``decode_jpeg`` and ``decode_image`` here, the size ignores EXIF orientation. Raises ``OSError``
    for a header PIL cannot read (PIL's decompression-bomb guard included: torchvision has no such limit,
    so callers decode such files instead).
    """
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
    except Image.DecompressionBombError as err:
        raise OSError(str(err)) from None
    return height, width


def random_resized_crop_box(height: int, width: int, crop: RandomResizedCrop) -> tuple[float, float, float, float]:
    """``(x1, y1, x2, y2)`` of a random-resized crop, drawn by the CPU path's ``RandomResizedCrop`` itself.

    ``make_params`` reads only the image's size, so an empty ``0 x H x W`` tensor stands in for the image;
    the draws use torch's RNG, so a seeded worker (``loading.EpochSeeded``) gets the same box every time.
    """
    window = crop.make_params([torch.empty(0, height, width)])
    left, top = window["left"], window["top"]
    return left, top, left + window["width"], top + window["height"]


def scale_crop_box(
    height: int, width: int, shortest: RandomShortestSize, crop: RandomCrop
) -> tuple[float, float, float, float]:
    """The ResNet paper's augmentation (Sec. 3.4) as a box in the original image: the CPU path's
    ``RandomShortestSize`` (shorter side ``s ~ U[scale_range]``) then ``RandomCrop``, drawn by those
    transforms themselves on stand-in ``0 x H x W`` tensors, mapped back through the resize."""
    new_height, new_width = shortest.make_params([torch.empty(0, height, width)])["size"]
    window = crop.make_params([torch.empty(0, new_height, new_width)])
    sx, sy = width / new_width, height / new_height
    left, top = window["left"], window["top"]
    return left * sx, top * sy, (left + window["width"]) * sx, (top + window["height"]) * sy


def center_crop_box(height: int, width: int, size: int, resize: int) -> tuple[float, float, float, float]:
    side = size * min(height, width) / resize
    top, left = (height - side) / 2, (width - side) / 2
    return left, top, left + side, top + side


def crop_batch(images: list[torch.Tensor], boxes: torch.Tensor, size: int, chunk: int = 256) -> torch.Tensor:
    """Resample each image's box (``B x 4`` ``x1, y1, x2, y2``) to ``size x size`` with one ``roi_align``
    per chunk of images (uint8 out).

    The chunk's images are copied into one zero-padded half-precision tensor first (~0.4 GB for 256
    ImageNet-sized images). On an H200, ResNet-50 training fed this way ran at 0.798 of its synthetic
    rate with chunks of 256 and 0.775 with chunks of 64 (``benchmarks/results/h200_2026-11-27b.jsonl``).
    """
    boxes = torch.as_tensor(boxes, dtype=torch.float32)
    out = []
    for start in range(0, len(images), chunk):
        part = images[start : start + chunk]
        height = max(im.shape[-2] for im in part)
        width = max(im.shape[-1] for im in part)
        dtype = torch.float16 if part[0].is_cuda else torch.float32  # half on the GPU: half the bytes
        padded = part[0].new_zeros((len(part), 3, height, width), dtype=dtype)
        for k, image in enumerate(part):
            padded[k, :, : image.shape[-2], : image.shape[-1]] = image
        part_boxes = boxes[start : start + chunk]
        index = torch.arange(len(part), dtype=torch.float32, device=part_boxes.device)[:, None]
        rois = torch.cat([index, part_boxes], dim=1)
        rois = rois.to(padded.device, dtype, non_blocking=True)
        crops = roi_align(padded, rois, output_size=size, spatial_scale=1.0, sampling_ratio=0, aligned=True)
        out.append(crops.round_().clamp_(0, 255).to(torch.uint8))
    return torch.cat(out)


class GPUAugment:
    """The datamodule's train/eval pipelines on GPU-decoded images (see the module docstring).

    Training is split in two: :meth:`sample` draws an image's crop box and flip in the loader worker,
    from the file's header and torch's RNG (so draws are reproducible per ``(epoch, index)`` and survive a
    mid-epoch resume, as on the CPU path), and :meth:`train` applies a whole batch's draws on the GPU.
    """

    def __init__(
        self,
        *,
        augment: str = "random_resized_crop",
        image_size: int = 224,
        eval_size: int | None = None,
        eval_resize: int = 256,
        eval_crops: str = "center",
        eval_scales: Sequence[int] = PAPER_SCALES,
        scale_range: tuple[int, int] = (256, 480),
        color_jitter: float = 0.0,
        crop_scale: Sequence[float] | None = None,
        flip: bool | None = None,
    ) -> None:
        self.augment = resolve_augment(augment, image_size)
        self.image_size = image_size
        # The CPU pipelines' own transforms: their parameter draws (training) and their views (evaluation)
        # are what this path applies, so both paths augment and evaluate alike by construction.
        cpu = train_transform(
            augment=augment, image_size=image_size, scale_range=scale_range, color_jitter=color_jitter,
            crop_scale=crop_scale, flip=flip,
        )  # fmt: skip
        parts = {type(t): t for t in cpu.transforms}
        self.flip = RandomHorizontalFlip in parts
        self.resized_crop = parts.get(RandomResizedCrop)
        self.shortest, self.crop = parts.get(RandomShortestSize), parts.get(RandomCrop)
        self.jitter = parts.get(ColorJitter)
        self.eval_views = eval_transform(
            image_size=eval_size or image_size, resize_size=eval_resize, crops=eval_crops, scales=eval_scales
        )
        self.multiscale = eval_crops == "multiscale"

    def sample(self, height: int, width: int) -> dict[str, torch.Tensor]:
        """One training image's draws, in the CPU pipeline's order: ``box`` ``(x1, y1, x2, y2)``, ``flip``
        and, with color jitter, ``jitter`` (:meth:`jitter_params`)."""
        if self.augment == "random_resized_crop":
            box = random_resized_crop_box(height, width, self.resized_crop)
        elif self.augment == "scale":
            box = scale_crop_box(height, width, self.shortest, self.crop)
        elif self.augment == "pad_crop":
            raise ValueError("train_augment=pad_crop (small images) is applied on the CPU path only")
        else:  # "none": resize and center crop
            box = center_crop_box(height, width, self.image_size, self.image_size)
        flip = self.flip and bool(torch.rand(()) < 0.5)  # drawn after the box, as RandomHorizontalFlip
        draws = {"box": torch.tensor(box, dtype=torch.float32), "flip": torch.tensor(flip)}
        if self.jitter is not None:
            draws["jitter"] = self.jitter_params()
        return draws

    def jitter_params(self) -> torch.Tensor:
        """torchvision's ``ColorJitter`` draw as 7 numbers: the order of its 4 operations, then the
        brightness, contrast and saturation factors."""
        params = self.jitter.make_params([])
        factors = [params[f"{name}_factor"] for name in ("brightness", "contrast", "saturation")]
        return torch.tensor([*params["fn_idx"].tolist(), *factors], dtype=torch.float64)

    def train(
        self, images: list[torch.Tensor], boxes: torch.Tensor, flips: torch.Tensor, jitter: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Crop, resample, flip and color-jitter a batch as drawn by :meth:`sample` (``boxes``: ``B x 4``,
        ``flips``: ``B``, ``jitter``: ``B x 7``, needed when color jitter is on)."""
        crops = crop_batch(images, boxes, self.image_size)
        flips = flips.to(crops.device, non_blocking=True).view(-1, 1, 1, 1)
        crops = torch.where(flips, crops.flip(-1), crops)
        if self.jitter is not None:  # image by image, with each image's own draw (as on the CPU path)
            if jitter is None:
                raise ValueError("color jitter is on: train() needs each image's draw from sample()")
            rows = jitter.tolist()
            crops = torch.stack([self.jitter.transform(crop, _jitter_dict(row)) for crop, row in zip(crops, rows)])
        return crops

    def eval(self, images: list[torch.Tensor]) -> torch.Tensor | list[list[torch.Tensor]]:
        """The CPU path's evaluation views (``transforms.eval_transform``), image by image."""
        views = [self.eval_views(image) for image in images]
        return views if self.multiscale else torch.stack(views)


def _jitter_dict(row: Sequence[float]) -> dict:
    """:meth:`GPUAugment.jitter_params`'s numbers back as ``ColorJitter.transform``'s parameters."""
    return {
        "fn_idx": [int(i) for i in row[:4]],
        "brightness_factor": row[4],
        "contrast_factor": row[5],
        "saturation_factor": row[6],
        "hue_factor": None,
    }


# -- the orchestration: what ImageFolderDataModule(decode_device="cuda") does with a sample and a batch ---------
def on_cpu(index: int, cpu_share: float) -> bool:
    """Whether training sample ``index`` is decoded and cropped by the worker (``cpu_share`` of them,
    spread evenly over the indices by the golden-ratio sequence)."""
    return (index * 0.6180339887498949) % 1.0 < cpu_share


def encoded_item(sample: dict, transform, draw, finish_on_cpu: bool, skip_corrupt: bool) -> dict | None:
    """A loader worker's share of the GPU path for one sample (``path``, ``label``, ``index``): the JPEG's
    bytes (anything else decoded here, on the CPU) and, for training (``draw``: ``GPUAugment.sample``),
    the crop box and flip drawn from the header's size.

    A training sample with ``finish_on_cpu`` is instead finished here by the CPU pipeline (marked
    ``done``), which draws the same crop, flip and jitter: the two halves of a batch are the same
    augmentation, split between the host's cores and the GPU.
    """
    path = sample["path"]
    if finish_on_cpu:
        image = read_image_or_skip(path, skip_corrupt)
        if image is None:
            return None
        item = {**sample, "image": transform(image)}
        item.update({k: torch.zeros_like(v) for k, v in draw(*image.shape[-2:]).items()})
        item["done"] = torch.tensor(True)
        return item
    data = bytearray(Path(path).read_bytes())
    image: torch.Tensor | None = None
    if data.startswith(JPEG_MAGIC):
        try:
            height, width = header_size(data)
            image = torch.frombuffer(data, dtype=torch.uint8)
        except OSError:  # not even a readable header: the CPU decoder names the file (or skips it)
            pass
    if image is None:
        image = read_image_or_skip(path, skip_corrupt)
        if image is None:
            return None
        height, width = image.shape[-2:]
    item = {**sample, "image": image}
    if draw is not None:
        item.update(draw(height, width))
        item["done"] = torch.tensor(False)
    return item


def collate_raw(batch: Sequence[dict | None]) -> dict:
    """Batches of undecoded images: the files' bytes packed in one buffer (:func:`pack_encoded`), the rest
    collated as usual (unreadable samples, ``None``, dropped and counted)."""
    images = [sample["image"] for sample in batch if sample is not None]
    rest = [None if sample is None else {k: v for k, v in sample.items() if k != "image"} for sample in batch]
    out = collate_skipping(rest)  # drops and counts the unreadable samples
    if images:
        out["image"] = pack_encoded(images)
    return out


class GPUDecoding:
    """The training process's share of the GPU path: a host batch of JPEG bytes becomes uint8 images on
    the device (decoded by nvJPEG, cropped by :class:`GPUAugment` with the workers' draws).

    Args:
        augment: the datamodule's pipelines on decoded images.
        skip_corrupt: leave out files only the GPU decoder finds unreadable (counted in ``skipped``).
    """

    def __init__(self, augment: GPUAugment, skip_corrupt: bool = False) -> None:
        self.augment = augment
        self.skip_corrupt = skip_corrupt

    @staticmethod
    def transfer(batch, device: torch.device, move):
        """``move(batch, device)`` for everything but a packed batch's JPEG bytes, which stay on the host
        (the decoder reads them there)."""
        if not (isinstance(batch, dict) and is_packed(batch.get("image"))):
            return move(batch, device)
        images = batch.pop("image")
        batch = move(batch, device)
        batch["image"] = images
        return batch

    def prepare(self, batch: dict, device: torch.device, train: bool) -> dict:
        """Copy a host batch of JPEG bytes to ``device``, decode and crop it there (uint8 out)."""
        if "image" not in batch:  # every sample was unreadable and skipped
            return batch
        images = unpack_encoded(batch.pop("image"))
        jitter = batch.pop("jitter", None)  # read on the host, image by image
        done = batch.pop("done", None)  # finished by the worker (cpu_share)
        out = {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        decoded = decode_batch(images, device, batch.get("path"), skip=self.skip_corrupt)
        keep = [i for i, image in enumerate(decoded) if image is not None]
        if len(keep) < len(decoded):  # files only the decoder found unreadable (data.skip_corrupt)
            skipped = int(out.get("skipped", 0)) + len(decoded) - len(keep)
            if not keep:
                return {"skipped": skipped}
            out = select_samples(out, keep, len(decoded))
            out["skipped"] = skipped
            decoded = [decoded[i] for i in keep]
            jitter = jitter[keep] if jitter is not None else None
            done = done[keep] if done is not None else None
        if train:
            out["image"] = self.train_crops(decoded, out.pop("box"), out.pop("flip"), jitter, done)
        else:
            out["image"] = self.augment.eval(decoded)
        return out

    def train_crops(
        self,
        decoded: list[torch.Tensor],
        boxes: torch.Tensor,
        flips: torch.Tensor,
        jitter: torch.Tensor | None,
        done: torch.Tensor | None,
    ) -> torch.Tensor:
        """The GPU's crops of the samples the workers left to it, and the workers' crops of the rest."""
        if done is None or not bool(done.any()):
            return self.augment.train(decoded, boxes, flips, jitter)
        finished, pending = done.nonzero().flatten(), (~done).nonzero().flatten()
        first = decoded[int(finished[0])]
        images = first.new_empty((len(decoded), *first.shape))
        images[finished.to(first.device)] = torch.stack([decoded[i] for i in finished.tolist()])
        if len(pending):
            rows = pending.to(boxes.device)
            images[rows] = self.augment.train(
                [decoded[i] for i in pending.tolist()],
                boxes[rows],
                flips[rows],
                None if jitter is None else jitter[pending],
            )
        return images
