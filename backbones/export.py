"""``python -m backbones.export CHECKPOINT OUT``: a task checkpoint's backbone as a weight file.

    python -m backbones.export runs/imagenet_resnet50/version_0/checkpoints/best.ckpt resnet50.safetensors

The checkpoint is read with ``weights_only=True``; the backbone named in it is rebuilt (with the
checkpoint's ``backbone_args``), loaded strictly and written as ``.safetensors`` (or ``.pth``). The
file loads anywhere with ``load_weights`` / ``weights=`` / ``weights_backbone=``.

Classification, segmentation and both detection heads are understood. The C4 detector keeps the
backbone's last stage in its box head (``roi_heads.box_head.res5``, from ``Backbone.truncate``); its
parts are put back in the places they came from, so the file holds the whole network.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from . import build_backbone
from .weights import WeightsError, _torch_load, apply_weights, backbone_subset, save_weights

#: where the C4 detector keeps the backbone's last stage (``tasks.detection_models.StageBoxHead``)
C4_HEAD = "detector.roi_heads.box_head.res5."


def export(checkpoint: str | Path, out: str | Path) -> Path:
    raw = _torch_load(Path(checkpoint), f"checkpoint {checkpoint}")
    hparams = raw.get("hyper_parameters") or {} if isinstance(raw, dict) else {}
    name = hparams.get("backbone")
    if not name or "state_dict" not in raw:
        raise WeightsError(f"{checkpoint}: not a checkpoint of this project's tasks (no backbone name recorded)")
    state = backbone_subset(raw["state_dict"])
    num_classes = int(state["fc.weight"].shape[0]) if "fc.weight" in state else 0
    args = hparams.get("backbone_args") or {}
    net = build_backbone(name, num_classes=num_classes, **args)
    state.update(_c4_head_stages(raw["state_dict"], name, args))
    apply_weights(net, state, what=str(checkpoint))
    return save_weights(net, out)


def _c4_head_stages(state: dict, name: str, args: dict) -> dict:
    """The C4 box head's modules under the backbone attribute names they were taken from (empty if none)."""
    head = {k[len(C4_HEAD) :]: v for k, v in state.items() if k.startswith(C4_HEAD)}
    if not head:
        return {}
    with torch.device("meta"):  # only its module layout is needed: no memory, no initialization
        net = build_backbone(name, num_classes=0, **args)
    attribute = {id(module): attr for attr, module in net.named_children()}
    stages = [stage for stage in net.stage_names if stage != "stem"]
    # the split tasks.detection_models.build_faster_rcnn makes: the trunk ends at the penultimate stage
    parts = [attribute[id(module)] for module in net.truncate(after=stages[-2])]
    out = {}
    for key, value in head.items():
        index, rest = key.split(".", 1)
        out[f"{parts[int(index)]}.{rest}"] = value
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m backbones.export", description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("out", help="output file: .safetensors (recommended) or .pth")
    args = parser.parse_args(argv)
    print(f"wrote {export(args.checkpoint, args.out)}")


if __name__ == "__main__":
    from .command import run_command

    run_command(main)
