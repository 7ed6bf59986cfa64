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

from . import build_backbone
from .weights import WeightsError, apply_weights, backbone_subset, save_weights, torch_load_safe


def export(checkpoint: str | Path, out: str | Path) -> Path:
    raw = torch_load_safe(Path(checkpoint), f"checkpoint {checkpoint}")
    hparams = raw.get("hyper_parameters") or {} if isinstance(raw, dict) else {}
    name = hparams.get("backbone")
    if not name or "state_dict" not in raw:
        raise WeightsError(f"{checkpoint}: not a checkpoint of this project's tasks (no backbone name recorded)")
    recorded = raw.get("backbone") if isinstance(raw.get("backbone"), dict) else {}
    state = backbone_subset(raw["state_dict"], recorded.get("keys"))
    num_classes = int(state["fc.weight"].shape[0]) if "fc.weight" in state else 0
    net = build_backbone(
        name, num_classes=num_classes, **(recorded.get("options") or hparams.get("backbone_args") or {})
    )
    apply_weights(net, state, what=str(checkpoint), architecture=recorded.get("architecture"))
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
