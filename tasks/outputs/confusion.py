"""Confusion matrices as pictures a user reads after a run: written into the run directory and logged to W&B.

Every validation and test of classification and segmentation writes ``confusion/<split>.png`` and
``confusion/<split>.csv`` (the counts, rows the true class, columns the predicted one, as torchmetrics'
``MulticlassConfusionMatrix`` computed them over all ranks) in the run directory, and logs the picture to
W&B as ``<split>/confusion`` when W&B is on.

The picture: up to :data:`MAX_MATRIX_CLASSES` classes, the matrix with each row normalized by its true
class's count (the recall of the class on the diagonal), class names on both axes; a cell's red channel is
``round(255 * (1 - share))`` (white: none, blue: all), a class with no true samples a gray row. Above that,
the :data:`TOP_PAIRS` most confused (true, predicted) pairs as bars. The PNG's text chunks say what it
shows (``classes``, and for the matrix ``origin`` and ``cell`` in pixels), so it can be read back.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from PIL.PngImagePlugin import PngInfo

from .drawing import label_font

MAX_MATRIX_CLASSES = 50
TOP_PAIRS = 20
EMPTY_ROW = (225, 225, 225)


def cell_color(share: float) -> tuple[int, int, int]:
    """The color of a cell holding ``share`` of its row (0 white ... 1 blue)."""
    return round(255 * (1 - share)), round(255 * (1 - 0.55 * share)), 255


def row_shares(confusion: torch.Tensor) -> torch.Tensor:
    """Each row divided by its sum (rows without samples stay 0)."""
    counts = confusion.double()
    return counts / counts.sum(1, keepdim=True).clamp(min=1)


def _text_size(draw: ImageDraw.ImageDraw, text: str, font) -> tuple[int, int]:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    return right - left, bottom - top


def draw_matrix(confusion: torch.Tensor, names: list[str], title: str) -> tuple[Image.Image, dict[str, str]]:
    """The row-normalized matrix with the class names on both axes, and the PNG text chunks describing it."""
    n = len(names)
    font = label_font()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = max(_text_size(probe, name, font)[0] for name in names) + 10
    line_h = _text_size(probe, "Ag", font)[1] + 8
    cell = max(14, min(44, 720 // n))
    origin = (label_w, 2 * line_h + label_w)  # title and axis caption, then the rotated column names
    width, height = origin[0] + n * cell + 10, origin[1] + n * cell + 10
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((4, 4), title, fill="black", font=font)
    draw.text((4, 4 + line_h), "rows: true class, columns: predicted; each row sums to 1", fill="dimgray", font=font)
    columns = Image.new("RGB", (label_w, n * cell), "white")  # the column names, drawn sideways
    side = ImageDraw.Draw(columns)
    shares, totals = row_shares(confusion), confusion.sum(1)
    for k, name in enumerate(names):
        w, h = _text_size(draw, name, font)
        y = origin[1] + k * cell + (cell - h) // 2
        draw.text((label_w - 6 - w, y), name, fill="black", font=font)
        side.text((6, k * cell + (cell - h) // 2), name, fill="black", font=font)
    # a quarter turn counter-clockwise: row k becomes column k, each name read upwards from the matrix
    image.paste(columns.rotate(90, expand=True), (origin[0], 2 * line_h))
    for i in range(n):
        for j in range(n):
            x, y = origin[0] + j * cell, origin[1] + i * cell
            share = float(shares[i, j])
            color = cell_color(share) if totals[i] > 0 else EMPTY_ROW
            draw.rectangle((x, y, x + cell - 1, y + cell - 1), fill=color, outline=(200, 200, 200))
            if cell >= 32 and totals[i] > 0 and share > 0:
                text = f"{share:.2f}"
                w, h = _text_size(draw, text, font)
                ink = "white" if share > 0.55 else "black"
                draw.text((x + (cell - w) // 2, y + (cell - h) // 2), text, fill=ink, font=font)
    chunks = {"classes": json.dumps(names), "origin": json.dumps(origin), "cell": str(cell)}
    return image, chunks


def top_pairs(confusion: torch.Tensor, k: int = TOP_PAIRS) -> list[tuple[int, int, int]]:
    """The ``k`` largest off-diagonal counts as ``(true, predicted, count)``, largest first (none of 0)."""
    off = confusion.clone()
    off.fill_diagonal_(0)
    counts, flat = off.flatten().topk(min(k, off.numel()))
    n = confusion.shape[1]
    return [(int(f) // n, int(f) % n, int(c)) for c, f in zip(counts, flat) if c > 0]


def draw_pairs(confusion: torch.Tensor, names: list[str], title: str) -> tuple[Image.Image, dict[str, str]]:
    """The most confused pairs as horizontal bars: ``true -> predicted``, the count and its share of the class."""
    pairs = top_pairs(confusion)
    font = label_font()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    labels = [f"{names[t]} -> {names[p]}" for t, p, _ in pairs] or ["(no confusions)"]
    label_w = max(_text_size(probe, label, font)[0] for label in labels) + 12
    line_h = _text_size(probe, "Ag", font)[1] + 10
    bar_w = 420
    image = Image.new("RGB", (label_w + bar_w + 150, (len(labels) + 2) * line_h + 10), "white")
    draw = ImageDraw.Draw(image)
    draw.text((4, 4), f"{title}: the {len(pairs)} most confused pairs of {len(names)} classes", fill="black", font=font)
    top = max((c for _, _, c in pairs), default=1)
    totals = confusion.sum(1)
    for row, (label, pair) in enumerate(zip(labels, pairs or [None])):
        y = (row + 2) * line_h
        draw.text((4, y), label, fill="black", font=font)
        if pair is None:
            continue
        t, _, count = pair
        length = max(1, round(bar_w * count / top))
        draw.rectangle((label_w, y, label_w + length, y + line_h - 6), fill=cell_color(0.8))
        share = count / max(int(totals[t]), 1)
        draw.text((label_w + length + 6, y), f"{count} ({share:.1%} of the class)", fill="black", font=font)
    return image, {"classes": json.dumps(names), "pairs": json.dumps(pairs)}


def write_confusion(confusion: torch.Tensor, names: list[str], folder: Path, split: str, title: str) -> Path:
    """``<folder>/<split>.csv`` (the counts) and ``<folder>/<split>.png`` (the picture); the PNG's path."""
    confusion = confusion.detach().cpu().long()
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f"{split}.csv", "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["true \\ predicted", *names])
        for name, row in zip(names, confusion.tolist()):
            writer.writerow([name, *row])
    drawn = draw_matrix if len(names) <= MAX_MATRIX_CLASSES else draw_pairs
    image, chunks = drawn(confusion, names, title)
    info = PngInfo()
    for key, value in chunks.items():
        info.add_text(key, value)
    path = folder / f"{split}.png"
    image.save(path, pnginfo=info)
    return path


def read_counts(path: Path) -> tuple[list[str], torch.Tensor]:
    """The class names and counts of a ``<split>.csv`` :func:`write_confusion` wrote."""
    with open(path, newline="") as file:
        rows = list(csv.reader(file))
    return rows[0][1:], torch.tensor([[int(v) for v in row[1:]] for row in rows[1:]])


def log_confusion(task, split: str, confusion: torch.Tensor) -> None:
    """On rank 0: write ``split``'s confusion matrix into the run directory's ``confusion/`` and log its picture
    to the task's W&B loggers (``<split>/confusion``)."""
    if not task.trainer.is_global_zero:
        return
    n = confusion.shape[0]
    names = [task.class_name(k) for k in range(n)]
    title = f"{split} confusion, epoch {task.current_epoch}, step {task.global_step}"
    path = write_confusion(confusion, names, Path(task.trainer.default_root_dir) / "confusion", split, title)
    for logger in task.wandb_loggers():
        logger.log_image(key=f"{split}/confusion", images=[str(path)], step=task.global_step)
