"""The zoo against torchvision, timm and the papers' tables; the Backbone contract for every name."""

from __future__ import annotations

import pytest
import timm
import torch
import torchvision
from conftest import randomize_norms
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from backbones import BACKBONES, WeightsError, build_backbone, list_backbones, load_weights
from backbones.__main__ import main as zoo_main
from backbones.complexity import count_macs, count_parameters, profile

TORCHVISION_TWINS = [
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
    "resnext50_32x4d", "resnext101_32x8d", "resnext101_64x4d",
]  # fmt: skip


def _tv(name: str) -> nn.Module:
    return getattr(torchvision.models, name)()


@pytest.mark.parametrize("name", TORCHVISION_TWINS)
def test_parameter_count_equals_torchvision(name):
    with torch.device("meta"):
        ours = build_backbone(name, num_classes=1000)
        ref = _tv(name)
    assert count_parameters(ours) == count_parameters(ref)


def test_parameter_counts_published_by_torchvision():
    with torch.device("meta"):
        assert count_parameters(build_backbone("resnet50", num_classes=1000)) == 25_557_032
        assert count_parameters(build_backbone("resnext101_32x8d", num_classes=1000)) == 88_791_336


@pytest.mark.parametrize("name", TORCHVISION_TWINS)
def test_torchvision_state_dict_loads_strictly_and_logits_match(name, tmp_path):
    ref = randomize_norms(_tv(name)).eval()
    path = tmp_path / f"{name}.pth"
    torch.save(ref.state_dict(), path)
    ours = build_backbone(name, num_classes=1000).eval()
    report = load_weights(ours, path)
    assert report.loaded == len([k for k in ref.state_dict()])
    assert ours.state_dict().keys() == ref.state_dict().keys()  # same names: no conversion at all
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(ours(x), ref(x), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    ("timm_name", "name"), [("resnetv2_50", "preact_resnet50"), ("resnetv2_18", "preact_resnet18")]
)
def test_timm_preactivation_weights_remap_and_logits_match(timm_name, name, tmp_path):
    ref = randomize_norms(timm.create_model(timm_name, pretrained=False)).eval()
    path = tmp_path / f"{timm_name}.pth"
    torch.save(ref.state_dict(), path)
    options = {}
    if name == "preact_resnet18":  # timm's first identity shortcut skips the first activation (the paper's does not)
        with pytest.raises(WeightsError, match="shared_first_activation"):
            load_weights(build_backbone(name, num_classes=1000), path)
        options = {"shared_first_activation": False}
    ours = build_backbone(name, num_classes=1000, **options).eval()
    load_weights(ours, path)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(ours(x), ref(x), atol=1e-4, rtol=1e-4)


# -- complexity against the papers ------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "gmacs"),
    [("resnet18", 1.8), ("resnet34", 3.6), ("resnet50", 3.8), ("resnet101", 7.6), ("resnet152", 11.3)],
)
def test_original_v1_complexity_matches_resnet_table1(name, gmacs):
    with torch.device("meta"):
        net = build_backbone(name, stride_in_1x1=True)
    assert count_macs(net, 224) / 1e9 == pytest.approx(gmacs, rel=0.03)


@pytest.mark.parametrize(
    ("name", "millions"),
    [
        ("cifar_resnet20", 0.27), ("cifar_resnet32", 0.46), ("cifar_resnet44", 0.66), ("cifar_resnet56", 0.85),
        ("cifar_resnet110", 1.7), ("cifar_resnet1202", 19.4),  # ResNet Table 6
        ("cifar_preact_resnet164", 1.7), ("cifar_preact_resnet1001", 10.2),  # Identity Mappings Table 3
        ("cifar_resnext29_8x64d", 34.4), ("cifar_resnext29_16x64d", 68.1),  # ResNeXt Table 7
        ("resnext50_32x4d", 25.0), ("resnet50", 25.5),  # ResNeXt Table 1
    ],
)  # fmt: skip
def test_parameter_counts_match_the_papers(name, millions):
    assert profile(BACKBONES[name], macs=False)["params"] / 1e6 == pytest.approx(millions, rel=0.03)


def test_plain_and_option_a_twins_have_identical_parameter_counts():
    # ResNet Sec. 4.2: option A shortcuts are parameter free, so plain and residual twins are the same size.
    assert profile(BACKBONES["cifar_plain56"])["params"] == profile(BACKBONES["cifar_resnet56"])["params"]


# -- the contract, for every registered name --------------------------------------------------------
def _input_for(net) -> torch.Tensor:
    return torch.randn(2, 3, 64, 64) if net.default_input_size == 224 else torch.randn(2, 3, 16, 16)


@pytest.mark.parametrize("name", list_backbones())
def test_every_parameter_gets_a_gradient_and_features_match_feature_info(name):
    net = build_backbone(name, num_classes=5, out_features=None)
    net.select_outputs(list(net.feature_info))
    x = _input_for(net)
    feats = net.forward_features(x)
    assert list(feats) == list(net.feature_info)
    for stage, fmap in feats.items():
        info = net.feature_info[stage]
        assert fmap.shape[1] == info.channels, stage
        assert fmap.shape[-1] == x.shape[-1] // info.stride, stage
    logits = net(x)
    assert logits.shape == (2, 5)
    logits.square().mean().backward()
    no_grad = [n for n, p in net.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not no_grad, no_grad[:5]


def _native_strides(name: str) -> list[int]:
    return [1, 1, 2, 4] if name.startswith("cifar_") else [4, 4, 8, 16, 32]


def _check_dilated(name: str, output_stride: int) -> None:
    net = build_backbone(name, output_stride=output_stride, out_features=None).eval()
    assert [info.stride for info in net.feature_info.values()] == [min(s, output_stride) for s in _native_strides(name)]
    net.select_outputs(net.stage_names[1:])
    x = _input_for(net)[:1]
    with torch.no_grad():
        feats = net.forward_features(x)
    for stage, fmap in feats.items():
        assert fmap.shape[-1] == x.shape[-1] // net.feature_info[stage].stride, stage


@pytest.mark.parametrize("name", list_backbones())
def test_output_stride_dilates_the_last_stages(name):
    """Every net at its most dilated output stride (the last two stages dilated), one image: shapes are the
    property; one dilated stage, for each family, in the next test."""
    _check_dilated(name, _native_strides(name)[-1] // 4)


@pytest.mark.parametrize("name", ["resnet50", "preact_resnet18", "resnext50_32x4d", "cifar_resnet20",
                                  "cifar_preact_resnet110", "cifar_resnext29_8x64d"])  # fmt: skip
def test_output_stride_dilates_only_the_last_stage_at_half_the_native_stride(name):
    _check_dilated(name, _native_strides(name)[-1] // 2)


def test_output_stride_values_for_imagenet_nets():
    for os_, expected in [(16, [4, 4, 8, 16, 16]), (8, [4, 4, 8, 8, 8]), (32, [4, 4, 8, 16, 32])]:
        net = build_backbone("preact_resnet50", output_stride=os_)
        assert [i.stride for i in net.feature_info.values()] == expected
    with pytest.raises(ValueError, match="output_stride=12"):
        build_backbone("resnet50", output_stride=12)


def test_issue_example_frozen_bn_output_stride_16():
    net = build_backbone("preact_resnet50", out_features=("res3", "res4", "res5"), norm="frozen_bn", output_stride=16)
    feats = net.forward_features(torch.randn(1, 3, 64, 64))
    assert {k: tuple(v.shape[1:]) for k, v in feats.items()} == {
        "res3": (512, 8, 8), "res4": (1024, 4, 4), "res5": (2048, 4, 4)
    }  # fmt: skip
    assert not any(isinstance(m, nn.BatchNorm2d) for m in net.modules())


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "preact_resnet50", "resnext50_32x4d", "cifar_resnet20"])
def test_freeze_2_freezes_stem_and_res2(name):
    net = build_backbone(name, num_classes=3).train()
    net.freeze(2)
    attrs = net._stage_attrs()
    frozen = [getattr(net, a) for s in ("stem", "res2") for a in attrs[s]]
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = _input_for(net)
    net(x).sum().backward()
    for module in frozen:
        assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())
        for p in module.parameters():
            assert not p.requires_grad and p.grad is None
    frozen_keys = [k for k in before if k.split(".")[0] in {a for s in ("stem", "res2") for a in attrs[s]}]
    after = net.state_dict()
    assert frozen_keys and all(torch.equal(before[k], after[k]) for k in frozen_keys)  # statistics untouched
    res3 = getattr(net, attrs["res3"][0])
    assert all(p.grad is not None for p in res3.parameters())
    assert any(isinstance(m, FrozenBatchNorm2d) for m in frozen[-1].modules())


def test_freeze_0_freezes_nothing_and_bounds_are_checked():
    net = build_backbone("resnet18").freeze(0)
    assert all(p.requires_grad for p in net.parameters())
    with pytest.raises(ValueError, match="between 0 and 5"):
        net.freeze(6)


@pytest.mark.parametrize("norm", ["bn", "frozen_bn", "sync_bn", "gn"])
def test_norm_options(norm):
    net = build_backbone("cifar_resnet20", norm=norm, num_classes=10)
    kinds = {type(m).__name__ for m in net.modules()}
    expected = {"bn": "BatchNorm2d", "frozen_bn": "FrozenBatchNorm2d", "sync_bn": "SyncBatchNorm", "gn": "GroupNorm"}
    assert expected[norm] in kinds
    assert net(torch.randn(2, 3, 16, 16)).shape == (2, 10)


def test_zero_init_residual_makes_units_identities():
    net = build_backbone("cifar_preact_resnet164", zero_init_residual=True).eval()
    x = torch.randn(2, 16, 8, 8).abs()
    unit = net.layer1[1]  # identity-shortcut unit: output must equal input
    with torch.no_grad():
        assert torch.equal(unit(x.repeat(1, 4, 1, 1)), x.repeat(1, 4, 1, 1))
    v1 = build_backbone("resnet50", zero_init_residual=True)
    assert all((u.bn3.weight == 0).all() for layer in (v1.layer1, v1.layer4) for u in layer)


def test_truncate_hands_res5_and_final_norm_to_a_head():
    net = build_backbone("preact_resnet50", num_classes=10).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        full = net.forward_all(x)
        res5 = net.layer4
        tail = net.truncate(after="res4")
        assert tail[0] is res5 and net.fc is None and "res5" not in net.feature_info
        assert torch.allclose(tail(net.forward_features(x)["res4"]), full)
    assert not hasattr(net, "layer4")


def test_unknown_names_and_bad_options_are_clear_errors():
    with pytest.raises(ValueError, match="Did you mean resnet50"):
        build_backbone("resnet05")
    with pytest.raises(ValueError, match="shortcut='Z' is not one of"):
        build_backbone("resnet18", shortcut="Z")
    with pytest.raises(ValueError, match="unit='preact' is not one of"):
        build_backbone("resnet18", unit="preact")
    with pytest.raises(ValueError, match="needs a shortcut"):
        build_backbone("plain18", skip="scale")
    with pytest.raises(ValueError, match="out_features"):
        build_backbone("cifar_resnet20", out_features=("res5",))


def test_zoo_table_cli(capsys):
    zoo_main(["resnet50", "cifar_resnet110", "--markdown"])
    out = capsys.readouterr().out
    assert "| resnet50 | 25.56 | 4.09 | 224² |" in out
    assert "| cifar_resnet110 | 1.73 | 0.25 | 32² |" in out
    assert "res5:2048/32" in out and "res4:64/4" in out


def test_stride_in_1x1_moves_the_stride():
    v1 = build_backbone("resnet50", stride_in_1x1=True)
    v15 = build_backbone("resnet50")
    assert v1.layer2[0].conv1.stride == (2, 2) and v1.layer2[0].conv2.stride == (1, 1)
    assert v15.layer2[0].conv1.stride == (1, 1) and v15.layer2[0].conv2.stride == (2, 2)
    assert count_parameters(v1) == count_parameters(v15)
