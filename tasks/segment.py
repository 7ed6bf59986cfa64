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
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import ArgsType, LRSchedulerCallable, OptimizerCallable
from torch import nn
from torchmetrics.classification import MulticlassConfusionMatrix

from backbones import BackboneName, build_backbone
from backbones.base import NormKind
from backbones.weights import load_state_dict_checked

from .base import RUNTIME_OPTIONS, BaseTask, check_num_classes, classes_in, read_model_weights
from .cli import TaskCLI, script
from .media import to_display
from .schedulers import WarmupPolyLR
from .segmentation_models import DilatedFCN, SegHeadKind, SkipFCN, confusion_scores, native_output_stride

log = logging.getLogger(__name__)
IGNORE_INDEX = 255


class SegmentationTask(BaseTask):
    """FCN semantic segmentation over a zoo backbone.

    Args:
        backbone: zoo name.
        backbone_args: any builder option of the backbone.
        head: ``dilated`` (output stride 8 + auxiliary head) or ``skip`` (FCN-8s fusion at stride 32).
        num_classes: classes including the background; ``None`` takes the datamodule's.
        weights: a whole model to start from: torchvision's ``FCN_ResNet50_Weights.COCO_WITH_VOC_LABELS_V1`` /
            ``FCN_ResNet101_Weights.COCO_WITH_VOC_LABELS_V1`` (``head: dilated``, aux head, 21 VOC classes),
            a file holding such a state dict, or a checkpoint of this task. ``num_classes`` comes from it.
        weights_backbone: backbone weights (torchvision name, file, or a ``tasks.classify`` checkpoint).
        norm: backbone normalization (``sync_bn`` for multi-GPU batches of a few crops).
        aux_loss: train the auxiliary head on the penultimate stage (``dilated`` only).
        aux_weight: its loss weight (0.5, as torchvision and MMSegmentation).
        dropout: dropout before the classifiers.
        optimizer: injected optimizer (the configs: SGD 0.02, momentum 0.9, weight decay 1e-4).
        scheduler: injected schedule; ``None`` uses poly decay ``(1 - t/T) ** 0.9`` stepped per iteration.
        scheduler_interval, weight_decay_norm_bias, channels_last, compile: as for every task.
        nonfinite_loss: ``stop`` the run on a NaN/inf loss, naming the batch, or ``skip`` the batch.
        reference_batch_size: the global batch the optimizer's learning rate is meant for.
        scale_lr: scale the learning rate linearly with the actual global batch (Goyal et al. 2017).
        predictions_dir: where ``predict`` writes class-index PNG masks (default ``<run dir>/masks``).
        overlays: with ``predict``, also write color overlays next to the masks.
        log_samples: validation images logged to W&B with predicted and ground-truth masks.
    """

    monitor = "val/mIoU"
    mode = "max"
    #: evaluation runs on whole images of many shapes, and each new shape would be timed again
    cudnn_benchmark = False

    def __init__(
        self,
        backbone: BackboneName = "resnet50",
        backbone_args: dict[str, Any] | None = None,
        head: SegHeadKind = "dilated",
        num_classes: int | None = None,
        weights: str | None = None,
        weights_backbone: str | None = None,
        norm: NormKind = "bn",
        aux_loss: bool = True,
        aux_weight: float = 0.5,
        dropout: float = 0.1,
        optimizer: OptimizerCallable | None = None,
        scheduler: LRSchedulerCallable | None = None,
        scheduler_interval: Literal["epoch", "step"] = "step",
        weight_decay_norm_bias: bool = True,
        channels_last: bool | None = None,
        compile: bool = False,
        nonfinite_loss: Literal["stop", "skip"] = "stop",
        reference_batch_size: int | None = None,
        scale_lr: bool = False,
        predictions_dir: str | None = None,
        overlays: bool = False,
        log_samples: int = 4,
    ) -> None:
        super().__init__(
            optimizer=optimizer,
            scheduler=scheduler,
            scheduler_interval=scheduler_interval,
            weight_decay_norm_bias=weight_decay_norm_bias,
            channels_last=channels_last,
            compile=compile,
            nonfinite_loss=nonfinite_loss,
            reference_batch_size=reference_batch_size,
            scale_lr=scale_lr,
        )
        if weights and weights_backbone:
            raise ValueError("set either model.weights (whole model) or model.weights_backbone, not both")
        self.save_hyperparameters(ignore=["optimizer", "scheduler", "predictions_dir", "overlays", *RUNTIME_OPTIONS])
        self.predictions_dir = predictions_dir
        self.overlays = overlays
        self.log_samples = log_samples
        self.model: nn.Module | None = None
        self.class_names: list[str] | None = None
        self._weights_state: dict | None = None
        if weights:
            state, meta = read_model_weights(weights, "model.")
            found = classes_in(state, "classifier.4.weight", weights, "FCN")
            self.hparams.num_classes = num_classes = check_num_classes(num_classes, found, weights)
            self.class_names = meta.get("class_names") or meta.get("categories")
            self._weights_state = state
        if num_classes:
            self.configure_models()
        self._samples: list[tuple] = []

    # -- construction -----------------------------------------------------------------------------
    def models_ready(self) -> bool:
        return self.model is not None

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None and stage != "predict" and hasattr(datamodule, "num_classes"):
            n = datamodule.num_classes
            if self.hparams.num_classes is None:
                self.hparams.num_classes = n
            elif self.hparams.num_classes != n:
                raise ValueError(
                    f"model.num_classes={self.hparams.num_classes} but the dataset has {n} classes (background "
                    f"included); remove model.num_classes to take it from the data"
                )
            if self.class_names is None:
                self.class_names = list(datamodule.class_names)
        self.require_num_classes(stage)
        super().setup(stage)

    def configure_models(self) -> None:
        hp = self.hparams
        args = dict(hp.backbone_args or {})
        if hp.head == "dilated" and "output_stride" not in args:
            with torch.device("meta"):
                native = native_output_stride(build_backbone(hp.backbone, **args))
            args["output_stride"] = min(8, native)  # dilate res4 and res5 (FCN on DeepLab-style backbone)
        body = self.make_backbone(hp.backbone, args, hp.weights_backbone, norm=hp.norm)
        if hp.head == "dilated":
            self.model = DilatedFCN(body, hp.num_classes, aux=hp.aux_loss, dropout=hp.dropout)
        else:
            self.model = SkipFCN(body, hp.num_classes, dropout=hp.dropout)
        if self._weights_state is not None:
            load_state_dict_checked(self.model, self._weights_state, f"weights={hp.weights!r}")
            self._weights_state = None
        self.confusion = nn.ModuleDict(
            {
                split: MulticlassConfusionMatrix(num_classes=hp.num_classes, ignore_index=IGNORE_INDEX)
                for split in ("val", "test")
            }
        )

    def compile_targets(self) -> list[nn.Module]:
        return [self.model.backbone]

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.model(self.to_memory_format(images))

    # -- optimization ---------------------------------------------------------------------------------
    def configure_optimizers(self):
        if self.scheduler_factory is None:  # poly decay, power 0.9 (FCN/DeepLab; torchvision's reference)
            self.scheduler_factory = lambda optimizer: WarmupPolyLR(optimizer, power=0.9)
            self.scheduler_interval = "step"
        return super().configure_optimizers()

    # -- steps ----------------------------------------------------------------------------------------
    def _loss(self, outputs: dict[str, torch.Tensor], masks: torch.Tensor) -> tuple[torch.Tensor, dict]:
        parts = {"main": F.cross_entropy(outputs["out"], masks, ignore_index=IGNORE_INDEX)}
        if "aux" in outputs:
            parts["aux"] = F.cross_entropy(outputs["aux"], masks, ignore_index=IGNORE_INDEX)
        total = parts["main"] + self.hparams.aux_weight * parts.get("aux", 0.0)
        return total, parts

    def training_step(self, batch: dict, batch_idx: int):
        if "image" not in batch:
            return None
        outputs = self(batch["image"])
        loss, parts = self._loss(outputs, batch["mask"])
        loss = self.guard_loss(loss, batch)
        n = len(batch["image"])
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=n)
        if "aux" in parts:
            self.log_dict({f"train/loss_{k}": v for k, v in parts.items()}, on_step=True, on_epoch=True, batch_size=n)
        self.log_learning_rate()
        return loss

    def _eval_step(self, batch: dict, split: str) -> torch.Tensor | None:
        if "image" not in batch:
            return None
        outputs = self(batch["image"])
        loss, _ = self._loss(outputs, batch["mask"])
        predictions = outputs["out"].argmax(1)
        self.confusion[split].update(predictions, batch["mask"])
        self.log(f"{split}/loss", loss, on_epoch=True, sync_dist=True, batch_size=len(batch["image"]))
        return predictions

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        predictions = self._eval_step(batch, "val")
        want = self.log_samples - len(self._samples)
        if predictions is not None and want > 0 and self.wandb_loggers():
            for image, pred, mask in list(zip(batch["image"], predictions, batch["mask"]))[:want]:
                self._samples.append((image.cpu(), pred.cpu(), mask.cpu()))

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def _log_scores(self, split: str) -> None:
        scores = confusion_scores(self.confusion[split].compute())  # synchronized across ranks
        self.confusion[split].reset()
        self.log(f"{split}/mIoU", scores["mIoU"].float(), sync_dist=False)
        self.log(f"{split}/pixel_acc", scores["pixel_acc"].float(), sync_dist=False)
        names = self.class_names or [str(i) for i in range(len(scores["iou"]))]
        per_class = {f"{split}/IoU/{name}": v.float() for name, v in zip(names, scores["iou"]) if not v.isnan()}
        self.log_dict(per_class, sync_dist=False)

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            self.confusion["val"].reset()
            self._samples = []
            return
        self._log_scores("val")
        self._log_mask_samples()

    def on_test_epoch_end(self) -> None:
        self._log_scores("test")

    def _log_mask_samples(self) -> None:
        samples, self._samples = self._samples, []
        loggers = self.wandb_loggers()
        if not samples or not loggers:
            return
        import wandb

        labels = {i: n for i, n in enumerate(self.class_names or [])}
        labels[IGNORE_INDEX] = "ignore"
        images = [
            wandb.Image(
                to_display(image).numpy(),
                masks={
                    "predictions": {"mask_data": pred.numpy().astype("uint8"), "class_labels": labels},
                    "ground_truth": {"mask_data": mask.numpy().astype("uint8"), "class_labels": labels},
                },
            )
            for image, pred, mask in samples
        ]
        for logger in loggers:
            logger.experiment.log({"val/samples": images, "trainer/global_step": self.global_step})

    # -- prediction -------------------------------------------------------------------------------------
    def _output_dir(self) -> Path:
        if self.predictions_dir:
            return Path(self.predictions_dir)
        return Path(self.trainer.default_root_dir) / "masks"

    def predict_step(self, batch: dict, batch_idx: int) -> list[str]:
        from torchvision.io import encode_png, write_file, write_jpeg

        from .media import class_palette

        logits = self(batch["image"])["out"]
        folder = self._output_dir()
        folder.mkdir(parents=True, exist_ok=True)
        written = []
        for k, path in enumerate(batch["path"]):
            h, w = batch["input_size"][k].tolist()
            original = batch["original_size"][k].tolist()
            scores = F.interpolate(logits[k : k + 1, :, :h, :w], size=original, mode="bilinear", align_corners=False)
            mask = scores.argmax(1).to(torch.uint8).cpu()
            out = folder / f"{Path(path).stem}.png"
            write_file(str(out), encode_png(mask))
            written.append(str(out))
            if self.overlays:
                from datamodules.images import read_image

                image = read_image(path)
                colors = class_palette(logits.shape[1])[mask[0].long()].permute(2, 0, 1)
                blend = (0.5 * image.float() + 0.5 * colors.float()).to(torch.uint8)
                write_jpeg(blend, str(folder / f"{Path(path).stem}_overlay.jpg"), quality=90)
        return written

    def on_predict_epoch_end(self) -> None:
        if self.trainer.is_global_zero:
            print(f"masks: {self._output_dir()}")

    # -- checkpoints ------------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["class_names"] = [str(n) for n in (self.class_names or [])]

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        if checkpoint.get("class_names"):
            self.class_names = list(checkpoint["class_names"])


def main(args: ArgsType = None) -> TaskCLI:
    """Entry point; ``main([...])`` runs the CLI in-process."""
    return TaskCLI(SegmentationTask, args=args)


if __name__ == "__main__":
    script(main)
