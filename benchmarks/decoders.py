"""The image decoder the data path uses (``torchvision.io.decode_image``, deprecated in torchvision 0.29) against
its announced successor, TorchCodec's ``torchcodec.decoders.decode_image``, on the same encoded files.

    python -m benchmarks.decoders --images 200 --size 640 480
    pip install torchcodec   # the replacement is not a dependency: without it only ours is timed

JPEG and PNG files of photo-like content (smooth gradients with noise, quality 90) are encoded with Pillow
and decoded from their bytes, RGB, one thread, as ``datamodules.images`` decodes them. One JSON line per format:
ours and TorchCodec's median milliseconds per image (five passes over the files), the ratio, the largest
pixel difference between the two decoders, and what each gives for a JPEG whose EXIF orientation says
"rotate 90°" (torchvision ignores the tag unless asked, TorchCodec always applies it: the annotations of
COCO-style datasets are on the stored pixels, so a move must keep the stored orientation).
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import time

import numpy as np
import torch
from PIL import Image


def encoded_images(count: int, size: tuple[int, int], fmt: str, seed: int = 0) -> list[torch.Tensor]:
    """``count`` photo-like images of ``size`` (W, H) encoded as ``fmt``, as 1-D uint8 tensors."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    out = []
    for _ in range(count):
        base = np.stack([np.sin(xx / rng.uniform(20, 90) + c) * np.cos(yy / rng.uniform(20, 90)) for c in range(3)], -1)
        pixels = np.clip(127 + 100 * base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
        out.append(torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8))
    return out


def rotated_jpeg(size: tuple[int, int]) -> torch.Tensor:
    """A JPEG of ``size`` (W, H) whose EXIF orientation tag is 6 ("rotate 90° clockwise to display")."""
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buffer, format="JPEG", exif=exif.tobytes())
    return torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)


def ours():
    from torchvision.io import ImageReadMode, decode_image

    return lambda data: decode_image(data, mode=ImageReadMode.RGB)


def torchcodec_decoder():
    """TorchCodec's ``decode_image`` (RGB, uint8), or ``None`` where TorchCodec is not installed."""
    try:
        from torchcodec.decoders import decode_image
    except ImportError:
        return None
    return lambda data: decode_image(data, mode="RGB")


def median_ms(decode, images: list[torch.Tensor], passes: int) -> float:
    times = []
    for _ in range(passes):
        start = time.perf_counter()
        for data in images:
            decode(data)
        times.append((time.perf_counter() - start) / len(images) * 1000)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.decoders", description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--size", type=int, nargs=2, default=(640, 480), metavar=("W", "H"))
    parser.add_argument("--passes", type=int, default=5)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # a loader worker decodes on one thread
    reference, decode = torchcodec_decoder(), ours()
    rows = []
    for fmt in ("JPEG", "PNG"):
        images = encoded_images(args.images, tuple(args.size), fmt)
        decode(images[0])  # first-call set-up outside the timing
        ms = round(median_ms(decode, images, args.passes), 3)
        row = {"benchmark": "decoders", "format": fmt, "images": args.images, "size": list(args.size),
               "ours": "torchvision.io.decode_image", "ours_ms": ms}  # fmt: skip
        if reference is None:
            row["reference"] = "torchcodec not installed (pip install torchcodec)"
        else:
            reference(images[0])
            row["reference"] = "torchcodec.decoders.decode_image"
            row["reference_ms"] = round(median_ms(reference, images, args.passes), 3)
            row["ratio"] = round(row["ours_ms"] / row["reference_ms"], 3)  # below 1: ours is faster
            row["max_pixel_difference"] = max(
                int((decode(d).int() - reference(d).int()).abs().max()) for d in images[:20]
            )
        rows.append(row)
    turned = rotated_jpeg((64, 32))
    exif = {"benchmark": "decoders", "exif_rotated_64x32_jpeg": {"ours": list(decode(turned).shape[1:])}}
    if reference is not None:
        exif["exif_rotated_64x32_jpeg"]["reference"] = list(reference(turned).shape[1:])
    rows.append(exif)
    for row in rows:
        print(json.dumps(row))
    return rows


if __name__ == "__main__":
    main()
