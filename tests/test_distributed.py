"""DDP (2 CPU ranks, gloo) gives the same answers as one process; SLURM is detected and requeues."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datasets import CPU, write_coco, write_imagefolder

from datamodules.loading import make_loader
from tasks import classify

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent


def _run(module: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{TESTS}", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    return result


DDP = ["--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu"]
ONE = ["--trainer.devices", "1", "--trainer.accelerator", "cpu"]
QUIET = [
    "--trainer.enable_progress_bar",
    "false",
    "--trainer.enable_model_summary",
    "false",
    "--trainer.logger",
    "false",
]


def _dump(path: Path) -> list[str]:
    return ["--trainer.callbacks+=datasets.MetricsDump", "--trainer.callbacks.path", str(path)]


CASES = {
    # task module: (data args, model args, metric that must agree exactly)
    "tasks.classify": (
        lambda root: ["--data", "datamodules.ImageFolderDataModule", "--data.root", str(root),
                      "--data.image_size", "32", "--data.eval_resize", "32", "--data.batch_size", "4",
                      "--data.eval_batch_size", "2"],
        ["--model.backbone", "cifar_resnet20"], ["val/acc1", "val/acc5"],
    ),
    "tasks.detect": (
        lambda root: ["--data", "datamodules.COCODetectionDataModule", "--data.root", str(root),
                      "--data.batch_size", "2"],
        ["--model.backbone", "resnet18", "--model.norm", "bn", "--model.freeze_at", "0", "--model.min_size", "96",
         "--model.max_size", "96", "--model.fpn_channels", "32", "--model.box_score_thresh", "0.0",
         "--model.detector_args", '{"rpn_post_nms_top_n_train": 100, "rpn_post_nms_top_n_test": 100}'],
        ["val/mAP", "val/AP50", "val/AP75"],
    ),
    "tasks.instance_segment": (
        lambda root: ["--data", "datamodules.COCOInstanceDataModule", "--data.root", str(root),
                      "--data.batch_size", "2"],
        ["--model.backbone", "resnet18", "--model.norm", "bn", "--model.freeze_at", "0", "--model.min_size", "96",
         "--model.max_size", "96", "--model.fpn_channels", "32", "--model.box_score_thresh", "0.0",
         "--model.detector_args", '{"rpn_post_nms_top_n_train": 100, "rpn_post_nms_top_n_test": 100}'],
        ["val/mask_mAP", "val/mask_AP50", "val/mask_AP75", "val/mAP", "val/AP50"],
    ),
    "tasks.segment": (
        lambda root: ["--data", "datamodules.COCOSegmentationDataModule", "--data.root", str(root),
                      "--data.categories", "all", "--data.min_area", "0", "--data.base_size", "64",
                      "--data.crop_size", "48", "--data.batch_size", "2", "--data.cache_dir", str(root / "cache")],
        ["--model.backbone", "resnet18"], ["val/mIoU", "val/pixel_acc"],
    ),
}  # fmt: skip


#: the cases whose two-rank fit takes the longest run in the long tier
SLOW_CASES = {"tasks.instance_segment"}


@pytest.mark.parametrize("module", [pytest.param(m, marks=pytest.mark.slow) if m in SLOW_CASES else m for m in CASES])
def test_ddp_fits_and_evaluates_exactly_like_one_process(module, tmp_path):
    data, model, metrics = CASES[module]
    if module == "tasks.classify":
        root = write_imagefolder(tmp_path / "data", per_class=2, val_per_class=1, size=32)  # 5 val images: odd
    else:
        root = write_coco(tmp_path / "data", train_images=6, val_images=6)  # 7 val images with the empty one
    common = [
        *data(root),
        "--data.num_workers",
        "0",
        *model,
        *QUIET,
        "--trainer.default_root_dir",
        str(tmp_path / "runs"),
    ]
    # fit under DDP on 2 ranks (Lightning launches the second process); its last validation is the two ranks'
    # evaluation of the weights last.ckpt holds (it is written after that validation)
    # segmentation under DDP trains with SyncBatchNorm (torchvision's reference converts the model): counted
    norms = ["--trainer.callbacks+=datasets.NormKinds", "--trainer.callbacks.path", str(tmp_path / "norms.json")]
    norms = norms if module == "tasks.segment" else []
    _run(module, ["fit", *common, *DDP, "--trainer.max_epochs", "1", "--run_name", "ddp",
                  *_dump(tmp_path / "fit_ddp.json"), *norms], tmp_path)  # fmt: skip
    if module == "tasks.segment":
        kinds = json.loads((tmp_path / "norms.json").read_text())
        assert kinds["SyncBatchNorm"] > 0 and "BatchNorm2d" not in kinds, kinds
    ckpt = next((tmp_path / "runs" / "ddp").rglob("last.ckpt"))
    two = json.loads((tmp_path / "fit_ddp.json").read_text())
    assert set(metrics) <= set(two)
    # the same checkpoint evaluated by one process (in this one)
    one = _in_process(module, ["validate", *common, *ONE, "--ckpt_path", str(ckpt)])
    for name in metrics:
        assert one[name] == two[name], (name, one[name], two[name])


def _in_process(module: str, args: list[str]) -> dict:
    """The command's ``main`` run here, not in a new process: its logged metrics (and ``best_model_path``)."""
    import importlib

    cli = importlib.import_module(module).main(args)
    found = {k: float(v) for k, v in cli.trainer.callback_metrics.items()}
    return {**found, "best_model_path": cli.trainer.checkpoint_callback.best_model_path}


#: the 2015 tracks' own metrics (VOC's devkit AP, ILSVRC's localization errors): one seeded, untrained
#: network evaluated by one process and by two ranks over an odd-sized validation set
TRACKS = {
    "voc": ("tasks.detect", [
        "--data", "datamodules.ShapesVOCDataModule", "--data.trainval", "4", "--data.test", "7", "--data.size", "64",
        "--data.batch_size", "2", "--model.backbone", "resnet18", "--model.norm", "bn", "--model.freeze_at", "0",
        "--model.min_size", "64", "--model.max_size", "64", "--model.fpn_channels", "32",
        "--model.box_score_thresh", "0.0", "--model.detector_args",
        '{"rpn_post_nms_top_n_train": 100, "rpn_post_nms_top_n_test": 100}',
    ], ["val/mAP", "val/AP/circle", "val/AP/star"]),
    "localization": ("tasks.localize", [
        "--data", "datamodules.ShapesLocalizationDataModule", "--data.train_per_class", "1",
        "--data.val_per_class", "1", "--data.size", "48", "--data.batch_size", "2", "--model.backbone", "resnet18",
    ], ["val/acc1", "val/loc_err_top5", "val/loc_err_gt"]),
}  # fmt: skip


@pytest.mark.parametrize("track", list(TRACKS))
def test_the_tracks_metrics_on_two_ranks_equal_one_process(track, tmp_path):
    module, args, metrics = TRACKS[track]
    common = [*args, "--data.root", str(tmp_path / "data"), "--data.num_workers", "0", "--seed_everything", "0",
              *QUIET, "--trainer.default_root_dir", str(tmp_path / "runs")]  # fmt: skip
    one = _in_process(module, ["validate", *common, *ONE])  # (writes the data once)
    _run(module, ["validate", *common, *DDP, *_dump(tmp_path / "two.json")], tmp_path)
    two = json.loads((tmp_path / "two.json").read_text())
    for name in metrics:
        assert one[name] == two[name], (name, one[name], two[name])


def test_torchrun_launch_shares_one_run_directory(tmp_path):
    root = write_imagefolder(tmp_path / "data", per_class=2, val_per_class=1, size=32)
    data, model, _ = CASES["tasks.classify"]
    env_args = [*data(root), "--data.num_workers", "0", *model, *QUIET, *DDP, "--trainer.max_epochs", "1",
                "--trainer.default_root_dir", str(tmp_path / "runs"), "--run_name", "torchrun"]  # fmt: skip
    _run("torch.distributed.run", ["--nproc_per_node", "2", "--master_port", "29533", "-m", "tasks.classify", "fit",
                                   *env_args], tmp_path)  # fmt: skip
    runs = [p for p in (tmp_path / "runs" / "torchrun").iterdir() if p.is_dir()]
    assert len(runs) == 1 and (runs[0] / "checkpoints" / "last.ckpt").is_file()


def test_slurm_environment_requeue_and_resume(tmp_path, monkeypatch):
    from lightning.fabric.plugins.environments import SLURMEnvironment

    from tasks.run.slurm import SlurmRequeue

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"  # records the requeue instead of talking to a SLURM controller
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "scontrol.log"}\n')
    scontrol.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    for key, value in {"SLURM_NTASKS": "1", "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "zoo", "SLURM_PROCID": "0",
                       "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_NODELIST": "localhost",
                       "SLURM_NTASKS_PER_NODE": "1"}.items():  # fmt: skip
        monkeypatch.setenv(key, value)
    root = write_imagefolder(tmp_path / "data", per_class=4, val_per_class=1, size=32)  # 20 images: 5 steps of 4
    data, model, _ = CASES["tasks.classify"]
    args = ["fit", *data(root), "--data.num_workers", "0", *model, *CPU, "--trainer.max_epochs", "3",
            "--trainer.default_root_dir", str(tmp_path / "runs"), "--run_name", "slurm", "--seed_everything", "0",
            "--trainer.callbacks+=datasets.StepRecorder"]  # fmt: skip
    first = classify.main([*args, "--trainer.callbacks.path", str(tmp_path / "steps1.json"),
                           "--trainer.callbacks.sigterm_at", "7", "--trainer.callbacks.signal_name", "SIGUSR1",
                           "--trainer.callbacks.stop", "true"])  # fmt: skip
    environment = first.trainer._accelerator_connector.cluster_environment
    assert isinstance(environment, SLURMEnvironment)  # detected from SLURM_* variables
    assert not environment.auto_requeue and any(isinstance(c, SlurmRequeue) for c in first.trainer.callbacks)
    run_dir = tmp_path / "runs" / "slurm" / "job_4242"
    assert Path(first.trainer.default_root_dir) == run_dir and (run_dir / "hpc_ckpt_1.ckpt").is_file()
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "4242"]
    run_id = (run_dir / "wandb_id").read_text()
    # the requeued job keeps its id, finds the same run directory and resumes from the hpc checkpoint
    resumed = classify.main([*args, "--trainer.callbacks.path", str(tmp_path / "steps2.json")])
    steps = json.loads((tmp_path / "steps2.json").read_text())
    assert steps[0][0] == 8 and resumed.trainer.global_step == 15  # continued after step 7, to 3 epochs of 5 steps
    assert Path(resumed.trainer.default_root_dir) == run_dir and (run_dir / "wandb_id").read_text() == run_id
    # ... and ends where a run that was never stopped ends: the checkpoint was written after step 7's batch
    monkeypatch.delenv("SLURM_JOB_ID")
    whole = classify.main([*args, "--run_name", "whole", "--trainer.callbacks.path", str(tmp_path / "steps3.json")])
    for key, value in whole.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key


class _Indices:
    def __len__(self) -> int:
        return 40

    def __getitem__(self, index: int) -> dict:
        return {"index": index, "draw": torch.rand(())}


def _rank_epoch(rank: int, init: str, out: str) -> None:
    import torch.distributed as dist

    from datamodules.loading import make_loader, run_seed

    torch.manual_seed(1000 + rank)  # as processes started by torchrun with seed_everything: true
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        loader = make_loader(_Indices(), batch_size=4, num_workers=0, train=True)
        batches = list(loader)
        Path(out, f"{rank}.json").write_text(json.dumps({
            "seed": run_seed(),
            "indices": [i for b in batches for i in b["index"].tolist()],
            "draws": {i: d for b in batches for i, d in zip(b["index"].tolist(), b["draw"].tolist())},
        }))  # fmt: skip
    finally:
        dist.destroy_process_group()


def test_ranks_with_different_seeds_still_share_one_shuffle(tmp_path):
    """Each rank's shuffle and per-sample draws use rank 0's seed: the ranks split the epoch exactly."""
    import torch.multiprocessing as mp

    mp.spawn(_rank_epoch, args=(f"file://{tmp_path / 'store'}", str(tmp_path)), nprocs=2)
    ranks = [json.loads((tmp_path / f"{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["seed"] == ranks[1]["seed"] == 1000
    assert sorted(ranks[0]["indices"] + ranks[1]["indices"]) == list(range(40))
    one = json.loads((tmp_path / "0.json").read_text())["draws"]
    torch.manual_seed(1000)  # the draws a single process with rank 0's seed makes for the same samples
    single = make_loader(_Indices(), batch_size=4, num_workers=0, train=True).dataset
    assert all(abs(single[(0, int(i))]["draw"].item() - d) < 1e-7 for i, d in one.items())


@pytest.mark.parametrize(
    "env",
    [{}, {"SLURM_NTASKS": "2", "SLURM_JOB_NAME": "zoo"}, {"SLURM_NTASKS": "2", "SLURM_JOB_NAME": "bash"},
     {"SLURM_NTASKS": "1", "SLURM_JOB_NAME": "interactive"}, {"SLURM_JOB_NAME": "zoo"}],
)  # fmt: skip
def test_slurm_detection_is_lightnings_without_its_warning(env, monkeypatch):
    import warnings

    from lightning.fabric.plugins.environments import SLURMEnvironment

    from tasks.run.slurm import under_slurm

    for key in ("SLURM_NTASKS", "SLURM_JOB_NAME"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = SLURMEnvironment.detect()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "srun is available but not used" where SLURM is installed
        assert under_slurm() == expected


@pytest.mark.slow
def test_the_rcnn_stage_fits_under_ddp_and_both_stages_evaluate_like_one_process(tmp_path):
    """Localization's R-CNN stage (``--model.head rpn_rcnn``) on two ranks, from an RPN localizer's checkpoint:
    the two stages' and the frozen RPN's errors over an odd-sized validation set equal one process's."""
    _, args, _ = TRACKS["localization"]
    args = [a if a != "1" or args[i - 1] != "--data.train_per_class" else "2" for i, a in enumerate(args)]
    common = [*args, "--data.root", str(tmp_path / "data"), "--data.num_workers", "0", "--seed_everything", "0",
              *QUIET, "--trainer.max_epochs", "1"]  # fmt: skip
    rpn = _in_process("tasks.localize", ["fit", *common, *ONE, "--trainer.default_root_dir", str(tmp_path / "rpn")])
    stage = ["--model.head", "rpn_rcnn", "--model.rpn_weights", rpn["best_model_path"], "--model.rcnn_crop", "16",
             "--model.rcnn_proposals", "4", "--model.rcnn_regions", "8"]  # fmt: skip
    runs = ["--trainer.default_root_dir", str(tmp_path / "runs"), "--run_name", "ddp"]
    _run("tasks.localize", ["fit", *common, *stage, *runs, *DDP, *_dump(tmp_path / "two.json")], tmp_path)
    two = json.loads((tmp_path / "two.json").read_text())
    ckpt = next((tmp_path / "runs" / "ddp").rglob("last.ckpt"))
    one = _in_process("tasks.localize", ["validate", *common, *stage, *ONE, "--ckpt_path", str(ckpt)])
    for name in ["val/loc_err_top5", "val/loc_err_gt", "val/rpn_loc_err_top5", "val/rpn_loc_err_gt", "val/acc1"]:
        assert one[name] == two[name], (name, one[name], two[name])
