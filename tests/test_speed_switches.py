"""The speed switches change how a model runs, never what it computes or how its checkpoints are named."""

from __future__ import annotations

import pytest
import torch

from tasks.classify import ClassificationTask
from tasks.detect import DetectionTask
from tasks.segment import SegmentationTask


def _pair(make, **switches):
    """The same task twice, with the same weights: as configured by default and with ``switches``."""
    torch.manual_seed(0)
    plain = make()
    plain.configure_models()
    fast = make(**switches)
    fast.configure_models()
    fast.load_state_dict(plain.state_dict())
    fast.apply_speedups()
    return plain, fast


@pytest.mark.parametrize(
    "backend",
    ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)],  # inductor: a minute of C++ here
)
def test_compile_runs_the_same_network_with_the_same_parameter_names(backend, monkeypatch):
    """``--model.compile true`` compiles the backbone in place (TorchInductor, the default; AOTAutograd's graphs
    run eagerly in the fast tier): the logits and gradients are eager's, and the state dict keeps its names,
    so checkpoints load either way."""
    if backend != "inductor":
        compile_module = torch.nn.Module.compile
        monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: compile_module(self, backend=backend, **kw))
    plain, fast = _pair(lambda **kw: ClassificationTask(backbone="cifar_resnet20", num_classes=10, **kw), compile=True)
    assert fast.backbone._compiled_call_impl is not None and plain.backbone._compiled_call_impl is None
    assert list(fast.state_dict()) == list(plain.state_dict())
    # In float64: in float32, TorchInductor's multi-threaded CPU reductions (BN statistics) differ from eager's
    # in the last bits, and 20 layers of BN backward amplify that to ~1% of conv1's gradient on 2 threads.
    plain.double(), fast.double()
    images = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    labels = torch.tensor([0, 3, 5, 9])
    for task in (plain, fast):
        torch.nn.functional.cross_entropy(task(images), labels).backward()
    torch.testing.assert_close(fast(images), plain(images), rtol=1e-4, atol=1e-4)
    for (name, p), q in zip(plain.named_parameters(), fast.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-3, atol=1e-4, msg=name)


@pytest.mark.parametrize(
    ("make", "target"),
    [
        (lambda **kw: DetectionTask(backbone="resnet18", head="fpn", num_classes=3, **kw), "detector.backbone"),
        (lambda **kw: DetectionTask(backbone="resnet18", head="c4", num_classes=3, **kw), "detector.backbone"),
        (lambda **kw: SegmentationTask(backbone="resnet18", num_classes=3, **kw), "model.backbone"),
    ],
    ids=["detect-fpn", "detect-c4", "segment"],
)
def test_compile_targets_the_backbone_of_every_task(make, target):
    plain, fast = _pair(make, compile=True)
    assert fast.get_submodule(target)._compiled_call_impl is not None
    assert list(fast.state_dict()) == list(plain.state_dict())


def test_channels_last_changes_the_layout_not_the_logits():
    plain, fast = _pair(lambda **kw: ClassificationTask(backbone="resnet18", num_classes=10, **kw), channels_last=True)
    conv = fast.backbone.conv1.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    images = torch.randn(2, 3, 64, 64)
    assert fast.to_memory_format(images).is_contiguous(memory_format=torch.channels_last)
    plain.eval()
    fast.eval()
    torch.testing.assert_close(fast(images), plain(images), rtol=1e-4, atol=1e-4)
