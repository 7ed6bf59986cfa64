"""Mask R-CNN instance segmentation with any zoo backbone:
``python -m tasks.instance_segment fit|validate|test|predict``.

    python -m tasks.instance_segment fit --config configs/coco_mask_rcnn_resnet50_fpn.yaml --data.root /data/coco
    python -m tasks.instance_segment fit --config configs/coco_mask_rcnn_resnet101_c4.yaml
    python -m tasks.instance_segment validate --config configs/coco_torchvision_maskrcnn_r50_fpn.yaml

COCO's 2015 segmentation track as it was scored: COCOeval with ``iouType="segm"`` on the annotation file, AP
over each object's mask, crowd regions ignored. Logged: the boxes' metrics under detection's names
(``val/mAP``, ``val/AP50``, ...) and the masks' as ``val/mask_mAP``, ``val/mask_AP50``, ``val/mask_AP75``,
``val/mask_APs``, ``val/mask_APm``, ``val/mask_APl`` (and ``mask_AR*``), per class ``val/mask_AP/<class>``
and ``val/mask_AP50/<class>``; ``train/loss`` and its five parts (``train/loss_mask`` among them). The best
checkpoint is chosen by ``val/mask_mAP``.

Everything but the network and the masks is detection's (``tasks.detect.DetectionTask``: the arguments, the
recipes, the label maps, the COCO results, TTA, export, prediction); the network is
``tasks.heads.mask_rcnn.build_mask_rcnn``.
"""

from __future__ import annotations

from typing import Any

from .core.contract import ExportSpec
from .detect import DetectionTask
from .heads.mask_rcnn import build_mask_rcnn
from .run.cli import entry_point, script


class InstanceSegmentationTask(DetectionTask):
    """Mask R-CNN (torchvision's components; the C4 or FPN head of the paper) over a zoo backbone, scored by
    COCOeval's ``bbox`` and ``segm``.

    The arguments are :class:`tasks.detect.DetectionTask`'s (``head``, ``norm``, ``freeze_at``, ``min_size``,
    ``max_size``, ``detector_args`` -- here any argument of torchvision's ``MaskRCNN`` --, ``tta``, ...).
    ``weights`` is a whole Mask R-CNN: torchvision's ``MaskRCNN_ResNet50_FPN_Weights.COCO_V1`` (with
    ``backbone: resnet50, head: fpn``; COCO's 91-index labels), a file holding such a state dict, or a
    checkpoint of this task. ``weights_backbone`` starts the backbone only (an ImageNet classifier, or a
    detection checkpoint's backbone).

    The data must be scored on a COCO annotation file (``datamodules.COCOInstanceDataModule``, or the
    embedded ``datamodules.ShapesInstanceDataModule``): masks have no devkit protocol here.
    ``detections_file`` (``test``, ``predict``) holds each instance's box and its mask as a compressed RLE.

    Args:
        mask_channels: the width of the mask branch's convolutions and deconvolution (the paper's 256).
    """

    kind = "instance_segment"
    monitor = "val/mask_mAP"
    network_kind = "Mask R-CNN"
    build_detector = staticmethod(build_mask_rcnn)
    detection_keys = ("boxes", "labels", "scores", "masks")
    coco_iou_types = (("bbox", ""), ("segm", "mask_"))

    def __init__(self, mask_channels: int = 256, **kwargs: Any) -> None:
        super().__init__(**kwargs)

    def network_options(self) -> dict[str, Any]:
        return {"mask_channels": self.hparams.mask_channels}

    def setup(self, stage: str) -> None:
        datamodule = self.trainer.datamodule
        if stage != "predict" and getattr(datamodule, "protocol", "coco") != "coco":
            raise ValueError(
                f"instance segmentation is scored by COCOeval's segm on a COCO annotation file, but "
                f"{type(datamodule).__name__} is scored by the {datamodule.protocol} protocol (boxes only); use "
                f"--data datamodules.COCOInstanceDataModule with COCO-format files"
            )
        super().setup(stage)

    def training_step(self, batch: dict, batch_idx: int):
        if batch["images"] and any("masks" not in t for t in batch["targets"]):
            raise ValueError(
                f"{type(self.trainer.datamodule).__name__} gives no masks; Mask R-CNN trains on instance masks: "
                f"use --data datamodules.COCOInstanceDataModule (COCO-format polygons or RLE)"
            )
        return super().training_step(batch, batch_idx)

    def export_spec(self, data: dict[str, Any]) -> ExportSpec:
        """One ``3 x H x W`` image in [0, 1] to its detections and ``masks`` (``K x 1 x H x W`` probabilities
        pasted at the input's size inside the graph; cut at 0.5 for the instance's pixels)."""
        spec = super().export_spec(data)
        spec.input += "; masks: K x 1 x H x W probabilities at the input's size (> 0.5: the instance)"
        return spec


main = entry_point(InstanceSegmentationTask)


if __name__ == "__main__":
    script(main)
