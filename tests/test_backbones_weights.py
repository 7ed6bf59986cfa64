"""Weight loading: every source kind, strictness, and refusal of files that would run code."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch
import torchvision
import yaml
from conftest import randomize_norms
from safetensors.torch import save_file

from backbones import WeightsError, build_backbone, load_weights
from backbones.weights import TORCHVISION_WEIGHTS, torchvision_weights


class _Exploit:
    """Unpickling this would run a command (the classic pickle attack)."""

    def __reduce__(self):
        return (os.system, ("touch PWNED_BY_PICKLE",))


def test_a_malicious_pickle_is_refused_and_never_executed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"conv1.weight": _Exploit()}, f)
    net = build_backbone("resnet18")
    with pytest.raises(WeightsError, match="refused to load.*weights_only=True"):
        load_weights(net, path)
    assert not (tmp_path / "PWNED_BY_PICKLE").exists()
    ckpt = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "callback": _Exploit()}, ckpt)
    with pytest.raises(WeightsError, match="refused to load"):
        load_weights(net, ckpt)
    assert not (tmp_path / "PWNED_BY_PICKLE").exists()


def test_mismatched_keys_are_listed_not_silently_skipped(tmp_path):
    state = torchvision.models.resnet18().state_dict()
    state["extra.weight"] = torch.zeros(1)
    del state["layer4.1.conv2.weight"]
    state["fc.weight"] = torch.zeros(10, 512)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    net = build_backbone("resnet18", num_classes=1000)
    before = net.conv1.weight.clone()
    with pytest.raises(WeightsError) as err:
        load_weights(net, path)
    message = str(err.value)
    assert "missing in the file (1):\n    layer4.1.conv2.weight" in message
    assert "unexpected in the file (1):\n    extra.weight" in message
    assert "fc.weight: file (10, 512) vs model (1000, 512)" in message
    assert torch.equal(net.conv1.weight, before)  # nothing was half-loaded


def test_wrong_architecture_is_an_error(tmp_path):
    path = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    with pytest.raises(WeightsError, match="does not fit ResNet 'resnet34'"):
        load_weights(build_backbone("resnet34"), path)


def test_head_is_dropped_for_feature_extractors_and_on_request(tmp_path):
    ref = randomize_norms(torchvision.models.resnet18()).eval()
    path = tmp_path / "r18.pth"
    torch.save(ref.state_dict(), path)
    trunk = build_backbone("resnet18").eval()  # num_classes=0: no classifier
    assert load_weights(trunk, path).dropped == ["fc.weight", "fc.bias"]
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(trunk(x), torch.flatten(ref.avgpool(ref.layer4(ref.layer3(ref.layer2(ref.layer1(
            ref.maxpool(ref.relu(ref.bn1(ref.conv1(x))))))))), 1), atol=1e-5)  # fmt: skip
    ten = build_backbone("resnet18", num_classes=10)
    fc_before = ten.fc.weight.clone()
    load_weights(ten, path, ignore_head=True)
    assert torch.equal(ten.fc.weight, fc_before) and torch.equal(ten.conv1.weight, ref.conv1.weight)


def test_safetensors_and_frozen_bn_targets(tmp_path):
    ref = randomize_norms(torchvision.models.resnet50()).eval()
    path = tmp_path / "r50.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    net = build_backbone("resnet50", num_classes=1000, norm="frozen_bn").eval()
    load_weights(net, path)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(net(x), ref(x), atol=1e-3, rtol=1e-4)
    (tmp_path / "broken.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(WeightsError, match="not a readable safetensors file"):
        load_weights(net, tmp_path / "broken.safetensors")


def test_torchvision_names_resolve_and_download_with_weights_only(monkeypatch):
    calls = {}

    def fake_download(url, **kwargs):
        calls.update(url=url, **kwargs)
        return torchvision.models.resnet50().state_dict()

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", fake_download)
    net = build_backbone("resnet50", weights="ResNet50_Weights.IMAGENET1K_V2", num_classes=1000)
    assert calls["url"].endswith("resnet50-11ad3fa6.pth") and calls["weights_only"] is True
    assert calls["check_hash"] is True
    load_weights(net, "IMAGENET1K_V1")  # the short form, resolved through the zoo name
    assert calls["url"].endswith("resnet50-0676ba61.pth")
    assert torchvision_weights("ResNeXt101_32X8D_Weights.DEFAULT").url.endswith(".pth")


def test_offline_download_and_unknown_names_are_clear(monkeypatch, tmp_path):
    def offline(url, **kwargs):
        raise OSError("Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(WeightsError, match="could not download .*pass its local path"):
        build_backbone("resnet18", weights="ResNet18_Weights.IMAGENET1K_V1")
    with pytest.raises(WeightsError, match="not a torchvision weights name.*ResNet50_Weights"):
        build_backbone("resnet18", weights="ResNet18_Weights.IMAGENET9K")
    with pytest.raises(WeightsError, match="no such file, URL or torchvision weights name.*ResNet18_Weights.DEFAULT"):
        build_backbone("resnet18", weights=str(tmp_path / "missing.pth"))


def test_weights_of_another_architecture_are_refused_before_any_download(monkeypatch):
    """A config's weights_backbone outlives a --model.backbone swap: the short member name follows the
    backbone; a full name of another architecture, or one torchvision lacks, is an error naming the fix."""

    def no_download(url, **kwargs):
        raise AssertionError(f"downloaded {url}")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    with pytest.raises(WeightsError, match=r"'ResNet50_Weights.IMAGENET1K_V1' are torchvision's resnet50 weights "
                       r"and do not fit resnext50_32x4d. Pass ResNeXt50_32X4D_Weights.DEFAULT"):  # fmt: skip
        build_backbone("resnext50_32x4d", weights="ResNet50_Weights.IMAGENET1K_V1")
    with pytest.raises(WeightsError, match="do not fit preact_resnet50. Pass a weights file for preact_resnet50"):
        build_backbone("preact_resnet50", weights="ResNet50_Weights.IMAGENET1K_V1")
    with pytest.raises(WeightsError, match="torchvision publishes no weights for cifar_resnet20.*or null"):
        build_backbone("cifar_resnet20", weights="IMAGENET1K_V1")
    # the COCO configs name the member only, so swapping the backbone swaps the weights with it
    configs = sorted((Path(__file__).resolve().parents[1] / "configs").glob("coco_*.yaml"))
    fine_tuned = [c for c in configs if "weights_backbone" in (yaml.safe_load(c.read_text())["model"])]
    assert len(fine_tuned) == 11  # Faster R-CNN's eight (the competition entry among them) and Mask R-CNN's three
    for config in fine_tuned:
        model = yaml.safe_load(config.read_text())["model"]
        for name in (model["backbone"], "resnext101_32x8d", "resnet152"):
            enum = torchvision_weights(model["weights_backbone"], name)
            assert (type(enum).__name__, enum.name) == (TORCHVISION_WEIGHTS[name], "IMAGENET1K_V1"), config.name


def test_lightning_style_checkpoint_checks_the_backbone_name(tmp_path):
    trained = randomize_norms(build_backbone("resnet18", num_classes=7))
    ckpt = {
        "pytorch-lightning_version": "2.6.6",
        "hyper_parameters": {"backbone": "resnet18", "num_classes": 7},
        "state_dict": {f"backbone.{k}": v for k, v in trained.state_dict().items()}
        | {"criterion.weight": torch.ones(1)},
    }
    path = tmp_path / "best.ckpt"
    torch.save(ckpt, path)
    net = build_backbone("resnet18")
    load_weights(net, path)
    assert torch.equal(net.layer4[1].conv2.weight, trained.layer4[1].conv2.weight)
    with pytest.raises(WeightsError, match="trained with backbone 'resnet18', but this model is 'resnet34'"):
        load_weights(build_backbone("resnet34"), path)
