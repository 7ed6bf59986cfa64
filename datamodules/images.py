"""Reading image files into uint8 tensors, with errors that name the file and the fix.

Decoding goes through ``torchvision.io.decode_image`` on the file's bytes: it sniffs the format from the
content, not the name, so the PNG files with a ``.JPEG`` name found in real ImageNet decode correctly;
grayscale and CMYK JPEGs come out as RGB (``ImageReadMode.RGB``), 16-bit PNGs as 8 bits per channel
(the top 8 bits, as PIL's conversion does). It is faster than PIL and yields
tensors that ``transforms.v2`` processes directly.
"""

from __future__ import annotations

import logging
import re
import warnings
from pathlib import Path

import torch
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms.v2.functional import to_dtype

log = logging.getLogger(__name__)
# torchvision 0.29 deprecates its decoders in favour of TorchCodec's, once per process: in every loader
# worker and check process. They are what this module reads with, on purpose (the formats, the speed);
# moving to TorchCodec is this module's change to make, not something a user of a training run can act on.
warnings.filterwarnings("ignore", "The image decoding and encoding capabilities of TorchVision", DeprecationWarning)

#: File name endings read as images (the formats ``decode_image`` supports), compared case-insensitively.
IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".webp", ".gif")


class CorruptImageError(RuntimeError):
    """An image file that cannot be read or decoded."""


def _reason(err: BaseException) -> str:
    text = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
    return re.sub(r"^\w+, /[^,]+:\d+, ", "", text)  # drop torchvision's C++ source location


def is_image_file(path: str | Path) -> bool:
    return str(path).lower().endswith(IMAGE_EXTENSIONS)


class MemoryImage(str):
    """An image held in memory (a ``3 x H x W`` uint8 RGB tensor) under a name: datasets take it where they
    take a file's path (it is that name as a string), and :func:`read_image` returns its pixels."""

    pixels: torch.Tensor

    def __new__(cls, name: str, pixels: torch.Tensor) -> MemoryImage:
        if pixels.dtype != torch.uint8 or pixels.ndim != 3 or pixels.shape[0] != 3 or 0 in pixels.shape:
            raise ValueError(
                f"{name}: an image in memory must be a 3 x H x W uint8 RGB tensor with H, W > 0, got "
                f"{tuple(pixels.shape)} {pixels.dtype}"
            )
        named = super().__new__(cls, name)
        named.pixels = pixels
        return named

    def __str__(self) -> str:  # ``str(image)``, as datasets do with paths, keeps the pixels
        return self


def read_image(path: str | Path) -> torch.Tensor:
    """Read ``path`` as a ``3 x H x W`` uint8 RGB tensor (a :class:`MemoryImage`'s pixels as they are).

    Raises:
        CorruptImageError: the file is missing, empty, truncated or not an image; the message names it.
    """
    if isinstance(path, MemoryImage):
        return path.pixels
    try:
        data = torch.from_file(str(path), shared=False, size=Path(path).stat().st_size, dtype=torch.uint8)
    except (OSError, RuntimeError) as err:
        raise CorruptImageError(f"{path}: cannot read the file ({_reason(err)})") from None
    if data.numel() == 0:
        raise CorruptImageError(f"{path}: the file is empty (0 bytes). Replace or delete it.")
    try:
        image = decode_image(data, mode=ImageReadMode.RGB)
    except (RuntimeError, ValueError) as err:
        raise CorruptImageError(
            f"{path}: cannot decode the image ({_reason(err)}). Replace or delete the file, or set "
            f"`data.skip_corrupt: true` to skip unreadable images."
        ) from None
    if image.dtype != torch.uint8:  # 16-bit PNGs decode to uint16: scaled to 8 bits like every other image
        image = to_dtype(image, torch.uint8, scale=True)
    return image


def read_image_or_skip(path: str | Path, skip_corrupt: bool) -> torch.Tensor | None:
    """``read_image(path)``; with ``skip_corrupt`` an unreadable file is logged and ``None`` returned.

    Datasets return that ``None``; their collate functions drop it and count it (``data/skipped``).
    """
    try:
        return read_image(path)
    except CorruptImageError as err:
        if not skip_corrupt:
            raise
        log.warning("skipping unreadable image: %s", err)
        return None
