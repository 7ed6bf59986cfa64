"""FCN semantic segmentation with any zoo backbone: ``python -m tasks.segment fit|validate|test|predict``.

    python -m tasks.segment fit --config configs/coco_fcn_resnet101.yaml --data.root /data/coco
    python -m tasks.segment fit --config configs/coco_fcn8s_resnet50.yaml --model.backbone preact_resnet50

Metrics: ``val/mIoU`` and ``val/pixel_acc`` from a confusion matrix accumulated by torchmetrics over the
whole split (pixels labeled 255 excluded), ``val/IoU/<class>`` per class; the best checkpoint is chosen
by ``val/mIoU``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassConfusionMatrix

from backbones.base import NormKind, to_sync_batchnorm
from datamodules.images import read_image
from datamodules.masks import IGNORE_INDEX

from .core.base import BaseTask
from .core.contract import ExportSpec
from .core.loops import EVAL_SPLITS
from .core.optim import Recipe
from .heads.exportable import Logits
from .heads.fcn import DilatedFCN, SegHeadKind, SkipFCN
from .heads.tta import segment_with_tta
from .metrics.confusion import confusion_scores
from .outputs.confusion import log_confusion
from .outputs.media import wandb_mask
from .outputs.writers import write_mask, write_overlay
from .run.cli import entry_point, script

log = logging.getLogger(__name__)


class SegmentationTask(BaseTask):
    """FCN semantic segmentation over a zoo backbone.

    The shared arguments are :class:`tasks.core.base.BaseTask`'s. ``num_classes`` counts the classes with the
    background; ``weights`` is a whole model: torchvision's ``FCN_ResNet50_Weights.COCO_WITH_VOC_LABELS_V1``
    / ``FCN_ResNet101_Weights.COCO_WITH_VOC_LABELS_V1`` (``head: dilated``, aux head, 21 VOC classes), a
    file holding such a state dict, or a checkpoint of this task. Without an ``optimizer``, SGD at
    torchvision's FCN rate from trained weights, AdamW from scratch (``recipe``); without a ``scheduler``
    the rate decays polynomially, ``(1 - t/T) ** 0.9`` per iteration.

    Args:
        head: ``dilated`` (output stride 8 + auxiliary head) or ``skip`` (FCN-8s fusion at stride 32).
        norm: backbone normalization (``sync_bn`` for multi-GPU batches of a few crops).
        aux_loss: train the auxiliary head on the penultimate stage (``dilated`` only).
        aux_weight: its loss weight (0.5, as torchvision and MMSegmentation).
        dropout: dropout before the classifiers.
        predictions_dir: where ``predict`` writes class-index PNG masks (default ``<run dir>/masks``).
        overlays: with ``predict``, also write color overlays next to the masks.
        tta: test-time augmentation in evaluation and ``predict`` (``tasks.heads.tta``): the views below, merged.
        tta_scales: the views' scales (of the evaluation size); ``[1.0]`` by default.
        tta_flip: also each view mirrored left to right.
    """

    kind = "segment"
    monitor = "val/mIoU"
    mode = "max"
    supports_tta = True
    #: evaluation runs on whole images of many shapes, and each new shape would be timed again
    cudnn_benchmark = False
    network_attr = "model"
    classifier_key = "classifier.4.weight"
    network_kind = "FCN"
    #: torchvision's FCN reference (references/segmentation), for a network that starts from trained weights
    #: (``weights`` or ``weights_backbone``): lr 0.02 per 32 images (8 GPUs x 4), poly decay with power 0.9 per
    #: iteration; here with a short linear warm-up too
    finetune_recipe = Recipe(
        "torchvision's FCN reference", lr=0.02, images=32, decay="poly", power=0.9, warmup_steps=1000
    )
    #: from scratch, that rate (0.0025 for 4 crops a step) barely moves the network in a short run: on
    #: handwritten digits drawn into 160-px scenes (16 epochs, the issue's command) mIoU 0.18, against 0.45
    #: with AdamW at 0.003 per 8 images (the rate configs/demo_segment.yaml trains with), the same schedule
    scratch_recipe = Recipe(
        "AdamW for FCNs from scratch", lr=0.003, images=8, decay="poly", power=0.9, warmup_steps=1000,
        optimizer_name="adamw",
    )  # fmt: skip

    @property
    def recipe(self) -> Recipe:
        """torchvision's FCN recipe when the network starts from trained weights, AdamW from scratch."""
        return self.finetune_recipe if self.starts_from_weights() else self.scratch_recipe

    default_scheduler_interval = "step"
    output_options = ("predictions_dir", "overlays", "tta", "tta_scales", "tta_flip")

    def __init__(
        self,
        head: SegHeadKind = "dilated",
        norm: NormKind = "bn",
        aux_loss: bool = True,
        aux_weight: float = 0.5,
        dropout: float = 0.1,
        predictions_dir: str | None = None,
        overlays: bool = False,
        tta: bool = False,
        tta_scales: list[float] | None = None,
        tta_flip: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.predictions_dir = predictions_dir
        self.overlays = overlays
        self.tta = (tta_scales or [1.0], tta_flip) if tta else None

    # -- construction -----------------------------------------------------------------------------
    def build_network(self) -> nn.Module:
        hp = self.hparams
        overrides: dict[str, Any] = {"norm": hp.norm}
        if hp.head == "dilated" and "output_stride" not in (hp.backbone_args or {}):
            overrides["output_stride"] = 8  # dilate res4 and res5 (FCN on a DeepLab-style backbone)
        body = self.make_backbone(**overrides)
        if hp.head == "dilated":
            return DilatedFCN(body, hp.num_classes, aux=hp.aux_loss, dropout=hp.dropout)
        return SkipFCN(body, hp.num_classes, dropout=hp.dropout)

    def configure_metrics(self) -> None:
        self.confusion = nn.ModuleDict(
            {
                split: MulticlassConfusionMatrix(num_classes=self.hparams.num_classes, ignore_index=IGNORE_INDEX)
                for split in EVAL_SPLITS
            }
        )

    # -- optimization ---------------------------------------------------------------------------------
    def lr_scales(self) -> dict[nn.Module, float]:
        """The auxiliary head trains at 10x the rate, as in torchvision's reference (``train.py``)."""
        aux = getattr(self.model, "aux_classifier", None)
        return {aux: 10.0} if aux is not None else {}

    def on_fit_start(self) -> None:
        """Under DDP, BatchNorm becomes SyncBatchNorm (torchvision's reference converts the model when
        distributed): a few crops per GPU give poor batch statistics. It is converted here, after the DDP
        wrapper is built (which refuses SyncBatchNorm on CPUs), sharing the same parameter tensors."""
        if self.trainer.world_size > 1:
            self.model = to_sync_batchnorm(self.model)

    # -- steps ----------------------------------------------------------------------------------------
    def _loss(self, outputs: dict[str, torch.Tensor], masks: torch.Tensor) -> tuple[torch.Tensor, dict]:
        parts = {"main": F.cross_entropy(outputs["out"], masks, ignore_index=IGNORE_INDEX)}
        if "aux" in outputs:
            parts["aux"] = F.cross_entropy(outputs["aux"], masks, ignore_index=IGNORE_INDEX)
        total = parts["main"] + self.hparams.aux_weight * parts.get("aux", 0.0)
        return total, parts

    def training_step(self, batch: dict, batch_idx: int):
        self.count_skipped(batch)
        if "image" not in batch:
            return None
        outputs = self(batch["image"])
        loss, parts = self._loss(outputs, batch["mask"])
        loss = self.guard_loss(loss, batch)
        n = len(batch["image"])
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=n)
        if "aux" in parts:
            self.log_dict({f"train/loss_{k}": v for k, v in parts.items()}, on_step=True, on_epoch=True, batch_size=n)
        return loss

    def evaluate_batch(self, batch: dict, split: str) -> torch.Tensor | None:
        self.count_skipped(batch)
        if "image" not in batch:
            return None
        outputs = self(batch["image"])
        loss, _ = self._loss(outputs, batch["mask"])
        predictions = self.class_scores(batch["image"], outputs["out"]).argmax(1)
        self.confusion[split].update(predictions, batch["mask"])
        self.log(f"{split}/loss", loss, on_epoch=True, sync_dist=True, batch_size=len(batch["image"]))
        return predictions

    def class_scores(self, images: torch.Tensor, plain: torch.Tensor | None = None) -> torch.Tensor:
        """Per-pixel class scores at the images' size: the logits (``plain`` when already computed), or with
        ``tta`` the log of the views' averaged probabilities."""
        if self.tta:
            return segment_with_tta(lambda x: self(x)["out"], images, *self.tta, plain=plain)
        return plain if plain is not None else self(images)["out"]

    def sample_records(self, batch: dict, predictions: torch.Tensor) -> list[dict]:
        """Validation images with the predicted and true masks, for W&B."""
        names = {i: n for i, n in enumerate(self.class_names or [])}
        names[IGNORE_INDEX] = "ignore"
        return [
            {
                "image": image.cpu(),
                "masks": {"predictions": wandb_mask(pred.cpu(), names), "ground_truth": wandb_mask(mask.cpu(), names)},
            }
            for image, pred, mask in zip(batch["image"], predictions, batch["mask"])
        ]

    def reset_scores(self, split: str) -> None:
        self.confusion[split].reset()

    def epoch_scores(self, split: str) -> None:
        matrix = self.confusion[split].compute()  # synchronized across ranks
        scores = confusion_scores(matrix)
        self.confusion[split].reset()
        log_confusion(self, split, matrix)  # confusion/<split>.png and .csv in the run directory, and to W&B
        self.log(f"{split}/mIoU", scores["mIoU"].float(), sync_dist=False)
        self.log(f"{split}/pixel_acc", scores["pixel_acc"].float(), sync_dist=False)
        names = self.class_names or [str(i) for i in range(len(scores["iou"]))]
        per_class = {f"{split}/IoU/{name}": v.float() for name, v in zip(names, scores["iou"]) if not v.isnan()}
        self.log_dict(per_class, sync_dist=False)

    # -- prediction -------------------------------------------------------------------------------------
    def predictions(self, batch: dict) -> list[dict]:
        """Each image's ``path`` and ``mask`` (class indexes, ``1 x H x W`` uint8 at the image's original
        size: the logits of its un-padded part resized back to it). ``predict`` and ``tasks.inference.predictor``
        both use it."""
        logits = self.class_scores(batch["image"]).float()
        found = []
        for k, path in enumerate(batch["path"]):
            h, w = batch["input_size"][k].tolist()
            original = batch["original_size"][k].tolist()
            scores = F.interpolate(logits[k : k + 1, :, :h, :w], size=original, mode="bilinear", align_corners=False)
            found.append({"path": path, "mask": scores.argmax(1).to(torch.uint8).cpu()})
        return found

    def predictor_result(self, row: dict) -> dict:
        """``mask`` as ``H x W`` class indexes at the input's size, and the names of the ``classes`` in it."""
        mask = row["mask"][0]
        return {**row, "mask": mask, "classes": [self.class_name(int(k)) for k in mask.unique()]}

    # -- export ---------------------------------------------------------------------------------------
    def export_spec(self, data: dict[str, Any]) -> ExportSpec:
        """``image`` ``N x 3 x H x W`` (normalized as ``preprocessing`` says) to ``logits`` at its size."""
        return ExportSpec(
            Logits(self.model, ("out",)), ("logits",), batched=True,
            input="float32 N x 3 x H x W, RGB in [0, 1], then resized and normalized as zoo.preprocessing says",
            preprocessing=self.recorded_preprocessing(data),
        )  # fmt: skip

    def export_size(self, data: dict[str, Any]) -> tuple[int, int]:
        """The datamodule's evaluation size (``base_size``, else ``crop_size``)."""
        side = data.get("base_size") or data.get("crop_size") or 512
        return int(side), int(side)

    def predict_step(self, batch: dict, batch_idx: int) -> list[str]:
        folder = self.output_path(self.predictions_dir, "masks")
        written = []
        for found in self.predictions(batch):
            path, mask = found["path"], found["mask"]
            out = folder / f"{Path(path).stem}.png"
            write_mask(mask, out)
            written.append(str(out))
            if self.overlays:
                overlay = folder / f"{Path(path).stem}_overlay.jpg"
                names = [self.class_name(k) for k in range(self.hparams.num_classes)]
                write_overlay(read_image(path), mask, names, overlay)
        return written

    def on_predict_epoch_end(self) -> None:
        if self.trainer.is_global_zero:
            print(f"masks: {self.output_path(self.predictions_dir, 'masks')}")


main = entry_point(SegmentationTask)


if __name__ == "__main__":
    script(main)
