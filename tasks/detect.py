"""Faster R-CNN detection with any zoo backbone: ``python -m tasks.detect fit|validate|test|predict``.

    python -m tasks.detect fit --config configs/coco_resnet101.yaml --data.root /data/coco
    python -m tasks.detect fit --config configs/coco_resnet101.yaml --model.backbone resnext101_32x8d
    python -m tasks.detect validate --config configs/coco_resnet50_fpn.yaml --ckpt_path runs/.../best.ckpt

Metrics are the dataset's official ones (its datamodule's ``protocol``): on COCO, COCOeval's against the
annotation file -- ``val/mAP`` (AP@[.5:.95]), ``val/AP50``, ``val/AP75``, ``val/APs``, ``val/APm``,
``val/APl``, and per class ``val/AP/<class>``, ``val/AP50/<class>``; on PASCAL VOC and ILSVRC DET, their
devkits' mean AP at IoU 0.5 as ``val/mAP`` (and ``val/AP50``) and per class ``val/AP/<class>``
(``tasks.metrics.devkits``). ``train/loss`` and its four parts. The best checkpoint is chosen by
``val/mAP``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from backbones.base import NormKind
from zoo_common.distributed import gather_objects

from .core.base import BaseTask
from .core.contract import ExportSpec
from .core.loops import data_split
from .core.optim import Recipe
from .heads.entries import detect_with
from .heads.exportable import OneImageDetector, traceable_detector
from .heads.faster_rcnn import HeadKind, build_faster_rcnn
from .inference.ensemble import EnsembleOption
from .metrics.coco import Backend, to_coco_results
from .metrics.protocols import protocol
from .outputs.class_tables import per_class_table
from .outputs.media import class_map, wandb_boxes, wandb_mask
from .outputs.pr_curves import log_pr_curves
from .outputs.writers import draw_detections, images_folder, write_detections
from .run.cli import entry_point, script

log = logging.getLogger(__name__)

#: torchvision weights trained with ``FrozenBatchNorm2d(eps=0)``: torchvision's builders set eps to 0 when
#: loading them (``overwrite_eps``), and so do we, to reproduce their outputs exactly.
ZERO_EPS_WEIGHTS: frozenset[str] = frozenset(
    {"FasterRCNN_ResNet50_FPN_Weights.COCO_V1", "MaskRCNN_ResNet50_FPN_Weights.COCO_V1"}
)


class DetectionTask(EnsembleOption, BaseTask):
    """Faster R-CNN (torchvision's components) over a zoo backbone, evaluated with COCOeval.

    The shared arguments are :class:`tasks.core.base.BaseTask`'s. ``num_classes`` counts foreground classes;
    ``weights`` is a whole detector: torchvision's ``FasterRCNN_ResNet50_FPN_Weights.COCO_V1`` (with
    ``backbone: resnet50, head: fpn``; COCO's 91-index labels), a file holding such a state dict, or a
    checkpoint of this task.

    Args:
        head: ``fpn`` (feature pyramid) or ``c4`` (the ResNet paper's res4 trunk + per-region res5).
        norm: backbone normalization; detection freezes BN statistics (ResNet paper, Appendix A).
        freeze_at: stages frozen from the stem on (detectron2's ``freeze_at``: 2 = stem and res2).
        min_size: shorter side of the resized image; a list draws one per training image (detectron2's
            multi-scale training: 640, 672, 704, 736, 768, 800) and tests at the last.
        max_size: cap of the longer side.
        anchor_sizes: anchor sizes in pixels (defaults follow the pyramid's strides).
        fpn_channels: FPN width.
        roi_align_aligned: RoIAlign with detectron2's half-pixel offset (its ``ROIAlignV2``); ``false`` is
            torchvision's original, which its published detectors need.
        global_context: the C4 head with the whole image as one more RoI through res5, its feature beside each
            region's before the class and box layers (Appendix A; ``tasks.heads.faster_rcnn.ContextBoxHead``).
        box_detections_per_img: detections kept per image.
        box_score_thresh: minimum score of a kept detection.
        detector_args: any other argument of torchvision's ``FasterRCNN`` (``rpn_post_nms_top_n_train``,
            ``box_batch_size_per_image``, ...); small images train much faster with fewer sampled regions.
        evaluator: ``faster_coco_eval`` (same numbers, faster) or ``pycocotools``.
        draw_predictions: with ``predict``, also write images with the boxes drawn next to the file (one
            color per class, labels that do not overlap, images under 256 px upscaled: ``tasks.outputs.drawing``).
        draw_threshold: the lowest score drawn in those images.
        tta: test-time augmentation in evaluation and ``predict`` (``tasks.heads.tta``): the views below, merged.
        tta_scales: the views' scales (of the evaluation size); ``[1.0]`` by default.
        tta_flip: also each view mirrored left to right.
        box_refinement: at inference, the box head run again on each regressed box, the two passes' predictions
            merged by NMS at IoU 0.3 and box voting (the ResNet paper's COCO entry, Appendix A;
            ``tasks.heads.refinement``); training is unchanged.
        ensemble: checkpoints of this task evaluated and predicting as one detector: the union of their RPNs'
            proposals, every member's head on it, scores and boxes averaged (Appendix A; ``tasks.heads.ensemble``,
            ``tasks.inference.ensemble``); not with ``fit``, ``--ckpt_path``, ``tta``, ``box_refinement`` or
            ``multiscale_testing``.
        multiscale_testing: the image pyramid's shorter sides (the paper's ``[200, 400, 600, 800, 1000]``): each
            region's features at its two nearest-sized scales merged by maxout (``tasks.heads.multiscale``).
        multiscale_target: the region size (px) those two scales bracket: the pre-trained network's input, 224.
        detections_file: where ``test`` and ``predict`` write COCO-format detections (JSON).
    """

    kind = "detect"
    monitor = "val/mAP"
    mode = "max"
    supports_tta = True
    #: batch shapes follow the images' sizes: timing cuDNN's algorithms for each new one costs more than it saves
    cudnn_benchmark = False
    network_attr = "detector"
    classifier_key = "roi_heads.box_predictor.cls_score.weight"
    background_rows = 1
    network_kind = "Faster R-CNN"
    #: detectron2's Faster R-CNN schedule, for a backbone that starts from trained weights: lr 0.02 per 16
    #: images, 1000 steps of linear warm-up from 0.001x, ÷10 at 60k and 80k of 90k steps (2/3 and 8/9 of the run)
    finetune_recipe = Recipe(
        "detectron2's Faster R-CNN", lr=0.02, images=16, decay="steps", milestones=(2 / 3, 8 / 9), warmup_steps=1000
    )
    #: from scratch (BN learned in every layer) the same schedule at a higher rate for small batches: 0.01 at
    #: 2 images a step, linear below and never above 0.01. The rate scaled to 2 images (0.0025) under-trains:
    #: on handwritten digits drawn into 160-px scenes (the issue's command, 6 epochs) AP50 0.82 against 0.85
    #: after 3 epochs at 0.01; 0.02 (configs/demo_detect.yaml's rate at 4 images) diverged (a NaN loss at step
    #: 45) on the 96-px VOC-layout shapes of tests/test_tracks.py
    scratch_recipe = Recipe(
        "detectron2's schedule from scratch", lr=0.01, images=2, max_lr=0.01, decay="steps",
        milestones=(2 / 3, 8 / 9), warmup_steps=1000,
    )  # fmt: skip

    @property
    def recipe(self) -> Recipe:
        """detectron2's recipe from trained weights; from scratch, the same schedule at a higher rate."""
        return self.finetune_recipe if self.starts_from_weights() else self.scratch_recipe

    default_scheduler_interval = "step"
    default_channels_last = False
    #: the network's builder (``tasks.heads``): instance segmentation's adds the mask branch
    build_detector = staticmethod(build_faster_rcnn)
    #: what each detection holds, the outputs of the exported graph in this order
    detection_keys: tuple[str, ...] = ("boxes", "labels", "scores")
    #: the COCOeval runs of a COCO-scored split: ``(iouType, prefix of the metric names)``
    coco_iou_types: tuple[tuple[str, str], ...] = (("bbox", ""),)
    inference_options = ("box_refinement", "ensemble", "multiscale_testing", "multiscale_target")
    output_options = ("detections_file", "draw_predictions", "draw_threshold", "tta", "tta_scales", "tta_flip",
                      *inference_options)  # fmt: skip

    def __init__(
        self,
        head: HeadKind = "fpn",
        norm: NormKind = "frozen_bn",
        freeze_at: int = 2,
        min_size: int | list[int] = 800,
        max_size: int = 1333,
        anchor_sizes: list[int] | None = None,
        fpn_channels: int = 256,
        roi_align_aligned: bool = False,
        global_context: bool = False,
        box_detections_per_img: int = 100,
        box_score_thresh: float = 0.05,
        detector_args: dict[str, Any] | None = None,
        evaluator: Backend = "faster_coco_eval",
        draw_predictions: bool = False,
        draw_threshold: float = 0.5,
        tta: bool = False,
        tta_scales: list[float] | None = None,
        tta_flip: bool = True,
        box_refinement: bool = False,
        ensemble: list[str] | None = None,
        multiscale_testing: list[int] | None = None,
        multiscale_target: int = 224,
        detections_file: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.box_refinement, self.ensemble, self.multiscale_testing = box_refinement, ensemble, multiscale_testing
        self.multiscale_target = multiscale_target
        self.detections_file = detections_file
        self.draw_predictions = draw_predictions
        self.draw_threshold = draw_threshold
        self.tta = (tta_scales or [1.0], tta_flip) if tta else None
        self._results: dict[str, list[dict]] = {}  # per split, in COCO's result format
        self._image_ids: dict[str, list[int]] = {}

    # -- construction -----------------------------------------------------------------------------
    def labels_from_weights(self, meta: dict, found: int) -> None:
        """torchvision's COCO detectors use COCO's 91-index label space: label k is category id k."""
        categories = meta.get("categories")
        self.category_ids = meta.get("category_ids") or list(range(1, found + 1))
        self.class_names = meta.get("class_names") or (list(categories[1:]) if categories else None)

    def build_network(self) -> nn.Module:
        hp = self.hparams
        body = self.make_backbone(norm=hp.norm)
        body.freeze(hp.freeze_at)
        return self.build_detector(
            body,
            head=hp.head,
            num_classes=hp.num_classes + 1,
            min_size=hp.min_size if isinstance(hp.min_size, int) else tuple(hp.min_size),
            max_size=hp.max_size,
            anchor_sizes=hp.anchor_sizes,
            fpn_channels=hp.fpn_channels,
            aligned=hp.roi_align_aligned,
            global_context=hp.global_context,
            box_detections_per_img=hp.box_detections_per_img,
            box_score_thresh=hp.box_score_thresh,
            **self.network_options(),
            **(hp.detector_args or {}),
        )

    def network_options(self) -> dict[str, Any]:
        """More arguments of :attr:`build_detector` from this task's own (none; the mask branch's width)."""
        return {}

    def on_weights_loaded(self, source: str) -> None:
        if source in ZERO_EPS_WEIGHTS:
            for m in self.detector.modules():
                if isinstance(m, FrozenBatchNorm2d):
                    m.eps = 0.0

    def compile_targets(self) -> list[nn.Module]:
        return [self.detector.backbone]  # the backbone and its pyramid

    def detached_stages(self) -> nn.Module | None:
        box_head = self.detector.roi_heads.box_head
        return getattr(box_head, "res5", None)  # the C4 head runs the last stage per region

    @classmethod
    def refuse_arguments(cls, subcommand: str, model: dict[str, Any], ckpt_path: str | None) -> None:
        """A ``fit`` from random weights (not resumed) with frozen BatchNorm or frozen stages trains a random
        network (a loss of ~1e26 at the first step, then NaN): refused, naming the flags that train a backbone
        from scratch."""
        super().refuse_arguments(subcommand, model, ckpt_path)
        if subcommand != "fit" or ckpt_path or model.get("weights") or model.get("weights_backbone"):
            return
        norm, freeze_at = model.get("norm", "frozen_bn"), model.get("freeze_at", 2)
        if norm == "frozen_bn" or (freeze_at or 0) > 0:
            raise ValueError(
                f"model.norm={norm} and model.freeze_at={freeze_at} freeze BatchNorm statistics and the first stages, "
                f"which suits trained weights only, and no model.weights or model.weights_backbone is given: a "
                f"random network would train. From scratch, pass --model.norm bn --model.freeze_at 0 (or give "
                f"--model.weights_backbone <file>)"
            )

    def label_to_category(self) -> list[int]:
        """Dataset category id of each label (index 0, the background, maps to 0)."""
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

    def detect(self, images: list[torch.Tensor]) -> list[dict]:
        """Detections on ``images`` (in their pixels), with the inference options on (``tasks.heads.entries``:
        ``ensemble``, ``box_refinement``, ``multiscale_testing``, ``tta``)."""
        if not images:
            return []
        members = self.member_networks() if self.members else None
        return detect_with(self.detector, images, box_refinement=self.box_refinement, pyramid=self.multiscale_testing,
                           tta=self.tta, members=members, target=self.multiscale_target)  # fmt: skip

    # -- training -----------------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int):
        self.count_skipped(batch)
        if not batch["images"]:
            return None
        targets = [{**t, "labels": self._labels_for(t["labels"])} for t in batch["targets"]]  # (and masks)
        losses = self(batch["images"], targets)
        loss = self.guard_loss(sum(losses.values()), batch)
        n = len(batch["images"])
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=n)
        self.log_dict({f"train/{k}": v for k, v in losses.items()}, on_step=True, on_epoch=True, batch_size=n)
        return loss

    # -- evaluation ---------------------------------------------------------------------------------
    def reset_scores(self, split: str) -> None:
        """Forget ``split``'s detections (``predict`` keeps its own under ``predict``)."""
        self._results[split], self._image_ids[split] = [], []

    def evaluate_batch(self, batch: dict, split: str) -> list[dict]:
        """Detect, and keep the detections in COCO's result format for the split's evaluation."""
        self.count_skipped(batch)
        outputs = self.detect(batch["images"])
        self.record_detections(batch, outputs, split)
        return outputs

    def record_detections(self, batch: dict, outputs: list[dict], split: str) -> None:
        """Keep a batch's detections in COCO's result format for the split's evaluation (or predict's file)."""
        if split not in self._results:
            self.reset_scores(split)
        for image_id, out in zip(batch["image_ids"], outputs):
            self._image_ids[split].append(int(image_id))
            self._results[split].extend(
                to_coco_results(
                    out["boxes"], out["scores"], out["labels"], image_id, self.label_to_category(), out.get("masks")
                )
            )

    def predictions(self, batch: dict) -> list[dict]:
        """Each image's ``path`` and detections: ``boxes`` (``K x 4``, x1 y1 x2 y2 in the original image's
        pixels), ``labels`` (network classes, 1-based), ``classes`` (their names) and ``scores``, best
        first; with a mask branch, ``masks`` too (``K x H x W`` booleans at the image's size: the pixels whose
        mask probability is above 0.5). ``predict`` and ``tasks.inference.predictor`` both use it."""
        outputs = self.detect(batch["images"])
        rows = []
        for path, out in zip(batch["paths"], outputs):
            row = {
                "path": path,
                "boxes": out["boxes"].float().cpu(),
                "labels": out["labels"].cpu(),
                "classes": [self.class_name(int(k)) for k in out["labels"]],
                "scores": out["scores"].float().cpu(),
            }
            if "masks" in out:
                row["masks"] = out["masks"][:, 0].cpu() > 0.5
            rows.append(row)
        return rows

    def sample_records(self, batch: dict, outputs: list[dict]) -> list[dict]:
        """Validation images with the boxes scoring above 0.3 and the ground truth, for W&B; with a mask
        branch, those boxes' masks and the true ones too (each pixel the class of the last instance over it)."""
        names = {k + 1: n for k, n in enumerate(self.class_names or [])}
        records = []
        for image, out, target in zip(batch["images"], outputs, batch["targets"]):
            keep = out["scores"] > 0.3
            labels, true_labels = out["labels"][keep].cpu(), self._labels_for(target["labels"]).cpu()
            predicted = wandb_boxes(out["boxes"][keep].cpu(), labels, names, out["scores"][keep])
            truth = wandb_boxes(target["boxes"].cpu(), true_labels, names)
            record = {"image": image.cpu(), "boxes": {"predictions": predicted, "ground_truth": truth}}
            if "masks" in out and "masks" in target:
                record["masks"] = {
                    "predictions": wandb_mask(class_map(out["masks"][keep].cpu()[:, 0] > 0.5, labels), names),
                    "ground_truth": wandb_mask(class_map(target["masks"].cpu().bool(), true_labels), names),
                }
            records.append(record)
        return records

    def _gathered(self, split: str) -> tuple[list[dict], list[int]]:
        """All ranks' detections, each image counted once (DDP's padding may repeat images)."""
        seen: set[int] = set()
        results: list[dict] = []
        for image_ids, rows in gather_objects((self._image_ids[split], self._results[split])):
            new = set(image_ids) - seen
            results.extend(r for r in rows if r["image_id"] in new)
            seen |= new
        return results, sorted(seen)

    def epoch_scores(self, split: str) -> None:
        """The split's official metrics on all ranks' detections, logged as ``<split>/<metric>``, and their
        precision-recall curves drawn (``tasks.outputs.pr_curves``); the test split's detections are written
        to ``detections_file`` too. A COCO-scored split is evaluated once per :attr:`coco_iou_types` (boxes;
        and masks, as ``mask_<metric>``, for instance segmentation)."""
        if split not in self._results:
            self.reset_scores(split)
        results, image_ids = self._gathered(split)
        scoring = protocol(self.trainer.datamodule.protocol)
        runs = self.coco_iou_types if scoring.name == "coco" else (("bbox", ""),)
        metrics = {f"{prefix}{name}": 0.0 for _, prefix in runs for name in scoring.metric_names}
        if self.trainer.is_global_zero and image_ids:
            ids = self.label_to_category()[1:]
            names = {cid: self.class_name(k) for k, cid in enumerate(ids, start=1)}
            for iou_type, prefix in runs:
                curves: list = []
                options = {"iou_type": iou_type} if iou_type != "bbox" else {}
                found = scoring.score(
                    self.trainer.datamodule, data_split(split), results, image_ids, names, self.hparams.evaluator,
                    curves=curves, **options,
                )  # fmt: skip
                metrics.update({f"{prefix}{name}": value for name, value in found.items()})
                log_pr_curves(self, split, curves, names, prefix=prefix)
        metrics = self.trainer.strategy.broadcast(metrics, src=0)
        self.log_dict({f"{split}/{name}": float(v) for name, v in metrics.items()}, sync_dist=False)
        self.last_results = results
        self.reset_scores(split)
        if self.trainer.is_global_zero:
            kinds = [prefix for _, prefix in self.coco_iou_types]
            per_class_table(split, metrics, kinds, self.wandb_loggers(), self.global_step)
            if split == "test":
                write_detections(results, self.output_path(self.detections_file, "detections.json"))

    # -- export ---------------------------------------------------------------------------------------
    def export_spec(self, data: dict[str, Any]) -> ExportSpec:
        """One ``3 x H x W`` image in [0, 1] (resized and normalized inside the graph) to its detections."""
        hp = self.hparams
        return ExportSpec(
            OneImageDetector(self.detector, self.detection_keys), self.detection_keys, batched=False,
            input="float32 3 x H x W, RGB in [0, 1]; resized and normalized inside the graph",
            preprocessing={"in_graph": True, "min_size": hp.min_size, "max_size": hp.max_size}, warm_up=True,
        )  # fmt: skip

    def export_size(self, data: dict[str, Any]) -> tuple[int, int]:
        """The detector's evaluation ``min_size``."""
        side = self.hparams.min_size if isinstance(self.hparams.min_size, int) else max(self.hparams.min_size)
        return int(side), int(side)

    def export_context(self):
        """torchvision's NMS and resize without data-dependent branches (``tasks.heads.exportable``)."""
        return traceable_detector()

    # -- prediction -----------------------------------------------------------------------------------
    def on_predict_epoch_start(self) -> None:
        self.reset_scores("predict")
        self._files: dict[int, str] = {}

    def predict_step(self, batch: dict, batch_idx: int) -> list[dict]:
        self.count_skipped(batch)
        outputs = self.predictions(batch)
        self.record_detections(batch, outputs, "predict")
        self._files.update({int(i): p for i, p in zip(batch["image_ids"], batch["paths"])})
        if self.draw_predictions:
            folder = images_folder(self.output_path(self.detections_file, "detections.json"))
            names = [self.class_name(k) for k in range(self.hparams.num_classes + 1)]
            for image, out, path in zip(batch["images"], outputs, batch["paths"]):
                draw_detections(image, out, names, folder / f"{Path(path).stem}.jpg", self.draw_threshold)
        return outputs

    def on_predict_epoch_end(self) -> None:
        parts = gather_objects((self._results["predict"], self._files))
        if not self.trainer.is_global_zero:
            return
        files: dict[int, str] = {}
        results: list[dict] = []
        for rows, names in parts:
            files.update(names)
            results.extend(rows)
        for row in results:
            row["file_name"] = files[row["image_id"]]
        results.sort(key=lambda r: (r["image_id"], -r["score"]))
        path = write_detections(results, self.output_path(self.detections_file, "detections.json"))
        if self.draw_predictions:
            print(f"drawings: {images_folder(path)} ({len(files)} images, boxes scoring {self.draw_threshold} or more)")


main = entry_point(DetectionTask)


if __name__ == "__main__":
    script(main)
