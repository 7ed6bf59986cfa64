"""Image classification with any zoo backbone: ``python -m tasks.classify fit|validate|test|predict``.

    python -m tasks.classify fit --config configs/imagenet_resnet50.yaml --data.root /data/imagenet
    python -m tasks.classify fit --config configs/imagenet_resnet50.yaml --model.backbone resnext50_32x4d
    python -m tasks.classify validate --config configs/imagenet_resnet50.yaml --ckpt_path runs/.../best.ckpt
    python -m tasks.classify predict --config configs/imagenet_resnet50.yaml --ckpt_path ... \\
        --data.predict_root photos/

Metrics: ``train/loss``, ``val/loss``, ``val/acc1``, ``val/acc5`` (``test/`` for ``test``); the best
checkpoint is chosen by ``val/acc1``.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix
from torchvision.transforms import v2

from datamodules.contract import SizedImages
from zoo_common.distributed import gather_objects

from .core.base import BaseTask
from .core.contract import ExportSpec
from .core.loops import EVAL_SPLITS
from .core.optim import Recipe
from .heads.exportable import Logits
from .inference.ensemble import EnsembleOption
from .outputs.confusion import log_confusion
from .outputs.writers import write_predictions
from .run.cli import entry_point, script

log = logging.getLogger(__name__)


class ClassificationTask(EnsembleOption, BaseTask):
    """Train and evaluate a zoo backbone as an image classifier.

    The shared arguments (backbone, weights, optimizer, schedule, speed switches) are
    :class:`tasks.core.base.BaseTask`'s; ``weights`` loads a whole classifier (torchvision's
    ``ResNet50_Weights.IMAGENET1K_V2``, a file, a checkpoint of this task), ``weights_backbone`` all but
    the classifier.

    Args:
        label_smoothing: cross-entropy label smoothing.
        mixup_alpha: MixUp's Beta parameter (0 disables).
        cutmix_alpha: CutMix's Beta parameter (0 disables); with both, one is drawn per batch.
        predictions_file: where ``predict`` writes top-5 classes and scores (``.csv`` or ``.json``);
            defaults to ``<run dir>/predictions.csv``.
        ensemble: checkpoints of this task evaluated and predicting as one classifier, their softmax averaged
            over the members (each with the evaluation's views: the ResNet paper's Table 5 ensemble of six
            depths; ``tasks.inference.ensemble``); not with ``fit`` or ``--ckpt_path``.
    """

    kind = "classify"
    monitor = "val/acc1"
    mode = "max"
    tta_unsupported = "classification's test-time views are the datamodule's eval_crops option"
    #: every training batch has one shape: let cuDNN time its algorithms once (``--trainer.benchmark``)
    cudnn_benchmark = True
    network_attr = "backbone"
    classifier_key = "fc.weight"
    network_kind = "classifier"
    #: SGD 0.1 per 256 images (ResNet Sec. 3.4, scaled linearly: Goyal et al. 2017), 5 epochs of warm-up
    #: (theirs), cosine decay over the run (torchvision's recipes)
    imagenet_recipe = Recipe("ImageNet SGD, Goyal et al. 2017", lr=0.1, images=256, decay="cosine", warmup_epochs=5)
    #: images under 64 px train as the paper's CIFAR nets do: 0.1 per 128 images (ResNet Sec. 4.2)
    small_image_recipe = Recipe("CIFAR SGD, ResNet Sec. 4.2", lr=0.1, images=128, decay="cosine", warmup_epochs=5)

    @property
    def recipe(self) -> Recipe:
        """The CIFAR recipe when the datamodule's images are under 64 px (CIFAR's, or ``image_size``),
        ImageNet's otherwise -- the same line ``data.train_augment: auto`` draws."""
        datamodule = self._trainer.datamodule if self._trainer is not None else None
        small = isinstance(datamodule, SizedImages) and datamodule.image_size < 64
        return self.small_image_recipe if small else self.imagenet_recipe

    default_scheduler_interval = "epoch"
    default_log_samples = 16
    inference_options = ("ensemble",)
    output_options = ("predictions_file", *inference_options)

    def __init__(
        self,
        label_smoothing: float = 0.0,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        predictions_file: str | None = None,
        ensemble: list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.ensemble = ensemble
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"model.label_smoothing={label_smoothing} must be in [0, 1)")
        self.predictions_file = predictions_file
        self.mix = (mixup_alpha, cutmix_alpha) if (mixup_alpha or cutmix_alpha) else None
        self._predictions: list[dict] = []

    # -- construction -----------------------------------------------------------------------------
    def build_network(self):
        return self.make_backbone(num_classes=self.hparams.num_classes)

    def configure_metrics(self) -> None:
        n = self.hparams.num_classes
        metrics = MetricCollection(
            {
                "acc1": MulticlassAccuracy(num_classes=n, top_k=1, average="micro"),
                "acc5": MulticlassAccuracy(num_classes=n, top_k=min(5, n), average="micro"),
            }
        )
        self.train_metrics = metrics.clone(prefix="train/")
        self.eval_metrics = nn.ModuleDict({split: metrics.clone(prefix=f"{split}/") for split in EVAL_SPLITS})
        self.confusion = nn.ModuleDict({split: MulticlassConfusionMatrix(num_classes=n) for split in EVAL_SPLITS})

    def _apply_mixing(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mixup_alpha, cutmix_alpha = self.mix
        n = self.hparams.num_classes
        choices = []
        if mixup_alpha:
            choices.append(v2.MixUp(alpha=mixup_alpha, num_classes=n))
        if cutmix_alpha:
            choices.append(v2.CutMix(alpha=cutmix_alpha, num_classes=n))
        return v2.RandomChoice(choices)(images, labels)

    # -- steps ----------------------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int):
        self.count_skipped(batch)
        if "image" not in batch:
            return None
        images, labels = batch["image"], batch["label"]
        targets = labels
        if self.mix is not None:
            images, targets = self._apply_mixing(images, labels)
        logits = self(images)
        loss = self.guard_loss(F.cross_entropy(logits, targets, label_smoothing=self.hparams.label_smoothing), batch)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=len(labels))
        if self.mix is None:
            self.train_metrics.update(logits.detach(), labels)  # logged once, at the epoch's end
        return loss

    def on_train_epoch_end(self) -> None:
        """``train/acc1`` and ``train/acc5`` over the epoch (all ranks), computed once rather than handed
        to Lightning's logging at every step, which costs about a millisecond of Python per step."""
        if any(metric.update_called for metric in self.train_metrics.values()):
            self.log_dict(self.train_metrics.compute(), sync_dist=False)  # compute() already gathers the ranks
        self.train_metrics.reset()

    def eval_logits(self, images: torch.Tensor | list[list[torch.Tensor]]) -> torch.Tensor:
        """Evaluation scores: the logits of single crops, or the log of several views' averaged softmax,
        as in the ResNet paper's testing (Sec. 3.4): ``B x V x 3 x H x W`` crops (``data.eval_crops: ten``)
        or, per image, a list of whole-image views of different sizes (``multiscale``, the
        fully-convolutional form: global average pooling makes the network's output the average of its
        score map). Either way the scores rank classes, give the cross-entropy, and give the averaged
        probabilities back by softmax. With ``ensemble``: the log of the members' softmax (of those scores)
        averaged; one member's scores are its own."""
        if self.members:
            members = self.member_tasks()
            if len(members) == 1:
                return members[0].eval_logits(images)
            probs = torch.stack([m.eval_logits(images).float().softmax(-1) for m in members]).mean(0)
        elif isinstance(images, list):
            probs = self._multiscale_probs(images)
        elif images.ndim == 5:
            batch, views = images.shape[:2]
            probs = self(images.flatten(0, 1)).float().softmax(-1).view(batch, views, -1).mean(1)
        else:
            return self(images)
        return probs.clamp_min(torch.finfo(probs.dtype).tiny).log()

    def _multiscale_probs(self, images: list[list[torch.Tensor]]) -> torch.Tensor:
        """Each image's views' averaged softmax; views of equal size (across the batch) run as one batch."""
        groups: dict[tuple, list[tuple[int, torch.Tensor]]] = {}
        for index, views in enumerate(images):
            for view in views:
                groups.setdefault(tuple(view.shape), []).append((index, view))
        total, count = None, torch.zeros(len(images), device=images[0][0].device)
        for members in groups.values():
            rows = torch.tensor([index for index, _ in members], device=count.device)
            probs = self(torch.stack([view for _, view in members])).float().softmax(-1)
            total = probs.new_zeros(len(images), probs.shape[1]) if total is None else total
            total.index_add_(0, rows, probs)
            count.index_add_(0, rows, torch.ones_like(rows, dtype=count.dtype))
        return total / count[:, None]

    def evaluate_batch(self, batch: dict, split: str) -> torch.Tensor | None:
        self.count_skipped(batch)
        if "image" not in batch:
            return None
        images, labels = batch["image"], batch["label"]
        logits = self.eval_logits(images)
        loss = F.cross_entropy(logits, labels)
        metrics = self.eval_metrics[split]
        metrics.update(logits, labels)
        self.confusion[split].update(logits.argmax(1), labels)
        self.log(f"{split}/loss", loss, on_epoch=True, sync_dist=True, batch_size=len(labels))
        self.log_dict(metrics, on_epoch=True, batch_size=len(labels))
        return logits

    def reset_scores(self, split: str) -> None:
        self.confusion[split].reset()

    def epoch_scores(self, split: str) -> None:
        """The split's confusion matrix over all ranks, as ``confusion/<split>.png`` and ``.csv`` in the run
        directory and to W&B (top-1 accuracy and the loss are Lightning-reduced per batch)."""
        matrix = self.confusion[split].compute()
        self.confusion[split].reset()
        log_confusion(self, split, matrix)

    def sample_records(self, batch: dict, logits: torch.Tensor) -> list[dict]:
        """Validation images with their top prediction and true label, for W&B (``tasks.outputs.media``)."""
        records = []
        for image, label, probs in zip(batch["image"], batch["label"].tolist(), logits.detach().softmax(1)):
            if isinstance(image, list):  # multi-scale views: show the first
                image = image[0]
            image = image[4] if image.ndim == 4 else image  # ten crops: show the center one
            top = int(probs.argmax())
            caption = f"pred: {self.class_name(top)} ({float(probs[top]):.2f}) | true: {self.class_name(label)}"
            records.append({"image": image.cpu(), "caption": caption})
        return records

    # -- prediction -------------------------------------------------------------------------------
    def predictions(self, batch: dict, top_k: int = 5) -> list[dict]:
        """Each image's ``top_k`` classes: ``path``, ``classes`` (names), ``indices`` and ``scores``
        (softmax probabilities), best first. ``predict`` and ``tasks.inference.predictor`` both use it."""
        if "image" not in batch:
            return []
        probs = self.eval_logits(batch["image"]).float().softmax(1)
        scores, indices = probs.topk(min(top_k, probs.shape[1]), dim=1)
        return [
            {
                "path": path,
                "classes": [self.class_name(int(i)) for i in idx],
                "indices": [int(i) for i in idx],
                "scores": [round(float(s), 6) for s in score],
            }
            for path, idx, score in zip(batch["path"], indices.cpu(), scores.cpu())
        ]

    def export_spec(self, data: dict[str, Any]) -> ExportSpec:
        """``image`` ``N x 3 x H x W`` (resized, cropped and normalized as ``preprocessing`` says) to ``logits``."""
        return ExportSpec(
            Logits(self.backbone), ("logits",), batched=True,
            input="float32 N x 3 x H x W, RGB in [0, 1], then resized and normalized as zoo.preprocessing says",
            preprocessing=self.recorded_preprocessing(data),
        )  # fmt: skip

    def predict_step(self, batch: dict, batch_idx: int) -> list[dict]:
        self.count_skipped(batch)
        rows = self.predictions(batch)
        self._predictions.extend(rows)
        return rows

    def on_predict_epoch_start(self) -> None:
        self._predictions = []

    def on_predict_epoch_end(self) -> None:
        rows = [row for part in gather_objects(self._predictions) for row in part]
        if self.trainer.is_global_zero:
            rows.sort(key=lambda r: r["path"])
            path = self.output_path(self.predictions_file, "predictions.csv")
            write_predictions(rows, path)
            log.info("wrote %d predictions to %s", len(rows), path)
            print(f"predictions: {path} ({len(rows)} images)")


main = entry_point(ClassificationTask)


__all__ = ["ClassificationTask", "main", "write_predictions"]

if __name__ == "__main__":
    script(main)
