"""Faster R-CNN detection with any zoo backbone: ``python -m tasks.detect fit|validate|test|predict``.

    python -m tasks.detect fit --config configs/coco_resnet101.yaml --data.root /data/coco
    python -m tasks.detect fit --config configs/coco_resnet101.yaml --model.backbone resnext101_32x8d
    python -m tasks.detect validate --config configs/coco_resnet50_fpn.yaml --ckpt_path runs/.../best.ckpt

Metrics are COCOeval's, computed against the annotation file: ``val/mAP`` (AP@[.5:.95]), ``val/AP50``,
``val/AP75``, ``val/APs``, ``val/APm``, ``val/APl``; ``train/loss`` and its four parts. The best
checkpoint is chosen by ``val/mAP``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from lightning.pytorch.cli import ArgsType, LRSchedulerCallable, OptimizerCallable
from torch import nn

from backbones import BackboneName
from backbones.base import NormKind
from backbones.weights import load_state_dict_checked

from .base import (
    RUNTIME_OPTIONS,
    ZERO_EPS_WEIGHTS,
    BaseTask,
    check_num_classes,
    classes_in,
    read_model_weights,
    set_frozen_bn_eps,
)
from .cli import TaskCLI, script
from .coco_eval import METRIC_NAMES, Backend, evaluate_detections, to_coco_results
from .detection_models import HeadKind, build_faster_rcnn
from .media import to_display

log = logging.getLogger(__name__)


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (a list with one entry per rank); ``[obj]`` without DDP."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


class DetectionTask(BaseTask):
    """Faster R-CNN (torchvision's components) over a zoo backbone, evaluated with COCOeval.

    Args:
        backbone: zoo name.
        backbone_args: any builder option of the backbone.
        head: ``fpn`` (feature pyramid) or ``c4`` (the ResNet paper's res4 trunk + per-region res5).
        num_classes: foreground classes; ``None`` takes the datamodule's categories.
        weights: a whole detector to start from: torchvision's ``FasterRCNN_ResNet50_FPN_Weights.COCO_V1``
            (with ``backbone: resnet50, head: fpn``; COCO's 91-index labels), a file holding such a state
            dict, or a checkpoint of this task. ``num_classes`` is taken from it.
        weights_backbone: backbone weights: torchvision name, weight file, or a ``tasks.classify``
            checkpoint (its classifier is dropped; a different backbone name is an error).
        norm: backbone normalization; detection freezes BN statistics (ResNet paper, Appendix A).
        freeze_at: stages frozen from the stem on (detectron2's ``freeze_at``: 2 = stem and res2).
        min_size: shorter side of the resized image (a list: one drawn per training image).
        max_size: cap of the longer side.
        anchor_sizes: anchor sizes in pixels (defaults follow the pyramid's strides).
        fpn_channels: FPN width.
        box_detections_per_img: detections kept per image.
        box_score_thresh: minimum score of a kept detection.
        detector_args: any other argument of torchvision's ``FasterRCNN`` (``rpn_post_nms_top_n_train``,
            ``box_batch_size_per_image``, ...); small images train much faster with fewer sampled regions.
        evaluator: ``faster_coco_eval`` (same numbers, faster) or ``pycocotools``.
        optimizer, scheduler, scheduler_interval, weight_decay_norm_bias, channels_last, compile:
            as for every task (``tasks.base.BaseTask``).
        nonfinite_loss: ``stop`` the run on a NaN/inf loss, naming the batch, or ``skip`` the batch.
        reference_batch_size: the global batch the optimizer's learning rate is meant for.
        scale_lr: scale the learning rate linearly with the actual global batch (Goyal et al. 2017).
        detections_file: where ``test`` and ``predict`` write COCO-format detections (JSON).
        draw_predictions: with ``predict``, also write images with the boxes drawn next to the file.
        log_samples: validation images logged to W&B with predicted and ground-truth boxes.
    """

    monitor = "val/mAP"
    mode = "max"
    #: batch shapes follow the images' sizes: timing cuDNN's algorithms for each new one costs more than it saves
    cudnn_benchmark = False

    def __init__(
        self,
        backbone: BackboneName = "resnet50",
        backbone_args: dict[str, Any] | None = None,
        head: HeadKind = "fpn",
        num_classes: int | None = None,
        weights: str | None = None,
        weights_backbone: str | None = None,
        norm: NormKind = "frozen_bn",
        freeze_at: int = 2,
        min_size: int | list[int] = 800,
        max_size: int = 1333,
        anchor_sizes: list[int] | None = None,
        fpn_channels: int = 256,
        box_detections_per_img: int = 100,
        box_score_thresh: float = 0.05,
        detector_args: dict[str, Any] | None = None,
        evaluator: Backend = "faster_coco_eval",
        optimizer: OptimizerCallable | None = None,
        scheduler: LRSchedulerCallable | None = None,
        scheduler_interval: Literal["epoch", "step"] = "step",
        weight_decay_norm_bias: bool = True,
        channels_last: bool | None = False,
        compile: bool = False,
        nonfinite_loss: Literal["stop", "skip"] = "stop",
        reference_batch_size: int | None = None,
        scale_lr: bool = False,
        detections_file: str | None = None,
        draw_predictions: bool = False,
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
            raise ValueError("set either model.weights (whole detector) or model.weights_backbone, not both")
        self.save_hyperparameters(
            ignore=["optimizer", "scheduler", "detections_file", "draw_predictions", *RUNTIME_OPTIONS]
        )
        self.detections_file = detections_file
        self.draw_predictions = draw_predictions
        self.log_samples = log_samples
        self.detector: nn.Module | None = None
        #: COCO category id of contiguous label k is category_ids[k - 1] (label 0 is the background)
        self.category_ids: list[int] | None = None
        self.class_names: list[str] | None = None
        self._weights_state: dict | None = None
        if weights:
            # torchvision's COCO detectors use COCO's 91-index label space: label k is category id k.
            state, meta = read_model_weights(weights, "detector.")
            found = classes_in(state, "roi_heads.box_predictor.cls_score.weight", weights, "Faster R-CNN") - 1
            self.hparams.num_classes = num_classes = check_num_classes(num_classes, found, weights)
            self.category_ids = meta.get("category_ids") or list(range(1, found + 1))
            categories = meta.get("categories")
            self.class_names = meta.get("class_names") or (list(categories[1:]) if categories else None)
            self._weights_state = state
        if num_classes:
            self.configure_models()
        self._reset_eval()

    # -- construction -----------------------------------------------------------------------------
    def models_ready(self) -> bool:
        return self.detector is not None

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None and stage != "predict" and hasattr(datamodule, "category_ids"):
            ids = list(datamodule.category_ids)
            if self.hparams.num_classes is None:
                self.hparams.num_classes = len(ids)
            elif self.hparams.num_classes != len(ids) and self.category_ids is None:
                raise ValueError(
                    f"model.num_classes={self.hparams.num_classes} but the annotations have {len(ids)} "
                    f"categories; remove model.num_classes to take it from the data"
                )
            if self.category_ids is None:
                self.category_ids = ids
                self.class_names = list(datamodule.class_names)
        self.require_num_classes(stage)
        super().setup(stage)

    def configure_models(self) -> None:
        hp = self.hparams
        body = self.make_backbone(hp.backbone, hp.backbone_args, hp.weights_backbone, norm=hp.norm)
        body.freeze(hp.freeze_at)
        self.backbone_name = body.name
        self.detector = build_faster_rcnn(
            body,
            head=hp.head,
            num_classes=hp.num_classes + 1,
            min_size=hp.min_size if isinstance(hp.min_size, int) else tuple(hp.min_size),
            max_size=hp.max_size,
            anchor_sizes=hp.anchor_sizes,
            fpn_channels=hp.fpn_channels,
            box_detections_per_img=hp.box_detections_per_img,
            box_score_thresh=hp.box_score_thresh,
            **(hp.detector_args or {}),
        )
        if self._weights_state is not None:
            load_state_dict_checked(self.detector, self._weights_state, f"weights={hp.weights!r}")
            self._weights_state = None
            if hp.weights in ZERO_EPS_WEIGHTS:
                set_frozen_bn_eps(self.detector, 0.0)

    def compile_targets(self) -> list[nn.Module]:
        return [self.detector.backbone]

    def label_to_category(self) -> list[int]:
        """COCO category id of each label (index 0, the background, maps to 0)."""
        ids = self.category_ids or list(range(1, self.hparams.num_classes + 1))  # default: ids are labels
        return [0, *ids]

    def _labels_for(self, category_ids: torch.Tensor) -> torch.Tensor:
        lookup = {cid: k for k, cid in enumerate(self.label_to_category()) if k}
        try:
            return torch.tensor([lookup[int(c)] for c in category_ids], dtype=torch.int64, device=category_ids.device)
        except KeyError as err:
            raise ValueError(
                f"category id {err.args[0]} is not one of the model's {self.label_to_category()[1:]}"
            ) from None

    def forward(self, images: list[torch.Tensor], targets: list[dict] | None = None):
        return self.detector(images, targets)

    # -- training -----------------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int):
        if not batch["images"]:
            return None
        targets = [{"boxes": t["boxes"], "labels": self._labels_for(t["labels"])} for t in batch["targets"]]
        losses = self(batch["images"], targets)
        loss = self.guard_loss(sum(losses.values()), batch)
        n = len(batch["images"])
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=n)
        self.log_dict({f"train/{k}": v for k, v in losses.items()}, on_step=True, on_epoch=True, batch_size=n)
        self.log_learning_rate()
        return loss

    # -- evaluation ---------------------------------------------------------------------------------
    def _reset_eval(self) -> None:
        self._results: list[dict] = []
        self._image_ids: list[int] = []
        self._samples: list[tuple] = []

    def on_validation_epoch_start(self) -> None:
        self._reset_eval()

    def on_test_epoch_start(self) -> None:
        self._reset_eval()

    def _detect(self, batch: dict) -> list[dict]:
        outputs = self(batch["images"])
        for image_id, out in zip(batch["image_ids"], outputs):
            self._image_ids.append(int(image_id))
            self._results.extend(
                to_coco_results(out["boxes"], out["scores"], out["labels"], image_id, self.label_to_category())
            )
        return outputs

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        outputs = self._detect(batch)
        want = self.log_samples - len(self._samples)
        if want > 0 and self.wandb_loggers():
            for image, out, target in list(zip(batch["images"], outputs, batch["targets"]))[:want]:
                keep = out["scores"] > 0.3
                self._samples.append(
                    (image.cpu(), out["boxes"][keep].cpu(), out["labels"][keep].cpu(), out["scores"][keep].cpu(),
                     target["boxes"].cpu(), self._labels_for(target["labels"]).cpu())
                )  # fmt: skip

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._detect(batch)

    def _gathered(self) -> tuple[list[dict], list[int]]:
        """All ranks' detections, each image counted once (DDP's padding may repeat images)."""
        parts = gather_objects((self._image_ids, self._results))
        seen: set[int] = set()
        results: list[dict] = []
        for image_ids, rows in parts:
            new = set(image_ids) - seen
            results.extend(r for r in rows if r["image_id"] in new)
            seen |= new
        return results, sorted(seen)

    def _evaluate(self, split: str) -> None:
        results, image_ids = self._gathered()
        stats = [0.0] * 12
        if self.trainer.is_global_zero and image_ids:
            annotation_file = self.trainer.datamodule.annotation_file(split)
            stats = evaluate_detections(annotation_file, results, image_ids, self.hparams.evaluator)
        stats = self.trainer.strategy.broadcast(stats, src=0)
        prefix = "val" if split == "val" else "test"
        self.log_dict({f"{prefix}/{name}": float(v) for name, v in zip(METRIC_NAMES, stats)}, sync_dist=False)
        self.last_results = results
        if split == "test" and self.trainer.is_global_zero:
            self._write_detections(results)

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            self._reset_eval()
            return
        self._evaluate("val")
        self._log_box_samples()

    def on_test_epoch_end(self) -> None:
        self._evaluate("test")

    def _log_box_samples(self) -> None:
        samples, self._samples = self._samples, []
        loggers = self.wandb_loggers()
        if not samples or not loggers:
            return
        import wandb

        names = {k + 1: n for k, n in enumerate(self.class_names or [])}

        def boxes(b, labels, scores=None):
            out = []
            for i, (box, label) in enumerate(zip(b.tolist(), labels.tolist())):
                entry = {
                    "position": {"minX": box[0], "minY": box[1], "maxX": box[2], "maxY": box[3]},
                    "domain": "pixel",
                    "class_id": int(label),
                    "box_caption": names.get(int(label), str(label)),
                }
                if scores is not None:
                    entry["scores"] = {"score": float(scores[i])}
                    entry["box_caption"] += f" {float(scores[i]):.2f}"
                out.append(entry)
            return out

        images = [
            wandb.Image(
                to_display(image).numpy(),
                boxes={
                    "predictions": {"box_data": boxes(pb, pl, ps), "class_labels": names},
                    "ground_truth": {"box_data": boxes(gb, gl), "class_labels": names},
                },
            )
            for image, pb, pl, ps, gb, gl in samples
        ]
        for logger in loggers:
            logger.experiment.log({"val/samples": images, "trainer/global_step": self.global_step})

    # -- prediction and result files ------------------------------------------------------------------
    def _output_path(self, default: str) -> Path:
        return Path(self.detections_file) if self.detections_file else Path(self.trainer.default_root_dir) / default

    def _write_detections(self, results: list[dict], name: str = "detections.json") -> Path:
        path = self._output_path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results))
        print(f"detections: {path} ({len(results)} boxes)")
        return path

    def on_predict_epoch_start(self) -> None:
        self._reset_eval()
        self._files: dict[int, str] = {}

    def predict_step(self, batch: dict, batch_idx: int) -> list[dict]:
        outputs = self._detect(batch)
        self._files.update({int(i): p for i, p in zip(batch["image_ids"], batch["paths"])})
        if self.draw_predictions:
            self._draw(batch, outputs)
        return outputs

    def on_predict_epoch_end(self) -> None:
        parts = gather_objects((self._results, self._files))
        if not self.trainer.is_global_zero:
            return
        files: dict[int, str] = {}
        results: list[dict] = []
        for rows, names in parts:
            files.update(names)
            results.extend(rows)
        for row in results:
            row["file_name"] = files[row["image_id"]]
        self._write_detections(sorted(results, key=lambda r: (r["image_id"], -r["score"])))

    def _draw(self, batch: dict, outputs: list[dict]) -> None:
        from torchvision.io import write_jpeg
        from torchvision.utils import draw_bounding_boxes

        folder = self._output_path("detections.json").with_suffix("")
        folder = folder.parent / f"{folder.name}_images"
        folder.mkdir(parents=True, exist_ok=True)
        for image, out, path in zip(batch["images"], outputs, batch["paths"]):
            keep = out["scores"] > 0.5
            labels = [
                f"{self._name(int(lbl))} {float(s):.2f}" for lbl, s in zip(out["labels"][keep], out["scores"][keep])
            ]
            canvas = (image.detach().cpu().clamp(0, 1) * 255).to(torch.uint8)
            drawn = (
                draw_bounding_boxes(canvas, out["boxes"][keep].cpu(), labels=labels, colors="red", width=2)
                if keep.any()
                else canvas
            )
            write_jpeg(drawn, str(folder / f"{Path(path).stem}.jpg"), quality=90)

    def _name(self, label: int) -> str:
        if self.class_names and 1 <= label <= len(self.class_names):
            return self.class_names[label - 1]
        return str(label)

    # -- checkpoints ----------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["category_ids"] = list(self.category_ids or [])
        checkpoint["class_names"] = [str(n) for n in (self.class_names or [])]

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        if checkpoint.get("category_ids"):
            self.category_ids = list(checkpoint["category_ids"])
            self.class_names = list(checkpoint.get("class_names") or []) or None


def main(args: ArgsType = None) -> TaskCLI:
    """Entry point; ``main([...])`` runs the CLI in-process."""
    return TaskCLI(DetectionTask, args=args)


if __name__ == "__main__":
    script(main)
