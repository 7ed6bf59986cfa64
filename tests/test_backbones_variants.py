"""The papers' variants compute what the papers write: shortcuts, skips, activation placements, forms."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import randomize_norms

from backbones import build_backbone
from backbones.blocks import SKIPS, UNITS, ResidualUnit, ZeroPadShortcut
from backbones.resnext import resnext


def _unit(**kwargs) -> ResidualUnit:
    args = {"in_channels": 8, "planes": 8, "bottleneck": False, **kwargs}
    unit = ResidualUnit(**args)
    randomize_norms(unit)
    if hasattr(unit, "gate"):
        torch.nn.init.normal_(unit.gate.weight, std=0.3)
    return unit.eval()


def _residual_post(unit: ResidualUnit, x):
    """F(x) of a post-activation unit, written out: BN(conv(ReLU(BN(conv(x)))))."""
    return unit.bn2(unit.conv2(F.relu(unit.bn1(unit.conv1(x)))))


@torch.no_grad()
def test_skip_variants_follow_identity_mappings_table1():
    x = torch.randn(2, 8, 6, 6)
    ref = _unit(skip="identity")
    state = ref.state_dict()
    f = _residual_post(ref, x)
    assert torch.allclose(ref(x), F.relu(x + f), atol=1e-6)

    def same_weights(**kwargs):
        unit = _unit(**kwargs)
        unit.load_state_dict(state, strict=False)
        return unit

    assert torch.allclose(same_weights(skip="scale", skip_param=0.5)(x), F.relu(0.5 * x + f), atol=1e-6)
    assert torch.allclose(same_weights(skip="scale_both")(x), F.relu(0.5 * x + 0.5 * f), atol=1e-6)
    # lambda = 0 is a plain unit (Table 1's "fail" row equals a plain net)
    assert torch.allclose(same_weights(skip="scale", skip_param=0.0)(x), F.relu(f), atol=1e-6)
    for kind in ("exclusive_gate", "shortcut_gate"):
        unit = same_weights(skip=kind)
        assert torch.allclose(unit.gate.bias, torch.full((8,), -6.0))  # b_g init (Table 1)
        g = torch.sigmoid(unit.gate(x))
        expected = (1 - g) * x + (g * f if kind == "exclusive_gate" else f)
        assert torch.allclose(unit(x), F.relu(expected), atol=1e-6)
    conv = same_weights(skip="conv")
    assert conv.downsample is not None  # a 1x1 projection even where dimensions do not change
    assert torch.allclose(conv(x), F.relu(conv.downsample(x) + f), atol=1e-6)
    drop = same_weights(skip="dropout")
    assert torch.allclose(drop(x), F.relu(0.5 * x + f), atol=1e-6)  # expectation of the unscaled mask
    drop.train()
    randomize_norms(drop)
    kept = drop.skip_dropout(torch.ones(10000))
    assert set(kept.unique().tolist()) == {0.0, 1.0} and 0.45 < kept.mean() < 0.55


def test_scaling_really_changes_the_network():
    torch.manual_seed(1)
    identity = randomize_norms(build_backbone("cifar_resnet20", num_classes=10)).eval()
    scaled = build_backbone("cifar_resnet20", num_classes=10, skip="scale").eval()
    scaled.load_state_dict(identity.state_dict())
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert not torch.allclose(identity(x), scaled(x), atol=1e-3)
        same = build_backbone("cifar_resnet20", num_classes=10, skip="scale", skip_param=1.0).eval()
        same.load_state_dict(identity.state_dict())
        assert torch.allclose(identity(x), same(x), atol=1e-6)


@torch.no_grad()
@pytest.mark.parametrize("bottleneck", [False, True])
def test_activation_placements_follow_identity_mappings_fig4(bottleneck):
    x = torch.randn(2, 8, 6, 6)
    kw = {"in_channels": 8, "planes": 2 if bottleneck else 8, "bottleneck": bottleneck}

    def layers(u):
        convs = [u.conv1, u.conv2] + ([u.conv3] if bottleneck else [])
        bns = [u.bn1, u.bn2] + ([u.bn3] if bottleneck else [])
        return list(zip(convs, bns))

    def chain(u, x, *, pre_relu=False, final_relu=False):
        f = F.relu(x) if pre_relu else x
        for i, (conv, bn) in enumerate(layers(u)):
            f = bn(conv(f))
            if i < len(layers(u)) - 1 or final_relu:
                f = F.relu(f)
        return f

    u = _unit(unit="original", **kw)
    assert torch.allclose(u(x), F.relu(x + chain(u, x)), atol=1e-5)
    u = _unit(unit="bn_after_add", **kw)
    f = x
    for i, (conv, bn) in enumerate(layers(u)):
        f = conv(f)
        if i < len(layers(u)) - 1:
            f = F.relu(bn(f))
    assert torch.allclose(u(x), F.relu(layers(u)[-1][1](x + f)), atol=1e-5)
    u = _unit(unit="relu_before_add", **kw)
    assert torch.allclose(u(x), x + chain(u, x, final_relu=True), atol=1e-5)
    u = _unit(unit="relu_preact", **kw)
    assert torch.allclose(u(x), x + chain(u, x, pre_relu=True), atol=1e-5)
    u = _unit(unit="full_preact", **kw)
    f = x
    for conv, bn in layers(u):
        f = conv(F.relu(bn(f)))
    assert torch.allclose(u(x), x + f, atol=1e-5)


def test_preact_projection_reads_the_preactivated_input_and_has_no_bn():
    u = _unit(unit="full_preact", in_channels=8, planes=16, stride=2)
    assert len(u.downsample) == 1 and u.shortcut_reads_preact
    x = torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        a = F.relu(u.bn1(x))
        f = u.conv2(F.relu(u.bn2(u.conv1(a))))
        assert torch.allclose(u(x), u.downsample(a) + f, atol=1e-5)


def test_preact_net_ends_with_bn_relu_and_units_have_no_post_activation():
    net = build_backbone("cifar_preact_resnet110", num_classes=10)
    assert net.norm_final is not None and net.bn1 is None
    out = net.forward_features(torch.randn(2, 3, 16, 16))["res4"]
    assert (out >= 0).all()
    raw = net.layer3(net.layer2(net.layer1(net.conv1(torch.randn(2, 3, 16, 16)))))
    assert (raw < 0).any()  # units add without a ReLU after the addition


@pytest.mark.parametrize("unit", UNITS)
@pytest.mark.parametrize("skip", SKIPS)
def test_every_skip_and_unit_combination_trains(unit, skip):
    net = build_backbone("cifar_resnet20", num_classes=10, unit=unit, skip=skip, shortcut="B")
    net(torch.randn(4, 3, 8, 8)).logsumexp(1).mean().backward()
    assert all(p.grad is not None for p in net.parameters())


def test_shortcut_options_a_b_c():
    a = build_backbone("resnet34", shortcut="A")
    b = build_backbone("resnet34", shortcut="B")
    c = build_backbone("resnet34", shortcut="C")
    units = lambda net: [u for layer in (net.layer1, net.layer2, net.layer3, net.layer4) for u in layer]
    assert sum(isinstance(u.downsample, ZeroPadShortcut) for u in units(a)) == 3
    assert sum(u.downsample is not None for u in units(b)) == 3  # only where dimensions grow
    assert sum(u.downsample is not None for u in units(c)) == 16  # every unit
    plain = build_backbone("plain34")
    assert all(not u.has_shortcut for u in units(plain))
    # A is parameter free; B adds 3 projections, C 16 (ResNet Table 3)
    assert sum(p.numel() for p in a.parameters()) < sum(p.numel() for p in b.parameters())
    assert sum(p.numel() for p in b.parameters()) < sum(p.numel() for p in c.parameters())


def test_option_a_zero_pads_and_subsamples():
    pad = ZeroPadShortcut(4, 8, stride=2)
    x = torch.randn(1, 4, 6, 6)
    y = pad(x)
    assert y.shape == (1, 8, 3, 3)
    assert torch.equal(y[:, :4], x[:, :, ::2, ::2]) and not y[:, 4:].any()


@torch.no_grad()
@pytest.mark.parametrize(
    "build", [lambda **kw: build_backbone("resnext50_32x4d", **kw), lambda **kw: resnext(50, 4, 24, **kw)]
)
def test_resnext_three_forms_compute_the_same_function(build):
    grouped = randomize_norms(build(num_classes=10)).eval()
    x = torch.randn(2, 3, 64, 64)
    expected = grouped(x)
    for form in ("split", "concat"):
        other = build(num_classes=10, form=form).eval()
        other.load_state_dict(grouped.state_dict())  # the same parameter layout in every form
        assert torch.allclose(other(x), expected, atol=1e-4, rtol=1e-4), form
    split = build(num_classes=10, form="split")
    assert type(split.layer1[0].conv3).__name__ == "PathwiseConv2d" and split.layer1[0].conv3.mode == "sum"


def test_cardinality_width_pairs_preserve_complexity():
    # ResNeXt Table 2: C x d in {1x64, 2x40, 4x24, 8x14, 32x4} keep ResNet-50's parameters and FLOPs.
    from backbones.complexity import count_macs, count_parameters

    with torch.device("meta"):
        base = resnext(50, 1, 64, num_classes=1000)
        base_params, base_macs = count_parameters(base), count_macs(base, 224)
        for c, d in [(2, 40), (4, 24), (8, 14), (32, 4)]:
            net = resnext(50, c, d, num_classes=1000)
            assert net.layer1[0].conv2.out_channels == c * d  # the group-conv width row of Table 2
            assert count_parameters(net) == pytest.approx(base_params, rel=0.03)
            assert count_macs(net, 224) == pytest.approx(base_macs, rel=0.05)
