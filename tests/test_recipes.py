"""Modern training recipes (issue 18): augmentation policies, random erasing, repeated augmentation, cosine
with warm-up, an EMA of the weights, and torchvision's 80.9 % ResNet-50 recipe as a config."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from datasets import write_imagefolder
from torchvision.transforms import v2

from datamodules import ImageFolderDataModule
from datamodules.images import read_image
from datamodules.loading import EpochSeeded, ResumableDataLoader, make_loader
from datamodules.samplers import RepeatedAugmentationSampler
from tasks import classify
from tasks.core.ema import ExponentialMovingAverage
from tasks.core.schedulers import WarmupCosineLR

ROOT = Path(__file__).resolve().parents[1]
BILINEAR = v2.InterpolationMode.BILINEAR
#: torchvision's classification reference (references/classification/presets.py), per policy
REFERENCE = {
    "trivial_wide": lambda: v2.TrivialAugmentWide(interpolation=BILINEAR),
    "rand": lambda: v2.RandAugment(interpolation=BILINEAR, magnitude=9),
    "auto_imagenet": lambda: v2.AutoAugment(v2.AutoAugmentPolicy.IMAGENET, interpolation=BILINEAR),
}


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return write_imagefolder(tmp_path_factory.mktemp("recipes") / "d", per_class=6, val_per_class=2, size=48)


@pytest.mark.parametrize("policy", sorted(REFERENCE))
def test_each_policy_and_erasing_equal_torchvisions_transforms_with_the_same_draws(folder, policy):
    """A training sample of the datamodule (seeded per (epoch, index)) equals torchvision's reference
    pipeline -- crop, flip, the policy, erasing with the mean color -- run on the same file with the same seed."""
    dm = ImageFolderDataModule(
        root=str(folder), image_size=40, train_augment="random_resized_crop", auto_augment=policy, random_erase=0.5,
        batch_size=4, num_workers=0,
    )  # fmt: skip
    dm.setup("fit")
    seeded = EpochSeeded(dm.datasets["train"], seed=123)
    reference = v2.Compose([
        v2.RandomResizedCrop(40, scale=(0.25, 1.0), antialias=True), v2.RandomHorizontalFlip(), REFERENCE[policy](),
        v2.RandomErasing(p=0.5, value=[round(255 * m) for m in dm.hparams.mean]),
    ])  # fmt: skip
    changed = 0
    for epoch, index in [(0, 0), (0, 7), (3, 11), (5, 29)]:
        ours = seeded[(epoch, index)]["image"]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(((123 * 1_000_003 + epoch) * 10_000_019 + index) % 2**63)
            theirs = reference(read_image(dm.datasets["train"].samples[index][0]))
        assert torch.equal(ours, theirs)
        plain = v2.Compose(reference.transforms[:2])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(((123 * 1_000_003 + epoch) * 10_000_019 + index) % 2**63)
            changed += not torch.equal(plain(read_image(dm.datasets["train"].samples[index][0])), ours)
    assert changed >= 3  # the policy and erasing did change the crops


def test_an_unknown_policy_or_a_bad_rate_is_a_one_line_error(folder):
    with pytest.raises(ValueError, match="auto_augment='ta_wide' is not one of 'none', 'trivial_wide'"):
        ImageFolderDataModule(root=str(folder), auto_augment="ta_wide")
    with pytest.raises(ValueError, match="data.random_erase=1.5 must be a probability"):
        ImageFolderDataModule(root=str(folder), random_erase=1.5)
    with pytest.raises(ValueError, match="data.repeated_augment=0 must be 1"):
        ImageFolderDataModule(root=str(folder), repeated_augment=0)


def test_on_the_gpu_decoding_path_a_policy_makes_the_workers_finish_every_image(folder, caplog):
    """The GPU path crops and flips but has no policy or erasing: the workers take the whole training
    share (the same per-sample draws as the CPU path), and the log says so."""
    plain = ImageFolderDataModule(root=str(folder), decode_device="cuda", cpu_share=0.25)
    assert plain.cpu_share == 0.25
    with caplog.at_level("WARNING"):
        dm = ImageFolderDataModule(root=str(folder), decode_device="cuda", cpu_share=0.25, auto_augment="rand")
    assert dm.cpu_share == 1.0 and "every training image is finished there (cpu_share 1; was 0.25)" in caplog.text


def test_resuming_mid_epoch_with_a_policy_and_repeats_gives_the_same_batches(folder):
    def loader() -> ResumableDataLoader:
        dm = ImageFolderDataModule(
            root=str(folder), image_size=32, auto_augment="trivial_wide", random_erase=0.25, repeated_augment=3,
            batch_size=4, num_workers=0,
        )  # fmt: skip
        dm.setup("fit")
        torch.manual_seed(5)
        return make_loader(dm.datasets["train"], batch_size=4, num_workers=0, train=True, repeats=3)

    whole = loader()
    whole.sampler.set_epoch(2)
    batches = list(whole)
    assert isinstance(whole.sampler, RepeatedAugmentationSampler) and len(batches) == 7
    resumed = loader()
    resumed.load_state_dict({"epoch": 2, "samples": 3 * 4})  # three batches were trained on
    for a, b in zip(batches[3:], list(resumed), strict=True):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["index"], b["index"])


class _Draws:
    def __len__(self) -> int:
        return 48

    def __getitem__(self, index: int) -> dict:
        return {"index": index, "draw": torch.rand(())}


def _repeated_epoch(rank: int, init: str, out: str) -> None:
    import torch.distributed as dist

    torch.manual_seed(77)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        loader = make_loader(_Draws(), batch_size=4, num_workers=0, train=True, repeats=4)
        loader.sampler.set_epoch(1)
        rows = [(i, d) for b in loader for i, d in zip(b["index"].tolist(), b["draw"].tolist())]
        Path(out, f"{rank}.json").write_text(json.dumps(rows))
    finally:
        dist.destroy_process_group()


def test_repeated_augmentation_on_two_gloo_ranks(tmp_path):
    """torchvision's RASampler: each drawn image 4 times per epoch over the 2 ranks (both ranks get
    copies), every copy with its own augmentation draw, and the epoch keeps the dataset's length."""
    import torch.multiprocessing as mp

    mp.spawn(_repeated_epoch, args=(f"file://{tmp_path / 'store'}", str(tmp_path)), nprocs=2)
    ranks = [json.loads((tmp_path / f"{r}.json").read_text()) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 24  # 48 images / 2 ranks, as without repetition
    copies: dict[int, list[tuple[int, float]]] = {}
    for rank, rows in enumerate(ranks):
        for index, draw in rows:
            copies.setdefault(index, []).append((rank, draw))
    assert len(copies) == 12 and all(len(c) == 4 for c in copies.values())  # 48 / 4 images, 4 times each
    assert all({rank for rank, _ in c} == {0, 1} for c in copies.values())
    assert all(len({draw for _, draw in c}) == 4 for c in copies.values())  # distinct draws per repeat
    sampler = RepeatedAugmentationSampler(_Draws(), repeats=4, seed=0)
    sampler.set_epoch(1)
    order = torch.randperm(48, generator=torch.Generator().manual_seed(1)).tolist()
    assert [(index, repeat) for _, index, repeat in sampler] == [(i, r) for i in order[:12] for r in range(4)]


def test_cosine_with_warmup_equals_the_closed_form_and_torchvisions_schedule_across_a_resume():
    """torchvision's recipe (--lr-scheduler cosineannealinglr --lr-warmup-epochs 5 --lr-warmup-method linear,
    decay 0.01) as ``WarmupCosineLR``, stepped per epoch; interrupted at epoch 37 and resumed."""

    def ours(start_state=None, steps=60):
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
        scheduler = WarmupCosineLR(optimizer, total_iters=60, warmup_iters=5, warmup_factor=0.01)
        if start_state is not None:
            optimizer.param_groups[0]["initial_lr"] = 0.5
            scheduler.load_state_dict(start_state)
            scheduler.step()
        rates, states = [], []
        while scheduler.last_epoch < steps:
            rates.append(optimizer.param_groups[0]["lr"])
            states.append(scheduler.state_dict())
            optimizer.step()
            scheduler.step()
        return rates, states

    def closed_form(t: int) -> float:
        if t < 5:
            return 0.5 * (0.01 + 0.99 * t / 5)
        return 0.5 * 0.5 * (1 + math.cos(math.pi * (t - 5) / 55))

    rates, states = ours()
    assert rates == pytest.approx([closed_form(t) for t in range(60)], rel=1e-12, abs=1e-15)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
    warm = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.01, total_iters=5)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=55)
    theirs = torch.optim.lr_scheduler.SequentialLR(optimizer, [warm, cosine], milestones=[5])
    reference = []
    for _ in range(60):
        reference.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        theirs.step()
    assert rates == pytest.approx(reference, rel=1e-9, abs=1e-12)
    resumed, _ = ours(start_state=states[36])
    assert resumed == rates[37:]  # identical after an interrupt/resume


def _ema_fit(root: Path, runs: Path, name: str, extra: list[str]):
    args = [
        "fit", "--data", "datamodules.ImageFolderDataModule", "--data.root", str(root), "--data.image_size", "32",
        "--data.batch_size", "6", "--data.num_workers", "0", "--model.backbone", "cifar_resnet20",
        "--trainer.max_epochs", "2", "--trainer.default_root_dir", str(runs), "--run_name", name, "--seed_everything",
        "0", "--trainer.deterministic", "true", "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
        "--trainer.callbacks+=tasks.core.ema.ExponentialMovingAverage", "--trainer.callbacks.decay", "0.8",
        "--trainer.callbacks.every_n_steps", "2", "--trainer.callbacks.adjust", "false",
        "--trainer.callbacks+=datasets.WeightRecorder", *extra,
    ]  # fmt: skip
    return classify.main(args)


def test_ema_equals_a_hand_computation_validates_both_and_checkpoints_the_average(folder, tmp_path):
    cli = _ema_fit(folder, tmp_path, "ema", [])
    recorder = next(c for c in cli.trainer.callbacks if type(c).__name__ == "WeightRecorder")
    steps = recorder.weights  # the classifier's weights after every optimizer step (5 per epoch)
    assert len(steps) == 10
    expected = steps[0].clone()  # updates after steps 1, 3, 5, 7, 9 (every 2nd, from the first)
    for weights in steps[2::2]:
        expected = 0.8 * expected + (1.0 - 0.8) * weights
    last = torch.load(next(tmp_path.rglob("last.ckpt")), weights_only=True)
    assert last["weights"] == "ema" and last["global_step"] == 10
    assert torch.equal(last["state_dict"]["backbone.fc.weight"], expected)
    assert torch.equal(last["current_model_state"]["backbone.fc.weight"], steps[-1])
    metrics = cli.trainer.callback_metrics
    assert {"val/acc1", "val/loss", "val_ema/acc1", "val_ema/loss"} <= set(metrics)
    assert float(metrics["val/loss"]) != float(metrics["val_ema/loss"])
    assert cli.trainer.checkpoint_callback.monitor == "val_ema/acc1"  # best.ckpt holds the average: chosen by it
    best = torch.load(next(tmp_path.rglob("best.ckpt")), weights_only=True)
    assert best["weights"] == "ema" and "current_model_state" in best


def test_torchvisions_adjusted_decay():
    """``alpha = min(1, (1 - decay) * world * batch * steps / epochs)``: torchvision's recipe on 8 GPUs."""

    class Trainer:
        world_size, accumulate_grad_batches, max_epochs = 8, 1, 600
        datamodule = type("DM", (), {"batch_size": 128})()

    ema = ExponentialMovingAverage()
    assert ema.adjusted_decay(Trainer()) == pytest.approx(1 - 2e-5 * 8 * 128 * 32 / 600)
    assert ExponentialMovingAverage(adjust=False, decay=0.9).adjusted_decay(Trainer()) == 0.9


def test_the_tv2_config_fits_a_step_with_every_part_of_the_recipe_active(folder, tmp_path):
    cli = classify.main([
        "fit", "--config", str(ROOT / "configs" / "imagenet_resnet50_tv2.yaml"), "--data.root", str(folder),
        "--data.batch_size", "4", "--data.num_workers", "0", "--trainer.max_steps", "1", "--trainer.max_epochs", "2",
        "--trainer.limit_val_batches", "1", "--trainer.num_sanity_val_steps", "0", "--trainer.logger", "false",
        "--trainer.default_root_dir", str(tmp_path), "--trainer.enable_progress_bar", "false",
    ])  # fmt: skip
    model, dm, trainer = cli.model, cli.datamodule, cli.trainer
    assert trainer.global_step == 1
    assert model.hparams.label_smoothing == 0.1 and model.mix == (0.2, 1.0)
    optimizer = trainer.optimizers[0]
    assert type(optimizer).__name__ == "SGD" and optimizer.defaults["weight_decay"] == 2e-5
    assert any(g["weight_decay"] == 0.0 for g in optimizer.param_groups)  # no decay on BatchNorm
    scheduler = trainer.lr_scheduler_configs[0]
    assert type(scheduler.scheduler).__name__ == "WarmupCosineLR" and scheduler.interval == "epoch"
    assert scheduler.scheduler.warmup_iters == 5 and scheduler.scheduler.warmup_factor == 0.01
    names = [type(t).__name__ for t in dm.datasets["train"].transform.transforms]
    assert names == ["RandomResizedCrop", "RandomHorizontalFlip", "TrivialAugmentWide", "RandomErasing"]
    assert dm.hparams.image_size == 176 and dm.hparams.eval_resize == 232 and dm.hparams.eval_size == 224
    assert isinstance(trainer.train_dataloader.sampler, RepeatedAugmentationSampler)
    assert trainer.train_dataloader.sampler.repeats == 4
    ema = next(c for c in trainer.callbacks if isinstance(c, ExponentialMovingAverage))
    assert ema.every_n_steps == 32 and ema.decay == 0.99998 and ema.warmup_epochs == 5
    assert ema.averaged_task() is not None and trainer.checkpoint_callback.monitor == "val_ema/acc1"


@pytest.mark.parametrize(
    ("task", "config", "metric"),
    [
        ("detect", "demo_detect", "mAP"),
        ("segment", "demo_segment", "mIoU"),
        ("localize", "demo_localize", "loc_err_gt"),
    ],
)
def test_every_task_validates_its_ema_beside_the_trained_model(task, config, metric, tmp_path):
    import importlib

    from datasets import CPU

    cli = importlib.import_module(f"tasks.{task}").main([
        "fit", "--config", str(ROOT / "configs" / f"{config}.yaml"), "--data.root", str(tmp_path / "data"),
        "--data.num_workers", "0", "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2",
        "--trainer.limit_val_batches", "2",
        "--trainer.num_sanity_val_steps", "0", "--trainer.logger", "false", "--trainer.default_root_dir",
        str(tmp_path / "runs"), "--trainer.callbacks+=tasks.core.ema.ExponentialMovingAverage",
        "--trainer.callbacks.every_n_steps", "1", "--trainer.callbacks.adjust", "false", *CPU,
    ])  # fmt: skip
    metrics = cli.trainer.callback_metrics
    assert f"val/{metric}" in metrics and f"val_ema/{metric}" in metrics, sorted(metrics)
    last = torch.load(next((tmp_path / "runs").rglob("last.ckpt")), weights_only=True)
    assert last["weights"] == "ema" and set(last["state_dict"]) == set(last["current_model_state"])
