"""tasks.classify end to end: every config, learning, validate/predict from checkpoints, W&B offline logs."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
import torch
from datasets import CPU, logged_run, write_cifar, write_imagefolder
from PIL import Image
from wandb_offline import media_rows, metric_series

from tasks import plot
from tasks.classify import ClassificationTask, main
from tasks.outputs.confusion import read_counts

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
IMAGENET_CONFIGS = sorted(p for p in CONFIGS.glob("imagenet_*.yaml") if "ImageFolderDataModule" in p.read_text())
CIFAR_CONFIGS = sorted(CONFIGS.glob("cifar*_*.yaml"))


@pytest.fixture(scope="module")
def imagefolder(tmp_path_factory) -> Path:
    return write_imagefolder(tmp_path_factory.mktemp("imagefolder"), per_class=3, val_per_class=2, size=40)


@pytest.fixture(scope="module")
def cifar(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cifar")
    write_cifar(root, "cifar10")
    write_cifar(root, "cifar100")
    return root


def _tiny_imagenet_args(root: Path, runs: Path) -> list[str]:
    return [
        "--data.root", str(root), "--data.image_size", "32", "--data.eval_size", "null", "--data.eval_resize", "36",
        "--data.scale_range", "[36, 44]", "--data.batch_size", "2", "--data.num_workers", "0",
        "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "1", "--trainer.limit_val_batches", "1",
        "--trainer.default_root_dir", str(runs), *CPU,
    ]  # fmt: skip


def _tiny_cifar_args(root: Path, runs: Path) -> list[str]:
    return [
        "--data.root", str(root), "--data.batch_size", "2", "--data.num_workers", "0",
        "--trainer.max_steps", "1", "--trainer.limit_train_batches", "1", "--trainer.limit_val_batches", "1",
        "--trainer.default_root_dir", str(runs), *CPU,
    ]  # fmt: skip


def _only_run_dir(runs: Path) -> Path:
    dirs = [p for p in runs.glob("*/*") if p.is_dir()]
    assert len(dirs) == 1, dirs
    return dirs[0]


@pytest.mark.parametrize("config", IMAGENET_CONFIGS + CIFAR_CONFIGS, ids=lambda p: p.stem)
def test_every_config_fits_one_step_and_logs_to_wandb_offline(config, imagefolder, cifar, tmp_path):
    """Each config trains one step and validates on data in its real format, logging to W&B offline.

    ``--trainer.fast_dev_run`` disables loggers and checkpoints, so the W&B check uses the equivalent
    one-batch limits; ``test_fast_dev_run`` covers the flag itself.
    """
    runs = tmp_path / "runs"
    args = (
        _tiny_imagenet_args(imagefolder, runs) if config.stem.startswith("imagenet") else _tiny_cifar_args(cifar, runs)
    )
    main(["fit", "--config", str(config), *args])
    run_dir = _only_run_dir(runs)
    assert run_dir.parent.name == config.stem  # the run is named after its config
    assert (run_dir / "config.yaml").is_file()
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    logged = logged_run(run_dir / "wandb")
    assert logged["id"] == (run_dir / "wandb_id").read_text()
    assert metric_series(logged, "val/acc1") and metric_series(logged, "val/acc5") and metric_series(logged, "val/loss")
    assert metric_series(logged, "train/loss_epoch")
    assert (
        logged["config"]["backbone"]
        == torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["hyper_parameters"]["backbone"]
    )


def test_fast_dev_run(imagefolder, tmp_path, monkeypatch):
    cli = main(["fit", "--config", str(CONFIGS / "imagenet_resnet18.yaml"),
                *_tiny_imagenet_args(imagefolder, tmp_path), "--trainer.fast_dev_run", "true"])  # fmt: skip
    assert cli.config.fit.trainer.benchmark is True  # one crop size: cuDNN picks its algorithms once
    assert torch.backends.cudnn.benchmark is True
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)  # Lightning sets it for deterministic runs
    try:  # --trainer.deterministic keeps cuDNN's (non-deterministic) search off
        cli = main(["fit", "--config", str(CONFIGS / "imagenet_resnet18.yaml"),
                    *_tiny_imagenet_args(imagefolder, tmp_path), "--trainer.fast_dev_run", "true",
                    "--trainer.deterministic", "true"])  # fmt: skip
        assert cli.config.fit.trainer.benchmark is None and torch.backends.cudnn.benchmark is False
    finally:  # Lightning sets these process-wide
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.benchmark = False


def _fit_shapes(tmp_path: Path, per_class: int, val_per_class: int, epochs: int, batch: int, every: int):
    root = write_imagefolder(tmp_path / "shapes", per_class=per_class, val_per_class=val_per_class, size=32)
    runs = tmp_path / "runs"
    cli = main(
        [
            "fit", "--data", "datamodules.ImageFolderDataModule", "--data.root", str(root),
            "--data.image_size", "32", "--data.eval_resize", "32", "--data.batch_size", str(batch),
            "--data.num_workers", "0", "--data.train_augment", "none",
            "--model.backbone", "cifar_resnet20",
            "--model.optimizer", "torch.optim.SGD", "--model.optimizer.lr", "0.05", "--model.optimizer.momentum", "0.9",
            "--trainer.max_epochs", str(epochs), "--trainer.default_root_dir", str(runs), "--run_name", "shapes",
            "--trainer.log_every_n_steps", str(every), "--seed_everything", "0", *CPU,
        ]
    )  # fmt: skip
    return root, runs, cli, logged_run(_only_run_dir(runs) / "wandb")


@pytest.mark.slow
def test_a_small_model_learns_the_shapes(tmp_path):
    """Loss goes down and validation accuracy ends far above chance (20% for 5 classes)."""
    _, _, cli, logged = _fit_shapes(tmp_path, per_class=100, val_per_class=20, epochs=10, batch=32, every=50)
    losses = metric_series(logged, "train/loss_epoch")
    accuracy = metric_series(logged, "val/acc1")
    assert len(losses) == 10 and losses[-1] < 0.7 * losses[0]
    train_acc = metric_series(logged, "train/acc1")  # computed once per epoch, over the epoch
    assert len(train_acc) == 10 and train_acc[-1] > train_acc[0] + 0.2
    best = float(cli.trainer.checkpoint_callback.best_model_score)
    assert best == max(accuracy) and best > 0.45


def test_validate_reproduces_fit_and_the_papers_test_views_average_softmax(tmp_path):
    """A short fit (the learning itself is the slow test above): ``train/lr`` logged where the loggers write,
    ``validate`` of the best checkpoint gives fit's accuracy, 10-crop and multi-scale testing the accuracy of
    their views' averaged softmax, computed here by hand."""
    root, runs, cli, logged = _fit_shapes(tmp_path, per_class=8, val_per_class=4, epochs=3, batch=8, every=2)
    # the learning rate is logged by Lightning's LearningRateMonitor where the loggers write (before steps
    # 1, 3, ..., 13 of 3 x 5: log_every_n_steps 2), not every step, under the key train/lr, the main group's
    rates = metric_series(logged, "train/lr")
    assert len(rates) == 15 // 2
    assert rates[0] <= 0.05 and all(a > b for a, b in zip(rates, rates[1:]))  # the cosine decay
    # 16 validation images a validation (the task's default log_samples), each captioned with its prediction
    # and its true class
    samples = media_rows(logged, "val/samples")
    assert [s["step"] for s in samples] == [5, 10, 15] and all(s["count"] == 16 for s in samples)
    assert all(re.fullmatch(r"pred: \w+ \(\d\.\d\d\) \| true: \w+", c) for s in samples for c in s["captions"])
    assert len(metric_series(logged, "train/acc1")) == 3  # once per epoch, over the epoch
    best = float(cli.trainer.checkpoint_callback.best_model_score)
    assert best == max(metric_series(logged, "val/acc1"))
    # python -m tasks.plot on the run directory draws from metrics.csv what W&B got
    curves = json.loads(Image.open(plot.main([str(_only_run_dir(runs))])).text["panels"])
    assert curves["acc1"] == {"train/acc1": 3, "val/acc1": 3} and curves["lr"] == {"train/lr": len(rates)}
    assert set(curves["loss"]) == {"train/loss_step", "train/loss_epoch", "val/loss"}
    n_val = 20

    # validate reproduces the accuracy recorded at the end of fit, from the saved checkpoint
    best_path = cli.trainer.checkpoint_callback.best_model_path
    assert Path(best_path).name == "best.ckpt"

    def validate(*data: str):
        return main(
            [
                "validate", "--data", "datamodules.ImageFolderDataModule", "--data.root", str(root),
                "--data.image_size", "32", "--data.batch_size", "8", "--data.num_workers", "0", *data,
                "--ckpt_path", best_path, "--trainer.default_root_dir", str(runs), "--run_name", "shapes", *CPU,
            ]
        )  # fmt: skip

    again = validate("--data.eval_resize", "32")
    assert again.trainer.callback_metrics["val/acc1"].item() == pytest.approx(best, abs=1e-6)

    # 10-crop testing (ResNet Sec. 3.4): the reported accuracy is that of the ten crops' averaged softmax
    ten = validate("--data.eval_resize", "40", "--data.eval_crops", "ten")
    model, dm, hits = ten.model.eval(), ten.datamodule, 0
    by_hand = torch.zeros(5, 5, dtype=torch.long)
    with torch.no_grad():
        for batch in dm.val_dataloader():
            views = dm.normalize(batch["image"])  # B x 10 x 3 x 32 x 32
            assert views.shape[1:] == (10, 3, 32, 32)
            probs = torch.stack([model(views[:, v]).softmax(1) for v in range(10)]).mean(0)
            hits += int((probs.argmax(1) == batch["label"]).sum())
            by_hand.index_put_((batch["label"], probs.argmax(1)), torch.tensor(1), accumulate=True)
    assert ten.trainer.callback_metrics["val/acc1"].item() == pytest.approx(hits / n_val, abs=1e-6)
    # the validation's confusion matrix, written into the run directory: the same predictions, counted by hand
    names, counts = read_counts(Path(ten.trainer.default_root_dir) / "confusion" / "val.csv")
    assert names == dm.class_names and torch.equal(counts, by_hand)
    assert (Path(ten.trainer.default_root_dir) / "confusion" / "val.png").is_file()

    # fully-convolutional multi-scale testing (Sec. 3.4): whole images at several shorter sides, one by one
    multi = validate("--data.eval_crops", "multiscale", "--data.eval_scales", "[24, 32, 48]")
    model, dm, hits = multi.model.eval(), multi.datamodule, 0
    with torch.no_grad():
        for batch in dm.val_dataloader():
            for views, label in zip(dm.normalize(batch["image"]), batch["label"].tolist()):
                assert [min(v.shape[-2:]) for v in views] == [24, 32, 48]
                probs = torch.stack([model(v[None]).softmax(1)[0] for v in views]).mean(0)
                hits += int(probs.argmax()) == label
    assert multi.trainer.callback_metrics["val/acc1"].item() == pytest.approx(hits / n_val, abs=1e-6)

    # predict writes one row per image with five classes, named, from the checkpoint alone (no data.root)
    out = tmp_path / "predictions.csv"
    main(
        [
            "predict", "--data", "datamodules.ImageFolderDataModule", "--data.predict_root", str(root / "val"),
            "--data.image_size", "32", "--data.eval_resize", "32", "--data.num_workers", "0",
            "--model.predictions_file", str(out), "--ckpt_path", best_path, "--trainer.logger", "false",
            "--trainer.default_root_dir", str(runs), *CPU,
        ]
    )  # fmt: skip
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == n_val
    assert {r["class1"] for r in rows} <= {"circle", "square", "triangle", "star", "ring"}
    assert all(r["class5"] and 0 <= float(r["score1"]) <= 1 for r in rows)
    correct = sum(Path(r["path"]).parent.name == r["class1"] for r in rows)
    assert correct / len(rows) == pytest.approx(best, abs=1e-6)


def test_cifar_predict_classifies_the_test_batch(cifar, tmp_path):
    """CIFAR has no image files to point at: predict classifies the test batch, one row per index."""
    runs = tmp_path / "runs"
    data = ["--data", "datamodules.CIFARDataModule", "--model.backbone", "cifar_resnet20", "--trainer.logger", "false"]
    fit = main(["fit", *data, *_tiny_cifar_args(cifar, runs)])
    checkpoint = fit.trainer.checkpoint_callback.last_model_path
    with pytest.raises(ValueError, match="predict needs a trained model: pass --ckpt_path"):
        main(["predict", *data, *_tiny_cifar_args(cifar, runs)])
    out = tmp_path / "predictions.csv"
    main(["predict", *data, *_tiny_cifar_args(cifar, runs), "--ckpt_path", checkpoint,
          "--model.predictions_file", str(out)])  # fmt: skip
    rows = list(csv.DictReader(out.open()))
    assert [r["path"] for r in rows] == [f"#{i:05d}" for i in range(12)]  # write_cifar's 12 test images
    assert {r["class1"] for r in rows} <= set(fit.datamodule.class_names)


def test_num_classes_must_agree_with_the_data(imagefolder, tmp_path):
    with pytest.raises(ValueError, match="model.num_classes=7 but the dataset has 5 classes"):
        main(["fit", "--config", str(CONFIGS / "imagenet_resnet18.yaml"), *_tiny_imagenet_args(imagefolder, tmp_path),
              "--model.num_classes", "7"])  # fmt: skip


def test_missing_root_explains_the_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"does not exist\. Expected an ImageFolder tree: <root>/train/"):
        main(["fit", "--config", str(CONFIGS / "imagenet_resnet18.yaml"),
              *_tiny_imagenet_args(tmp_path / "nowhere", tmp_path / "runs")])  # fmt: skip
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py.*cifar-10-python.tar.gz"):
        main(["fit", "--config", str(CONFIGS / "cifar10_resnet110.yaml"),
              *_tiny_cifar_args(tmp_path / "nowhere", tmp_path / "runs")])  # fmt: skip


def test_mixup_cutmix_label_smoothing_and_no_decay_groups():
    task = ClassificationTask(
        backbone="cifar_resnet20", num_classes=5, mixup_alpha=0.2, cutmix_alpha=1.0, label_smoothing=0.1,
        weight_decay_norm_bias=False,
    )  # fmt: skip
    images, labels = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    mixed, soft = task._apply_mixing(images, labels)
    assert soft.shape == (4, 5) and torch.allclose(soft.sum(1), torch.ones(4))
    from tasks.core.optim import parameter_groups

    decay, no_decay = parameter_groups(task, weight_decay_norm_bias=False)
    assert no_decay["weight_decay"] == 0.0
    assert all(p.ndim == 1 for p in no_decay["params"]) and all(p.ndim > 1 for p in decay["params"])


def test_weights_backbone_from_a_classify_checkpoint_and_torchvision_file(tmp_path):
    import torchvision

    from backbones import WeightsError

    path = tmp_path / "r18.pth"
    ref = torchvision.models.resnet18()
    torch.save(ref.state_dict(), path)
    task = ClassificationTask(backbone="resnet18", num_classes=3, weights_backbone=str(path))
    assert torch.equal(task.backbone.layer3[0].conv1.weight, ref.layer3[0].conv1.weight)
    assert task.backbone.fc.out_features == 3
    with pytest.raises(WeightsError, match="does not fit ResNet 'resnet34'"):
        ClassificationTask(backbone="resnet34", num_classes=3, weights_backbone=str(path))


def test_the_wandb_api_key_is_never_written(imagefolder, tmp_path, monkeypatch):
    secret = "0123456789abcdef0123456789abcdef01234567"
    monkeypatch.setenv("WANDB_API_KEY", secret)
    runs = tmp_path / "runs"
    main(["fit", "--config", str(CONFIGS / "imagenet_resnet18.yaml"), *_tiny_imagenet_args(imagefolder, runs)])
    files = [p for p in runs.rglob("*") if p.is_file()]
    assert any(p.suffix == ".wandb" for p in files) and any(p.suffix == ".ckpt" for p in files)
    leaked = [p for p in files if secret.encode() in p.read_bytes()]
    assert not leaked


def test_print_config_shows_the_full_resolved_config(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(CONFIGS / "imagenet_resnet50.yaml"), "--model.backbone", "resnext50_32x4d",
              "--print_config"])  # fmt: skip
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for expected in (
        "backbone: resnext50_32x4d",
        "stride_in_1x1: true",
        "class_path: torch.optim.SGD",
        "milestones:",
        "class_path: datamodules.ImageFolderDataModule",
        "monitor: val/acc1",
    ):
        assert expected in out, expected
