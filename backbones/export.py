"""``python -m backbones.export CHECKPOINT OUT``: a task checkpoint's backbone as a weight file.

    python -m backbones.export runs/imagenet_resnet50/version_0/checkpoints/best.ckpt resnet50.safetensors

The checkpoint is read with ``weights_only=True``. A task checkpoint records its backbone: the zoo name,
the builder options (``architecture``) and where its tensors are kept (``keys``: a prefix of the
backbone's names to a prefix of the checkpoint's, including the stages a C4 detector's box head took
with ``Backbone.truncate``). The backbone is rebuilt with those options, loaded strictly and written as
``.safetensors`` (which records the options again) or ``.pth``. The file loads anywhere with
``load_weights`` / ``weights=`` / ``weights_backbone=``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from zoo_common.checkpoints import WeightsError, backbone_state, read_task_checkpoint

from . import build_backbone
from .weights import apply_weights, save_weights


def export(checkpoint: str | Path, out: str | Path) -> Path:
    """Write the backbone of the task checkpoint ``checkpoint`` to ``out`` (``.safetensors`` or ``.pth``)."""
    try:
        record = read_task_checkpoint(checkpoint)
    except FileNotFoundError:
        raise WeightsError(f"checkpoint {checkpoint}: not a readable file (it does not exist)") from None
    name = record.hyper_parameters.get("backbone")
    if not name:
        raise WeightsError(f"{checkpoint}: not a checkpoint of this project's tasks (no backbone name recorded)")
    state = backbone_state(record.state_dict, record.backbone.get("keys"))
    num_classes = int(state["fc.weight"].shape[0]) if "fc.weight" in state else 0
    options = record.backbone.get("options") or record.hyper_parameters.get("backbone_args") or {}
    net = build_backbone(name, num_classes=num_classes, **options)
    apply_weights(net, state, what=str(checkpoint), architecture=record.backbone.get("architecture"))
    return save_weights(net, out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m backbones.export", description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("out", help="output file: .safetensors (recommended) or .pth")
    args = parser.parse_args(argv)
    print(f"wrote {export(args.checkpoint, args.out)}")


if __name__ == "__main__":
    from zoo_common.command import run_command

    run_command(main)
