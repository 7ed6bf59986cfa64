"""Pictures of what a model predicts: W&B sample media for every task, written once.

:class:`WandbSamples` (added by every task through ``configure_callbacks`` when ``log_samples > 0``)
collects a few validation images per epoch and logs them to each W&B logger as ``val/samples``
(``WandbLogger.log_image``, at the trainer's global step). A task
describes one image's prediction as the keyword arguments of ``wandb.Image`` (``sample_records``); the
helpers below build the boxes and masks parts.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch


def to_display(image: torch.Tensor) -> torch.Tensor:
    """A normalized ``3 x H x W`` float image as ``H x W x 3`` uint8 (min-max scaled per image)."""
    image = image.detach().cpu()
    if image.dtype == torch.uint8:
        return image.permute(1, 2, 0)
    image = image.float()
    lo, hi = image.amin(), image.amax()
    scaled = (image - lo) / (hi - lo).clamp_min(1e-6)
    return (scaled * 255).round().to(torch.uint8).permute(1, 2, 0)


def class_palette(num_classes: int) -> torch.Tensor:
    """``num_classes x 3`` uint8 colors, PASCAL VOC's bit-interleaved palette (class 0 black)."""
    colors = torch.zeros(num_classes, 3, dtype=torch.uint8)
    for index in range(num_classes):
        c, value = index, [0, 0, 0]
        for shift in range(7, -1, -1):
            for channel in range(3):
                value[channel] |= ((c >> channel) & 1) << shift
            c >>= 3
        colors[index] = torch.tensor(value, dtype=torch.uint8)
    return colors


def wandb_boxes(boxes: torch.Tensor, labels: torch.Tensor, names: dict[int, str], scores=None) -> dict:
    """One set of ``x1, y1, x2, y2`` pixel boxes as W&B's ``box_data`` (with scores in the captions)."""
    data = []
    for i, (box, label) in enumerate(zip(boxes.tolist(), labels.tolist())):
        entry = {
            "position": {"minX": box[0], "minY": box[1], "maxX": box[2], "maxY": box[3]},
            "domain": "pixel",
            "class_id": int(label),
            "box_caption": names.get(int(label), str(label)),
        }
        if scores is not None:
            entry["scores"] = {"score": float(scores[i])}
            entry["box_caption"] += f" {float(scores[i]):.2f}"
        data.append(entry)
    return {"box_data": data, "class_labels": names}


def wandb_mask(mask: torch.Tensor, names: dict[int, str]) -> dict:
    """A class-index mask as W&B's ``mask_data``."""
    return {"mask_data": mask.numpy().astype("uint8"), "class_labels": names}


def class_map(masks: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Instance masks (``K x H x W`` booleans) as one class-index map: each pixel the label of the last
    instance covering it, 0 where none does."""
    out = torch.zeros(masks.shape[-2:], dtype=torch.long)
    for mask, label in zip(masks, labels.tolist()):
        out[mask] = int(label)
    return out


class WandbSamples(pl.Callback):
    """Log ``count`` validation images with the task's predictions to W&B once per validation epoch.

    The task's ``sample_records(batch, outputs)`` turns a validation batch and what its
    ``validation_step`` returned into ``wandb.Image`` keyword arguments (``image`` first, as a tensor).
    """

    def __init__(self, count: int) -> None:
        self.count = count
        self.records: list[dict] = []

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module) -> None:
        self.records = []

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        want = self.count - len(self.records)
        if want <= 0 or outputs is None or trainer.sanity_checking or not pl_module.wandb_loggers():
            return
        self.records.extend(pl_module.sample_records(batch, outputs)[:want])

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module) -> None:
        records, self.records = self.records, []
        loggers = pl_module.wandb_loggers()
        if not records or not loggers or trainer.sanity_checking:
            return
        images = [to_display(r.pop("image")).numpy() for r in records]
        keys = sorted({k for r in records for k in r})
        missing = [k for k in keys if any(k not in r for r in records)]
        if missing:
            raise ValueError(f"{type(pl_module).__name__}.sample_records gave {missing} for some images only")
        for logger in loggers:
            parts = {k: [r[k] for r in records] for k in keys}
            logger.log_image("val/samples", images, step=trainer.global_step, **parts)
