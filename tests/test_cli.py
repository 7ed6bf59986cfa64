"""Every task's command line shows and accepts the arguments all tasks share, each with its type."""

from __future__ import annotations

import re

import pytest
import yaml
from datasets import CPU

from tasks import classify, detect, segment
from tasks.run.cli import TaskCLI

#: the shared arguments (``tasks.core.base.BaseTask``) and the type ``--help`` must give each
SHARED = {
    "backbone": "Literal['resnet18'",
    "backbone_args": "Optional[dict[str, Any]]",
    "num_classes": "Optional[int]",
    "weights": "Optional[str]",
    "weights_backbone": "Optional[str]",
    "optimizer": "Optional[Callable[[Iterable], Optimizer]]",
    "scheduler": "Optional[Callable[[Optimizer], Union[LRScheduler, ReduceLROnPlateau]]]",
    "scheduler_interval": "Optional[Literal['epoch', 'step']]",
    "weight_decay_norm_bias": "bool",
    "channels_last": "Optional[bool]",
    "compile": "bool",
    "nonfinite_loss": "Literal['stop', 'skip']",
    "reference_batch_size": "Optional[int]",
    "scale_lr": "bool",
    "log_samples": "Optional[int]",
}
TASKS = {"classify": classify, "detect": detect, "segment": segment}
CLASSES = {"classify": classify.ClassificationTask, "detect": detect.DetectionTask, "segment": segment.SegmentationTask}
DATA = {
    "classify": "datamodules.ShapesClassificationDataModule",
    "detect": "datamodules.ShapesDetectionDataModule",
    "segment": "datamodules.ShapesSegmentationDataModule",
}


def _help(module, capsys) -> dict[str, str]:
    """``--model.<name>`` to its help text, from ``fit --help``."""
    with pytest.raises(SystemExit):
        module.main(["fit", "--help"])
    text = capsys.readouterr().out
    blocks = re.split(r"\n  (?=--model\.)", text)
    out = {}
    for block in blocks:
        match = re.match(r"--model\.(\w+) ", block)
        if match:
            out[match[1]] = " ".join(block.split())
    return out


@pytest.mark.parametrize("task", TASKS)
def test_help_lists_every_shared_argument_with_its_type(task, capsys):
    shown = _help(TASKS[task], capsys)
    for name, kind in SHARED.items():
        assert name in shown, f"--model.{name} missing from {task}'s --help"
        spellings = [kind]  # jsonargparse writes Optional[T] or T | null
        if kind.startswith("Optional[") and kind.endswith("]"):
            spellings.append(f"{kind[len('Optional[') : -1]} | null")
        assert any(f"(type: {k}" in shown[name] for k in spellings), (name, shown[name])
        assert len(shown[name].split("(type:")[0]) > len(f"--model.{name} {name.upper()}") + 5, (name, "no help")


@pytest.mark.parametrize("task", TASKS)
def test_a_config_setting_the_shared_arguments_parses(task, tmp_path):
    config = {
        "model": {
            "backbone": "resnet18",
            "num_classes": 3,
            "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 0.003}},
            "scheduler": {"class_path": "tasks.core.schedulers.WarmupPolyLR", "init_args": {"power": 2.0}},
            "scheduler_interval": "epoch",
            "weight_decay_norm_bias": False,
            "channels_last": False,
            "compile": False,
            "nonfinite_loss": "skip",
            "reference_batch_size": 64,
            "scale_lr": True,
            "log_samples": 0,
        },
        "data": {"class_path": DATA[task], "init_args": {"root": str(tmp_path / "shapes")}},
        "trainer": {"logger": False, "default_root_dir": str(tmp_path / "runs")},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    cli = TaskCLI(CLASSES[task], args=["--config", str(path), *CPU], run=False)
    model = cli.model
    assert model.scheduler_interval == "epoch" and model.nonfinite_loss == "skip" and model.log_samples == 0
    assert model.use_channels_last is False and model.hparams.reference_batch_size == 64 and model.hparams.scale_lr
    assert model.hparams.weight_decay_norm_bias is False and model.hparams.num_classes == 3
    optimizer = model.optimizer_factory([{"params": list(model.parameters())}])
    assert type(optimizer).__name__ == "AdamW" and optimizer.defaults["lr"] == 0.003
    assert model.scheduler_factory(optimizer).power == 2.0
