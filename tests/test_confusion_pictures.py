"""The confusion-matrix pictures classification and segmentation write after each validation
(``tasks.outputs.confusion``), read back: the counts are torchmetrics', the cells' colors give each row's
shares, the class names are the ones asked for, and above 50 classes the picture is the most confused pairs."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from torchmetrics.classification import MulticlassConfusionMatrix

from tasks.outputs.confusion import (
    EMPTY_ROW,
    MAX_MATRIX_CLASSES,
    TOP_PAIRS,
    read_counts,
    row_shares,
    top_pairs,
    write_confusion,
)


def _torchmetrics(n: int, samples: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, n, (samples,), generator=g)
    target[target == n - 1] = 0  # the last class has no true samples: a gray row
    noise = torch.randint(0, n, (samples,), generator=g)
    preds = torch.where(torch.rand(samples, generator=g) < 0.6, target, noise)
    return MulticlassConfusionMatrix(num_classes=n)(preds, target), preds, target


def test_the_matrix_picture_shows_each_rows_shares_under_the_class_names(tmp_path):
    n = 7
    matrix, _, _ = _torchmetrics(n, 500)
    names = ["background", "person", "a much longer class name", "dog", "cat", "bus", "never seen"]
    path = write_confusion(matrix, names, tmp_path, "val", "val confusion")
    image = Image.open(path)
    assert json.loads(image.text["classes"]) == names
    (x0, y0), cell = json.loads(image.text["origin"]), int(image.text["cell"])
    assert image.width >= x0 + n * cell and image.height >= y0 + n * cell
    pixels, shares = image.convert("RGB").load(), row_shares(matrix)
    for i in range(n):
        for j in range(n):
            color = pixels[x0 + j * cell + 2, y0 + i * cell + 2]  # the cell's corner, clear of its text
            if i == n - 1:
                assert color == EMPTY_ROW
            else:
                assert abs((1 - color[0] / 255) - float(shares[i, j])) <= 0.5 / 255 + 1e-9, (i, j)
    assert len(image.convert("L").getcolors(maxcolors=256 * 256) or []) > 10  # names, captions, shades: not blank
    names_read, counts = read_counts(tmp_path / "val.csv")
    assert names_read == names and torch.equal(counts, matrix)  # torchmetrics' counts, as computed


def test_above_fifty_classes_the_picture_is_the_most_confused_pairs(tmp_path):
    n = MAX_MATRIX_CLASSES + 30
    matrix = torch.diag(torch.full((n,), 40))
    matrix[3, 17], matrix[60, 2], matrix[5, 6] = 25, 31, 7  # planted confusions
    matrix += (torch.rand(n, n, generator=torch.Generator().manual_seed(0)) < 0.05).long()
    names = [f"n{k:08d}" for k in range(n)]
    path = write_confusion(matrix, names, tmp_path, "test", "test confusion")
    image = Image.open(path)
    pairs = json.loads(image.text["pairs"])
    assert len(pairs) == TOP_PAIRS and pairs[:2] == [[60, 2, 31], [3, 17, 25]] and pairs[2] == [5, 6, 7]
    assert pairs == [list(p) for p in top_pairs(matrix)]
    assert image.height < 60 * TOP_PAIRS and len(image.convert("L").getcolors(maxcolors=256 * 256) or []) > 10
    assert torch.equal(read_counts(tmp_path / "test.csv")[1], matrix)


@pytest.mark.parametrize("n", [1, 2])
def test_tiny_matrices_draw(tmp_path, n):
    matrix = torch.ones(n, n, dtype=torch.long)
    image = Image.open(write_confusion(matrix, [str(k) for k in range(n)], tmp_path, "val", "t"))
    assert image.width > 0 and json.loads(image.text["classes"]) == [str(k) for k in range(n)]
