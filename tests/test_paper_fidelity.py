"""The deviations an audit against the papers and the authors' code found, each pinned by a measurement."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from conftest import randomize_norms
from datasets import CPU, write_imagefolder
from torch import nn

from backbones import BACKBONES, WeightsError, build_backbone, load_weights
from backbones.blocks import ResidualUnit, ZeroPadShortcut
from backbones.complexity import count_macs, count_parameters
from backbones.export import export

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
PREACT = [name for name in BACKBONES if "preact" in name]


# -- (1) the first unit of a pre-activation net ----------------------------------------------------------
@pytest.mark.parametrize("name", PREACT)
def test_the_first_units_shortcut_reads_the_activated_conv1(name):
    """Identity Mappings, Appendix: "the first activation right after conv1 and before splitting into two
    paths". With the first unit's residual branch zeroed, its output is its shortcut: never negative for an
    identity, and a projection's input is never negative either."""
    with torch.device("meta"):
        layout = build_backbone(name)
    if layout.architecture["layers"][0] > 40:  # the 1001-layer net: its first unit is the 164's (n aside)
        pytest.skip("same first unit as cifar_preact_resnet164")
    net = randomize_norms(build_backbone(name)).eval()
    unit: ResidualUnit = net.layer1[0]
    last = unit.conv3 if unit.bottleneck else unit.conv2
    with torch.no_grad():
        last.weight.zero_()
    seen = {}
    if unit.downsample is not None:
        unit.downsample.register_forward_pre_hook(lambda module, args: seen.update(x=args[0].detach()))
    stem = {}
    net.conv1.register_forward_hook(lambda module, args, out: stem.update(x=out.detach()))
    size = net.default_input_size
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        out = net.forward_features(x)  # the deepest stage; rerun to the first unit below
        del out
        first = unit(net.maxpool(stem["x"]) if net.maxpool is not None else stem["x"])
    assert stem["x"].min() < 0  # conv1's raw output has negative values ...
    if unit.downsample is None:
        assert first.min() >= 0, first.min()  # ... the identity shortcut carries ReLU(BN(conv1)) instead
    else:
        assert seen["x"].min() >= 0  # ... and so does a projection's input


# -- (2) option A on CIFAR's 110-layer nets ----------------------------------------------------------
def test_cifar_110_layer_nets_use_option_a_and_match_in_size():
    plain = build_backbone("cifar_resnet110", num_classes=10)
    preact = build_backbone("cifar_preact_resnet110", num_classes=10)
    for net in (plain, preact):
        assert not any(isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) for m in net.modules())
        assert sum(isinstance(m, ZeroPadShortcut) for m in net.modules()) == 2
    assert count_parameters(plain) == count_parameters(preact) == 1_727_962  # Table 6: 1.7M
    projected = build_backbone("cifar_preact_resnet110", num_classes=10, shortcut="B")
    assert sum(isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) for m in projected.modules()) == 2


# -- (3) the stride of the CIFAR pre-activation bottleneck ------------------------------------------
@pytest.mark.parametrize("name", ["cifar_preact_resnet164", "cifar_preact_resnet1001", "cifar_resnet164"])
def test_cifar_bottlenecks_stride_their_first_1x1(name):
    with torch.device("meta"):
        net = build_backbone(name, num_classes=10)
        other = build_backbone(name, num_classes=10, stride_in_1x1=False)
    strided = [u for u in net.modules() if isinstance(u, ResidualUnit) and u.downsample is not None]
    downsampling = [u for u in strided if u.downsample[0].stride == (2, 2)]
    assert len(downsampling) == 2
    for unit in downsampling:
        assert unit.conv1.stride == (2, 2) and unit.conv1.kernel_size == (1, 1) and unit.conv2.stride == (1, 1)
    assert count_parameters(net) == count_parameters(other)


# -- (4) weights carry their architecture -----------------------------------------------------------
def _task_checkpoint(path: Path, backbone: str, backbone_args: dict) -> Path:
    """A ``tasks.classify`` checkpoint as Lightning writes it (state dict, hparams, the task's records)."""
    from tasks.classify import ClassificationTask

    task = ClassificationTask(backbone=backbone, backbone_args=backbone_args, num_classes=3)
    randomize_norms(task)
    checkpoint = {"state_dict": task.state_dict(), "hyper_parameters": dict(task.hparams)}
    task.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, path)
    return path


@pytest.mark.parametrize(
    ("backbone", "options", "option"),
    [("resnet50", {"stride_in_1x1": True}, "stride_in_1x1"), ("resnet18", {"shortcut": "A"}, "shortcut"),
     ("resnet18", {"unit": "relu_preact"}, "unit")],
)  # fmt: skip
def test_weights_recorded_with_other_options_are_refused_or_adopted(backbone, options, option, tmp_path):
    from tasks.detect import DetectionTask

    ckpt = _task_checkpoint(tmp_path / "v1.ckpt", backbone, options)
    reference = build_backbone(backbone, **options).eval()
    load_weights(reference, ckpt)  # the network it was trained as takes it
    with pytest.raises(WeightsError, match=option):
        load_weights(build_backbone(backbone), ckpt)
    exported = export(ckpt, tmp_path / "v1.safetensors")
    with pytest.raises(WeightsError, match=f"{option}.*backbone_args"):
        load_weights(build_backbone(backbone), exported)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = reference.select_outputs(["res4"]).forward_features(x)["res4"]
    for source in (ckpt, exported):
        task = DetectionTask(backbone=backbone, head="c4", num_classes=2, norm="bn", freeze_at=0,
                             weights_backbone=str(source))  # fmt: skip
        assert task.hparams.backbone_args[option] == options[option]  # adopted, and so in the checkpoint
        body = task.detector.backbone.body.eval()
        with torch.no_grad():
            assert torch.equal(body.forward_features(x)["res4"], expected)
    # a conflicting explicit option is refused, naming it
    with pytest.raises(WeightsError, match=option):
        default = build_backbone(backbone).architecture[option]
        DetectionTask(backbone=backbone, num_classes=2, backbone_args={option: default}, weights_backbone=str(ckpt))


# -- (5) FCN as torchvision trains it: SyncBatchNorm under DDP (the 10x aux head: test_defaults) --------
def _sync_bn_worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from backbones.base import SyncBatchNorm

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(0)
    x = torch.randn(8, 4, 5, 5, dtype=torch.float64).requires_grad_()
    bn = SyncBatchNorm(4).double().train()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    part = x[rank * 4 : (rank + 1) * 4]
    y = bn(part)
    (y * torch.arange(y.numel(), dtype=y.dtype).view_as(y)).sum().backward()
    torch.save({"y": y.detach(), "grad": x.grad, "wgrad": bn.weight.grad, "mean": bn.running_mean}, f"{out}.{rank}")
    dist.destroy_process_group()


def test_cpu_sync_batchnorm_equals_batchnorm_over_the_whole_batch(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_sync_bn_worker, args=(2, port, str(tmp_path / "out")), nprocs=2)
    parts = [torch.load(f"{tmp_path / 'out'}.{r}", weights_only=True) for r in range(2)]
    torch.manual_seed(0)
    x = torch.randn(8, 4, 5, 5, dtype=torch.float64).requires_grad_()
    bn = nn.BatchNorm2d(4).double().train()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    y = bn(x)
    weights = torch.cat([torch.arange(4 * 4 * 25, dtype=y.dtype)] * 2).view_as(y)
    (y * weights).sum().backward()
    torch.testing.assert_close(torch.cat([p["y"] for p in parts]), y.detach())
    torch.testing.assert_close(parts[0]["grad"] + parts[1]["grad"], x.grad)  # each rank's share of the input
    torch.testing.assert_close(parts[0]["wgrad"] + parts[1]["wgrad"], bn.weight.grad)  # DDP then sums (averages)
    torch.testing.assert_close(parts[0]["mean"], bn.running_mean)


# (segmentation under DDP trains with SyncBatchNorm: asserted by tests/test_distributed.py's DDP fit of it)


# -- (6) detection recipes as cited ------------------------------------------------------------------
DETECTRON2_SIZES = [640, 672, 704, 736, 768, 800]


@pytest.mark.parametrize(
    "config",
    sorted(p for p in (ROOT / "configs").glob("coco_*_fpn.yaml") if "torchvision" not in p.stem),
    ids=lambda p: p.stem,
)
def test_fpn_configs_train_at_detectron2s_sizes(config):
    from tasks.detect import DetectionTask

    model = yaml.safe_load(config.read_text())["model"]
    assert model["min_size"] == DETECTRON2_SIZES and model["roi_align_aligned"] is True
    task = DetectionTask(backbone="resnet18", num_classes=2, min_size=model["min_size"], max_size=1333)
    transform = task.detector.transform.train()
    image = torch.rand(3, 60, 90)
    drawn = {transform([image])[0].image_sizes[0][0] for _ in range(60)}
    assert drawn <= set(DETECTRON2_SIZES) and len(drawn) >= 4, drawn
    assert transform.eval()([image])[0].image_sizes[0][0] == 800  # tested at the largest


def test_c4_proposals_follow_detectron2_and_aligned_roialign_is_an_option():
    from tasks.detect import DetectionTask

    c4 = DetectionTask(backbone="resnet18", head="c4", num_classes=2, roi_align_aligned=True).detector
    rpn = c4.rpn
    assert (rpn._pre_nms_top_n, rpn._post_nms_top_n) == (
        {"training": 12000, "testing": 6000},
        {"training": 2000, "testing": 1000},
    )
    fpn = DetectionTask(backbone="resnet18", head="fpn", num_classes=2).detector
    assert fpn.rpn._pre_nms_top_n == {"training": 2000, "testing": 1000}  # torchvision's, per level
    # aligned RoIAlign samples half a pixel off: features at pixel centers, as roi_align(aligned=True)
    from torchvision.ops import roi_align

    pooler = c4.roi_heads.box_roi_pool
    features = {"0": torch.randn(1, 8, 16, 16)}
    boxes = [torch.tensor([[8.0, 8.0, 100.0, 72.0]])]
    pooled = pooler(features, boxes, [(256, 256)])
    expected = roi_align(features["0"], [boxes[0]], 14, 1 / 16, 0, aligned=True)
    assert torch.equal(pooled, expected)
    plain = DetectionTask(backbone="resnet18", head="c4", num_classes=2).detector.roi_heads.box_roi_pool
    assert torch.equal(plain(features, boxes, [(256, 256)]), roi_align(features["0"], [boxes[0]], 14, 1 / 16, 0))


# -- (7) the per-pixel mean -----------------------------------------------------------------------------
def test_the_per_pixel_mean_is_the_training_images_mean_and_cached(tmp_path, monkeypatch, caplog):
    from datamodules import ImageFolderDataModule
    from datamodules.folders import list_samples
    from datamodules.images import read_image
    from datamodules.statistics import cache_path

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    root = write_imagefolder(tmp_path / "images", per_class=3, val_per_class=1, size=40)
    dm = ImageFolderDataModule(root=str(root), image_size=32, normalize="pixel_mean", batch_size=5, num_workers=0)
    with caplog.at_level("INFO", logger="datamodules.statistics"):
        dm.prepare_data()
    paths = [p for p, _ in list_samples(root / "train", dm.classes)]
    # the decoding's progress: at every tenth of the images (here each one of 15), with the time left
    progress = [r.getMessage() for r in caplog.records if r.getMessage().startswith("per-pixel mean: ")]
    assert len(progress) == len(paths) == 15 and progress[-1].startswith("per-pixel mean: 15/15 images, ")
    from torchvision.transforms import v2

    view = v2.Compose([v2.Resize(32, antialias=True), v2.CenterCrop(32)])
    direct = torch.stack([view(read_image(p)).double() for p in paths]).mean(0) / 255
    assert dm._pixel_mean.shape == (3, 32, 32)
    torch.testing.assert_close(dm._pixel_mean.double(), direct, atol=1e-6, rtol=0)
    cached = cache_path(paths, 32, 10000)
    assert cached.is_file() and torch.equal(torch.load(cached, weights_only=True), dm._pixel_mean)
    cached.write_bytes(torch.save(torch.zeros(3, 32, 32), cached) or cached.read_bytes())  # the cache is read ...
    again = ImageFolderDataModule(root=str(root), image_size=32, normalize="pixel_mean", num_workers=0)
    again.setup("validate")
    assert torch.equal(again._pixel_mean, torch.zeros(3, 32, 32))  # ... not recomputed
    batch = torch.full((1, 3, 32, 32), 255, dtype=torch.uint8)
    torch.testing.assert_close(dm.normalize(batch), 1.0 - dm._pixel_mean[None])  # minus the mean, no std
    # the paper configs use it
    for depth in (18, 34, 50, 101, 152):
        config = yaml.safe_load((ROOT / "configs" / f"imagenet_resnet{depth}.yaml").read_text())
        assert config["data"]["init_args"]["normalize"] == "pixel_mean"


# -- (8) numbers that were labelled wrong ------------------------------------------------------------
@pytest.mark.parametrize(("name", "v1", "v15"), [("resnet101", 7.6, 7.8), ("resnet152", 11.3, 11.5)])
def test_documented_complexity_is_the_measured_one(name, v1, v15):
    doc = BACKBONES[name].__doc__
    assert f"{v1} GMACs" in doc and f"costs {v15}" in doc
    with torch.device("meta"):
        default = count_macs(build_backbone(name, num_classes=1000), 224) / 1e9
        original = count_macs(build_backbone(name, num_classes=1000, stride_in_1x1=True), 224) / 1e9
    assert round(default, 1) == v15 and round(original, 1) == v1


def test_resnet18s_published_error_is_for_option_a():
    assert "option-A" in BACKBONES["resnet18"].__doc__
    config = yaml.safe_load((ROOT / "configs" / "imagenet_resnet18.yaml").read_text())
    assert config["model"]["backbone_args"]["shortcut"] == "A"
    net = build_backbone("resnet18", shortcut="A", num_classes=1000)
    assert count_parameters(net) == count_parameters(build_backbone("plain18", num_classes=1000))  # parameter free
    assert CPU  # (tests of this module run on the CPU)
