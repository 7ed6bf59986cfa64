"""ImageNet localization with any zoo backbone: ``python -m tasks.localize fit|validate|test|predict``.

    python -m tasks.localize fit --config configs/imagenet_loc_resnet101.yaml --data.root /data/imagenet \\
        --model.weights_backbone runs/imagenet_resnet101/version_0/checkpoints/best.ckpt

The ResNet paper's localization (Appendix C): the classifier predicts the classes, a per-class box head
(``tasks.heads.localization``) the box of each. Metrics, as ILSVRC's devkit defines them
(``tasks.metrics.localization``): ``val/acc1``, ``val/acc5``, ``val/loc_err_top5`` (an image is right when
one of its five (class, box) guesses has its class and IoU >= 0.5 with one of its boxes) and
``val/loc_err_gt`` (the box predicted for the true class); the best checkpoint has the lowest
``val/loc_err_top5``. ``predict`` writes each image's five guesses (class, score, box in the image's
pixels) to a CSV.

The entry's second stage (Appendix C, Table 13's RPN+R-CNN row) trains from an RPN localizer's checkpoint:

    python -m tasks.localize fit --config configs/imagenet_loc_resnet101_competition.yaml \
        --data.root /data/imagenet --model.rpn_weights runs/imagenet_loc_resnet101/version_0/checkpoints/best.ckpt
"""

from __future__ import annotations

import csv
import logging
from typing import Any

import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from backbones import build_backbone
from zoo_common.checkpoints import read_task_checkpoint
from zoo_common.distributed import gather_objects

from .core.base import BaseTask
from .core.contract import ExportSpec
from .core.loops import EVAL_SPLITS
from .core.optim import Recipe
from .heads.loc_rcnn import RegionScorer, TwoStageLocalizer
from .heads.localization import Localizer, LocHead, TopGuesses
from .inference.ensemble import EnsembleOption
from .metrics.localization import gt_known_error, top5_error
from .run.cli import entry_point, script

log = logging.getLogger(__name__)


class LocalizationTask(EnsembleOption, BaseTask):
    """A classifier with per-class boxes over a zoo backbone.

    The shared arguments are :class:`tasks.core.base.BaseTask`'s; ``weights_backbone`` (a ``tasks.classify``
    checkpoint, as the paper starts from its classification network) loads all but the classifier,
    ``weights`` a whole localizer.

    Args:
        head: ``rpn`` (the paper's per-class RPN), ``regression`` (per-class boxes from pooled features), or
            ``rpn_rcnn``: a trained RPN localizer (``rpn_weights``, frozen) and an R-CNN on its proposals
            (Appendix C; ``tasks.heads.loc_rcnn``), the R-CNN trained here; ``weights_backbone`` starts the
            R-CNN's backbone; both stages' errors are logged (``val/loc_err_*``, ``val/rpn_loc_err_*``).
        rpn_weights: with ``rpn_rcnn``, the ``tasks.localize`` checkpoint of the RPN stage (read at ``fit``).
        rcnn_crop: the side the R-CNN's regions are warped to (the paper's 224).
        rcnn_proposals: the RPN's proposals per predicted class (the paper's 200).
        rcnn_regions: regions per R-CNN mini-batch (the paper's 256).
        anchor_sizes: the RPN head's anchor sizes (input pixels), each at the ratios 1:2, 1:1, 2:1; default:
            a quarter, a half and the whole of the input's shorter side (56, 112, 224 at ImageNet's 224).
        box_weight: the box loss's weight beside the classification loss.
        predictions_file: where ``predict`` writes five guesses per image (default ``<run dir>/localizations.csv``).
        ensemble: checkpoints of this task evaluated and predicting as one localizer: the members' softmax
            averaged for the classes, their boxes of each class averaged (``tasks.inference.ensemble``); not
            with ``fit`` or ``--ckpt_path``.
    """

    kind = "localize"
    monitor = "val/loc_err_top5"
    mode = "min"
    cudnn_benchmark = True
    network_attr = "model"
    classifier_key = "backbone.fc.weight"
    network_kind = "localizer"
    default_scheduler_interval = "step"
    inference_options = ("ensemble",)
    output_options = ("predictions_file", *inference_options)
    #: the classification recipe (the paper fine-tunes the classification network): 0.1 per 256 images
    recipe = Recipe("ImageNet SGD, Goyal et al. 2017", lr=0.1, images=256, decay="cosine", warmup_epochs=1)

    def __init__(
        self,
        head: LocHead = "rpn",
        anchor_sizes: list[int] | None = None,
        box_weight: float = 1.0,
        rpn_weights: str | None = None,
        rcnn_crop: int = 224,
        rcnn_proposals: int = 200,
        rcnn_regions: int = 256,
        ensemble: list[str] | None = None,
        predictions_file: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.ensemble, self.predictions_file = ensemble, predictions_file
        self._rows: list[list] = []

    def build_network(self) -> Localizer | TwoStageLocalizer:
        hp = self.hparams
        if hp.head != "rpn_rcnn":
            return Localizer(self.make_backbone(num_classes=hp.num_classes), head=hp.head, anchor_sizes=hp.anchor_sizes)
        body = self.make_backbone(num_classes=0)  # the R-CNN's: its two sibling layers replace the classifier
        rpn = Localizer(build_backbone(hp.backbone, num_classes=hp.num_classes, **(hp.backbone_args or {})),
                        head="rpn", anchor_sizes=hp.anchor_sizes)  # fmt: skip
        scorer = RegionScorer(body, hp.num_classes, crop=hp.rcnn_crop, regions=hp.rcnn_regions)
        return TwoStageLocalizer(rpn, scorer, proposals=hp.rcnn_proposals)

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage == "fit" and self.hparams.head == "rpn_rcnn":
            self._load_rpn_stage()

    def _load_rpn_stage(self) -> None:
        """The RPN stage's weights from ``rpn_weights`` (a checkpoint of this task with the ``rpn`` head)."""
        path = self.hparams.rpn_weights
        if not path:
            raise ValueError(
                "model.head=rpn_rcnn trains the R-CNN stage on a trained RPN localizer's proposals: pass "
                "--model.rpn_weights <a tasks.localize checkpoint trained with --model.head rpn>"
            )
        record = read_task_checkpoint(path)
        state = {k[len("model.") :]: v for k, v in record.state_dict.items() if k.startswith("model.")}
        if record.hyper_parameters.get("head", "rpn") != "rpn" or not state:
            raise ValueError(
                f"model.rpn_weights: {path} is not a localizer with the rpn head (it is of "
                f"{record.task or 'an unknown task'}, head {record.hyper_parameters.get('head')!r}): train the RPN "
                "stage with python -m tasks.localize fit --model.head rpn, and pass its checkpoint"
            )
        try:
            self.model.rpn.load_state_dict(state)
        except RuntimeError as err:
            raise ValueError(
                f"model.rpn_weights: {path} does not fit model.backbone={self.hparams.backbone} with "
                f"{self.hparams.num_classes} classes: {str(err).splitlines()[0]}"
            ) from None

    def configure_metrics(self) -> None:
        n = self.hparams.num_classes
        for split in EVAL_SPLITS:
            metrics = MetricCollection({
                "acc1": MulticlassAccuracy(num_classes=n, top_k=1, average="micro"),
                "acc5": MulticlassAccuracy(num_classes=n, top_k=min(5, n), average="micro"),
            })  # fmt: skip
            setattr(self, f"{split}_metrics", metrics.clone(prefix=f"{split}/"))
            names = ["loc_err_top5", "loc_err_gt"]
            if self.hparams.head == "rpn_rcnn":  # the RPN stage's own errors beside the two stages'
                names += ["rpn_loc_err_top5", "rpn_loc_err_gt"]
            setattr(self, f"{split}_errors", MetricCollection({name: MeanMetric() for name in names}))

    # -- steps ----------------------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int):
        self.count_skipped(batch)
        if "image" not in batch:
            return None
        out = self(batch["image"])
        labels = batch["label"]
        cls = F.cross_entropy(out["logits"], labels)
        box = self.model.box_loss(out, labels, batch["boxes"], tuple(batch["image"].shape[-2:]))
        loss = self.guard_loss(cls + self.hparams.box_weight * box, batch)
        n = len(labels)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=n)
        self.log_dict({"train/loss_cls": cls, "train/loss_box": box}, on_step=True, on_epoch=True, batch_size=n)
        return loss

    def _guesses(
        self, batch: dict, rpn_stage: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Logits, the top-5 classes and their scores, and their boxes in the original images' pixels (with
        ``ensemble``: the log of the members' averaged softmax, and each class's box averaged over them);
        ``rpn_stage``: the boxes of a two-stage localizer's RPN stage alone."""
        localizers = [m.model for m in self.member_tasks()] if self.members else [self.model]
        outs = [localizer(batch["image"]) for localizer in localizers]
        probs = torch.stack([out["logits"].float().softmax(1) for out in outs]).mean(0)
        logits = outs[0]["logits"] if len(outs) == 1 else probs.clamp_min(torch.finfo(probs.dtype).tiny).log()
        k = min(5, probs.shape[1])
        scores, classes = probs.topk(k, dim=1)
        size = tuple(batch["image"].shape[-2:])
        wanted = torch.cat([classes, batch["label"].clamp_min(0)[:, None]], dim=1)  # the five, then the true class
        boxes_for = [getattr(m, "rpn_boxes_for", m.boxes_for) if rpn_stage else m.boxes_for for m in localizers]
        boxes = torch.stack([f(out, wanted, size).double() for f, out in zip(boxes_for, outs)]).mean(0)
        boxes = (boxes + batch["offset"].repeat(1, 2)[:, None]) * batch["scale"].repeat(1, 2)[:, None]
        return logits, classes, scores, boxes

    def evaluate_batch(self, batch: dict, split: str) -> None:
        self.count_skipped(batch)
        if "image" not in batch:
            return
        logits, classes, _, boxes = self._guesses(batch)
        labels = batch["label"]
        metrics = getattr(self, f"{split}_metrics")
        metrics.update(logits, labels)
        self.log(
            f"{split}/loss", F.cross_entropy(logits, labels), on_epoch=True, sync_dist=True, batch_size=len(labels)
        )
        self.log_dict(metrics, on_epoch=True, batch_size=len(labels))
        errors = getattr(self, f"{split}_errors")
        # the devkit's blacklist: those images weigh nothing in the localization errors (their classification counts)
        scored = batch["loc_scored"].to(torch.float64) if "loc_scored" in batch else torch.ones(len(labels))
        stages = [("", boxes)]
        if self.hparams.head == "rpn_rcnn":
            stages.append(("rpn_", self._guesses(batch, rpn_stage=True)[3]))
        for prefix, found in stages:
            top5, known = [], []
            for b, truth in enumerate(batch["original_boxes"]):
                guesses = list(zip(classes[b].tolist(), found[b, :-1].tolist()))
                top5.append(top5_error(guesses, int(labels[b]), truth.numpy()))
                known.append(gt_known_error(found[b, -1].tolist(), truth.numpy()))
            errors[f"{prefix}loc_err_top5"].update(torch.tensor(top5, dtype=torch.float64), weight=scored)
            errors[f"{prefix}loc_err_gt"].update(torch.tensor(known, dtype=torch.float64), weight=scored)

    def reset_scores(self, split: str) -> None:
        getattr(self, f"{split}_errors").reset()

    def epoch_scores(self, split: str) -> None:
        errors = getattr(self, f"{split}_errors")
        values = {f"{split}/{name}": metric.compute().float() for name, metric in errors.items()}  # all ranks'
        errors.reset()
        self.log_dict(values, sync_dist=False)

    # -- prediction ------------------------------------------------------------------------------------
    def predictions(self, batch: dict) -> list[dict]:
        """Each image's five guesses: ``path``, ``classes`` (names), ``indices``, ``scores`` (softmax) and
        ``boxes`` (``5 x 4``, x1 y1 x2 y2 in the original image's pixels), best first. ``predict`` and the
        predictor both use it."""
        if "image" not in batch:
            return []
        _, classes, scores, boxes = self._guesses({**batch, "label": torch.zeros_like(batch["label"])})
        return [
            {
                "path": path,
                "classes": [self.class_name(int(c)) for c in classes[b]],
                "indices": [int(c) for c in classes[b]],
                "scores": [round(float(v), 6) for v in scores[b]],
                "boxes": boxes[b, :-1].float().cpu(),
            }
            for b, path in enumerate(batch["path"])
        ]

    def export_spec(self, data: dict[str, Any]) -> ExportSpec:
        """``image`` ``N x 3 x H x W`` (as for classification) to ``logits`` and the five best ``classes``,
        ``scores`` and ``boxes`` (input pixels); for one input size unless the anchors have fixed sizes."""
        return ExportSpec(
            TopGuesses(self.model), ("logits", "classes", "scores", "boxes"), batched=True,
            input="float32 N x 3 x H x W, RGB in [0, 1], then resized and normalized as zoo.preprocessing says",
            preprocessing=self.recorded_preprocessing(data),
            fixed_size="" if self.hparams.head == "regression" or self.hparams.anchor_sizes else (
                "the RPN head's anchors are sized from the input's shorter side, which the graph fixes"
            ),
        )  # fmt: skip

    def on_predict_epoch_start(self) -> None:
        self._rows = []

    def predict_step(self, batch: dict, batch_idx: int) -> None:
        self.count_skipped(batch)
        for found in self.predictions(batch):
            row = [found["path"]]
            for name, score, box in zip(found["classes"], found["scores"], found["boxes"].tolist()):
                row += [name, score, *[round(v, 1) for v in box]]
            self._rows.append(row)

    def on_predict_epoch_end(self) -> None:
        rows = sorted(row for part in gather_objects(self._rows) for row in part)
        if not self.trainer.is_global_zero:
            return
        path = self.output_path(self.predictions_file, "localizations.csv")
        path.parent.mkdir(parents=True, exist_ok=True)
        k = (len(rows[0]) - 1) // 6 if rows else 5
        header = ["path"] + [f"{f}{i}" for i in range(1, k + 1) for f in ("class", "score", "x1_", "y1_", "x2_", "y2_")]
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(header)
            writer.writerows(rows)
        print(f"localizations: {path} ({len(rows)} images)")


main = entry_point(LocalizationTask)


if __name__ == "__main__":
    script(main)
