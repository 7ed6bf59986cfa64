"""Pictures of predictions a person can read: one color per class, labels on a filled background that do
not overlap, small images upscaled first, a legend on segmentation overlays. ``predict`` writes them
(``--model.draw_predictions``, ``--model.overlays``); Pillow draws.

The layout (which boxes, where each label goes, the scale) is computed apart from the rendering, so it
can be checked without reading pixels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from PIL import Image, ImageDraw, ImageFont

from .media import class_palette

#: images whose shorter side is under this are upscaled (nearest) before drawing, so labels stay legible
MIN_SIDE = 256
#: label text height in pixels on the drawn image
FONT_SIZE = 13


def class_colors(num_classes: int) -> list[tuple[int, int, int]]:
    """A distinct RGB color per class index: PASCAL VOC's palette, with black (index 0) replaced."""
    colors = [tuple(int(v) for v in c) for c in class_palette(max(num_classes, 2))]
    colors[0] = (255, 255, 255)
    return colors


def upscale_factor(height: int, width: int, min_side: int = MIN_SIDE) -> int:
    """The whole-number factor that brings the shorter side to at least ``min_side`` (1 if it is already)."""
    return max(1, math.ceil(min_side / max(1, min(height, width))))


@dataclass
class DrawnBox:
    box: tuple[float, float, float, float]  # on the drawn (possibly upscaled) image
    color: tuple[int, int, int]
    text: str
    label: tuple[float, float, float, float]  # the label's filled rectangle


def _overlaps(a, b) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def place_labels(boxes: list[tuple], sizes: list[tuple[float, float]], width: float, height: float) -> list[tuple]:
    """A rectangle of ``sizes[i]`` (w, h) for each box's label, in order (the best detection first): above
    the box's top-left corner, else just inside it, else below it, else the first free place down the
    image's left edge of the box; always inside the image. Only when no place is free does a label overlap
    another (it then goes above its box)."""
    placed: list[tuple] = []
    for (x1, y1, _, y2), (w, h) in zip(boxes, sizes):
        x = min(max(0.0, x1), max(0.0, width - w))
        down = [float(y) for y in range(0, int(max(0.0, height - h)) + 1, max(1, int(h // 2)))]
        tops = [min(max(0.0, y), max(0.0, height - h)) for y in (y1 - h, y1, y2, *down)]
        rects = [(x, y, x + w, y + h) for y in tops]
        placed.append(next((r for r in rects if not any(_overlaps(r, o) for o in placed)), rects[0]))
    return placed


def label_font():
    try:
        return ImageFont.load_default(size=FONT_SIZE)
    except TypeError:  # Pillow without FreeType sizes: its bitmap font
        return ImageFont.load_default()


def plan_detections(boxes: torch.Tensor, labels: torch.Tensor, scores: torch.Tensor, names: list[str],
                    height: int, width: int, threshold: float = 0.5) -> tuple[int, list[DrawnBox]]:  # fmt: skip
    """The scale and the boxes to draw: those scoring at least ``threshold``, best first, each in its
    class's color with ``name score`` on a label that overlaps no other."""
    scale = upscale_factor(height, width)
    keep = [k for k in torch.argsort(scores, descending=True).tolist() if float(scores[k]) >= threshold]
    colors = class_colors(len(names))
    font, canvas = label_font(), ImageDraw.Draw(Image.new("RGB", (1, 1)))
    texts = [f"{names[int(labels[k])]} {float(scores[k]):.2f}" for k in keep]
    sizes = []
    for text in texts:
        left, top, right, bottom = canvas.textbbox((0, 0), text, font=font)
        sizes.append((right - left + 6, bottom - top + 4))
    scaled = [tuple(float(v) * scale for v in boxes[k].tolist()) for k in keep]
    rects = place_labels(scaled, sizes, width * scale, height * scale)
    drawn = [
        DrawnBox(box, colors[int(labels[k]) % len(colors)], text, rect)
        for k, box, text, rect in zip(keep, scaled, texts, rects)
    ]
    return scale, drawn


def _text_color(color: tuple[int, int, int]) -> tuple[int, int, int]:
    return (0, 0, 0) if sum(color) > 380 else (255, 255, 255)


def draw_detections(image: torch.Tensor, out: dict, names: list[str], threshold: float = 0.5) -> Image.Image:
    """``image`` (``3 x H x W``, uint8 or floats in [0, 1]) with ``out``'s boxes (``boxes``, ``labels``,
    ``scores``) scoring at least ``threshold`` drawn; ``names`` indexed by label. With ``masks`` (instance
    segmentation: ``K x H x W`` booleans, or ``K x 1 x H x W`` probabilities cut at 0.5), each drawn
    detection's mask is blended in first, half opaque, in its box's class color
    (``torchvision.utils.draw_segmentation_masks``)."""
    image = image.detach().cpu()
    if image.dtype != torch.uint8:
        image = (image.float().clamp(0, 1) * 255).round().to(torch.uint8)
    height, width = image.shape[-2:]
    boxes, labels, scores = (out[k].detach().cpu() for k in ("boxes", "labels", "scores"))
    if "masks" in out and len(boxes):
        from torchvision.utils import draw_segmentation_masks

        kept = scores >= threshold
        masks = out["masks"].detach().cpu()
        masks = (masks[:, 0] > 0.5 if masks.dim() == 4 else masks.bool())[kept]
        if len(masks):
            colors = class_colors(len(names))
            image = draw_segmentation_masks(
                image, masks, alpha=0.5, colors=[colors[int(k) % len(colors)] for k in labels[kept]]
            )
    scale, drawn = plan_detections(boxes, labels, scores, names, height, width, threshold)
    picture = Image.fromarray(image.permute(1, 2, 0).numpy())
    if scale > 1:
        picture = picture.resize((width * scale, height * scale), Image.Resampling.NEAREST)
    pen, font = ImageDraw.Draw(picture), label_font()
    for item in drawn:
        pen.rectangle(item.box, outline=item.color, width=2)
    for item in drawn:  # labels over every box
        pen.rectangle(item.label, fill=item.color)
        pen.text((item.label[0] + 3, item.label[1] + 1), item.text, fill=_text_color(item.color), font=font)
    return picture


def draw_overlay(image: torch.Tensor, mask: torch.Tensor, names: list[str]) -> Image.Image:
    """``image`` (uint8 ``3 x H x W``) half-blended with the mask's class colors (the segmentation palette,
    background black), upscaled when small, with a legend of the classes present."""
    palette = class_palette(max(len(names), 2))
    mask = mask.reshape(mask.shape[-2:]).long()
    blend = (0.5 * image.float() + 0.5 * palette[mask].permute(2, 0, 1).float()).to(torch.uint8)
    height, width = blend.shape[-2:]
    scale = upscale_factor(height, width)
    picture = Image.fromarray(blend.permute(1, 2, 0).numpy())
    if scale > 1:
        picture = picture.resize((width * scale, height * scale), Image.Resampling.NEAREST)
    pen, font = ImageDraw.Draw(picture), label_font()
    y = 2
    for k in mask.unique().tolist():
        name = names[k] if k < len(names) else str(k)
        color = tuple(int(v) for v in palette[k])
        left, top, right, bottom = pen.textbbox((0, 0), name, font=font)
        pen.rectangle((2, y, 2 + right - left + 20, y + bottom - top + 4), fill=(0, 0, 0))
        pen.rectangle((4, y + 2, 14, y + bottom - top + 2), fill=color, outline=(255, 255, 255))
        pen.text((18, y + 1), name, fill=(255, 255, 255), font=font)
        y += bottom - top + 6
    return picture
