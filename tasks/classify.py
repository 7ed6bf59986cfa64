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

import csv
import json
import logging
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from lightning.pytorch.cli import ArgsType, LRSchedulerCallable, OptimizerCallable
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy
from torchvision.transforms import v2

from backbones import BackboneName
from backbones.weights import apply_weights, backbone_subset, read_state_dict

from .base import RUNTIME_OPTIONS, BaseTask, check_num_classes, classes_in
from .cli import TaskCLI, script
from .media import to_display

log = logging.getLogger(__name__)


class ClassificationTask(BaseTask):
    """Train and evaluate a zoo backbone as an image classifier.

    Args:
        backbone: zoo name (``python -m backbones`` lists them).
        backbone_args: any builder option, e.g. ``{"stride_in_1x1": true, "zero_init_residual": true}``.
        num_classes: classifier size; ``None`` takes it from the datamodule (an error if both are given
            and disagree).
        weights: a whole classifier to start from -- torchvision name (``ResNet50_Weights.IMAGENET1K_V2``),
            weight file or checkpoint of this task; its classifier is loaded too.
        weights_backbone: weights for the backbone only (the classifier stays freshly initialized), e.g.
            ImageNet weights for fine-tuning on another label set.
        label_smoothing: cross-entropy label smoothing.
        mixup_alpha: MixUp's Beta parameter (0 disables).
        cutmix_alpha: CutMix's Beta parameter (0 disables); with both, one is drawn per batch.
        optimizer: injected optimizer; the configs carry the papers' recipes (SGD 0.1, momentum 0.9,
            weight decay 1e-4).
        scheduler: injected learning-rate schedule.
        scheduler_interval: step the schedule each ``epoch`` or each optimizer ``step``.
        weight_decay_norm_bias: apply weight decay to normalization weights and biases too.
        channels_last: NHWC memory layout; ``None`` uses it on CUDA.
        compile: ``torch.compile`` the backbone.
        nonfinite_loss: ``stop`` the run on a NaN/inf loss, naming the batch, or ``skip`` the batch.
        reference_batch_size: the global batch the optimizer's learning rate is meant for.
        scale_lr: scale the learning rate linearly with the actual global batch (Goyal et al. 2017).
        predictions_file: where ``predict`` writes top-5 classes and scores (``.csv`` or ``.json``);
            defaults to ``<run dir>/predictions.csv``.
        log_samples: images with predicted and true labels logged to W&B each validation epoch.
    """

    monitor = "val/acc1"
    mode = "max"
    #: every training batch has one shape: let cuDNN time its algorithms once (``--trainer.benchmark``)
    cudnn_benchmark = True

    def __init__(
        self,
        backbone: BackboneName = "resnet50",
        backbone_args: dict[str, Any] | None = None,
        num_classes: int | None = None,
        weights: str | None = None,
        weights_backbone: str | None = None,
        label_smoothing: float = 0.0,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        optimizer: OptimizerCallable | None = None,
        scheduler: LRSchedulerCallable | None = None,
        scheduler_interval: Literal["epoch", "step"] = "epoch",
        weight_decay_norm_bias: bool = True,
        channels_last: bool | None = None,
        compile: bool = False,
        nonfinite_loss: Literal["stop", "skip"] = "stop",
        reference_batch_size: int | None = None,
        scale_lr: bool = False,
        predictions_file: str | None = None,
        log_samples: int = 16,
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
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"model.label_smoothing={label_smoothing} must be in [0, 1)")
        if weights and weights_backbone:
            raise ValueError("set either model.weights (whole classifier) or model.weights_backbone, not both")
        # Run-time switches stay out of the checkpoint's hyperparameters, so that the command line of a
        # later validate/predict run decides them (LightningCLI applies a checkpoint's hparams over it).
        self.save_hyperparameters(ignore=["optimizer", "scheduler", *RUNTIME_OPTIONS])
        self.predictions_file = predictions_file
        self.log_samples = log_samples
        self.backbone = None
        self.class_names: list[str] | None = None
        self._weights: tuple[dict, dict] | None = None
        if weights:
            state, meta = read_state_dict(weights, backbone)
            state = backbone_subset(state)
            found = classes_in(state, "fc.weight", weights, "classifier")
            self.hparams.num_classes = check_num_classes(num_classes, found, weights)
            self.class_names = meta.get("class_names") or meta.get("categories")
            self._weights = (state, meta)
        if self.hparams.num_classes:
            self.configure_models()
        self.mix = self._mixing()
        self._samples: list[tuple[torch.Tensor, int, torch.Tensor]] = []
        self._predictions: list[dict] = []
        self._skipped = 0

    # -- construction -----------------------------------------------------------------------------
    def models_ready(self) -> bool:
        return self.backbone is not None

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        data_classes = None
        if datamodule is not None and stage != "predict" and hasattr(datamodule, "num_classes"):
            data_classes = datamodule.num_classes
        if data_classes is not None:
            if self.hparams.num_classes is None:
                self.hparams.num_classes = data_classes
            elif self.hparams.num_classes != data_classes:
                raise ValueError(
                    f"model.num_classes={self.hparams.num_classes} but the dataset has {data_classes} classes "
                    f"({type(datamodule).__name__}); remove model.num_classes to take it from the data"
                )
            if self.class_names is None or len(self.class_names) != data_classes:
                self.class_names = list(getattr(datamodule, "class_names", None) or range(data_classes))
        self.require_num_classes(stage)
        super().setup(stage)

    def configure_models(self) -> None:
        hp = self.hparams
        self.backbone = self.make_backbone(
            hp.backbone, hp.backbone_args, hp.weights_backbone, num_classes=hp.num_classes
        )
        if self._weights is not None:
            state, meta = self._weights
            apply_weights(
                self.backbone,
                state,
                what=f"weights={hp.weights!r}",
                checkpoint_backbone=meta.get("checkpoint_backbone"),
            )
            self._weights = None
        self.configure_metrics()

    def configure_metrics(self) -> None:
        n = self.hparams.num_classes
        metrics = MetricCollection(
            {
                "acc1": MulticlassAccuracy(num_classes=n, top_k=1, average="micro"),
                "acc5": MulticlassAccuracy(num_classes=n, top_k=min(5, n), average="micro"),
            }
        )
        self.train_metrics = metrics.clone(prefix="train/")
        self.val_metrics = metrics.clone(prefix="val/")
        self.test_metrics = metrics.clone(prefix="test/")

    def _mixing(self):
        hp = self.hparams
        if not (hp.mixup_alpha or hp.cutmix_alpha):
            return None
        return hp.mixup_alpha, hp.cutmix_alpha

    def _apply_mixing(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mixup_alpha, cutmix_alpha = self.mix
        n = self.hparams.num_classes
        choices = []
        if mixup_alpha:
            choices.append(v2.MixUp(alpha=mixup_alpha, num_classes=n))
        if cutmix_alpha:
            choices.append(v2.CutMix(alpha=cutmix_alpha, num_classes=n))
        return v2.RandomChoice(choices)(images, labels)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(self.to_memory_format(images))

    # -- steps ----------------------------------------------------------------------------------------
    def _count_skipped(self, batch: dict) -> bool:
        skipped = int(batch.get("skipped", 0))
        if skipped:
            self._skipped += skipped
            self.log("data/skipped", float(self._skipped), on_step=True, on_epoch=False, reduce_fx="max")
        return "image" in batch

    def training_step(self, batch: dict, batch_idx: int):
        if not self._count_skipped(batch):
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
        self.log_learning_rate()
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
        probabilities back by softmax."""
        if isinstance(images, list):
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

    def _eval_step(self, batch: dict, metrics: MetricCollection, prefix: str) -> torch.Tensor | None:
        if not self._count_skipped(batch):
            return None
        images, labels = batch["image"], batch["label"]
        logits = self.eval_logits(images)
        loss = F.cross_entropy(logits, labels)
        metrics.update(logits, labels)
        self.log(f"{prefix}/loss", loss, on_epoch=True, sync_dist=True, batch_size=len(labels))
        self.log_dict(metrics, on_epoch=True, batch_size=len(labels))
        return logits

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        logits = self._eval_step(batch, self.val_metrics, "val")
        want = self.log_samples - len(self._samples)
        if logits is not None and want > 0 and self.wandb_loggers():
            probs = logits.detach().softmax(1)
            for image, label, p in list(zip(batch["image"], batch["label"].tolist(), probs))[:want]:
                if isinstance(image, list):  # multi-scale views: show the first
                    image = image[0]
                image = image[4] if image.ndim == 4 else image  # ten crops: show the center one
                self._samples.append((image.cpu(), label, p.cpu()))

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, self.test_metrics, "test")

    def _name(self, index: int) -> str:
        if self.class_names and 0 <= index < len(self.class_names):
            return str(self.class_names[index])
        return str(index)

    def on_validation_epoch_end(self) -> None:
        samples, self._samples = self._samples, []
        loggers = self.wandb_loggers()
        if not samples or not loggers or self.trainer.sanity_checking:
            return
        images = [to_display(image).numpy() for image, _, _ in samples]
        captions = []
        for _, label, probs in samples:
            top = int(probs.argmax())
            captions.append(f"pred: {self._name(top)} ({float(probs[top]):.2f}) | true: {self._name(label)}")
        for logger in loggers:
            logger.log_image("val/samples", images, step=self.global_step, caption=captions)

    # -- prediction -------------------------------------------------------------------------------
    def predict_step(self, batch: dict, batch_idx: int) -> list[dict]:
        if not self._count_skipped(batch):
            return []
        probs = self.eval_logits(batch["image"]).softmax(1)
        k = min(5, probs.shape[1])
        scores, indices = probs.topk(k, dim=1)
        rows = [
            {
                "path": path,
                "classes": [self._name(int(i)) for i in idx],
                "indices": [int(i) for i in idx],
                "scores": [round(float(s), 6) for s in score],
            }
            for path, idx, score in zip(batch["path"], indices.cpu(), scores.cpu())
        ]
        self._predictions.extend(rows)
        return rows

    def on_predict_epoch_start(self) -> None:
        self._predictions = []

    def on_predict_epoch_end(self) -> None:
        rows = self._predictions
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            gathered: list = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, rows)
            rows = [row for part in gathered for row in part]
        if self.trainer.is_global_zero:
            rows.sort(key=lambda r: r["path"])
            path = self.predictions_path()
            write_predictions(rows, path)
            log.info("wrote %d predictions to %s", len(rows), path)
            print(f"predictions: {path} ({len(rows)} images)")

    def predictions_path(self) -> Path:
        if self.predictions_file:
            return Path(self.predictions_file)
        return Path(self.trainer.default_root_dir) / "predictions.csv"

    # -- checkpoints --------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["class_names"] = [str(n) for n in (self.class_names or [])]

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        if checkpoint.get("class_names"):
            self.class_names = list(checkpoint["class_names"])


def write_predictions(rows: list[dict], path: Path) -> None:
    """Top-5 predictions per image as CSV (one row per image) or JSON (a list), by ``path``'s suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".json":
        path.write_text(json.dumps(rows, indent=1))
        return
    k = max((len(r["classes"]) for r in rows), default=5)
    header = ["path"] + [f"{kind}{i}" for i in range(1, k + 1) for kind in ("class", "score")]
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for r in rows:
            writer.writerow([r["path"]] + [v for pair in zip(r["classes"], r["scores"]) for v in pair])


def main(args: ArgsType = None) -> TaskCLI:
    """Entry point; ``main([...])`` runs the CLI in-process (tests use it)."""
    return TaskCLI(ClassificationTask, args=args)


__all__ = ["ClassificationTask", "main", "write_predictions"]

if __name__ == "__main__":
    script(main)
