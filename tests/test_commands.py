"""The README's path as users run it: ``python -m tasks.<task> fit`` as a subprocess, then
``python -m tasks.export`` on what it wrote (ONNX Runtime runs the file), ``load_predictor`` and
``<Task>.load_from_checkpoint``, for every task -- through the one checkpoint format
(``zoo_common.checkpoints``) and the task registry, whatever module name the command ran under."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from commands import run_commands
from conftest import once_per_session
from datasets import write_coco, write_imagefolder

from datamodules.shapes_xml import generate_localization
from tasks import load_predictor, registry
from zoo_common.checkpoints import read_task_checkpoint

ROOT = Path(__file__).resolve().parents[1]
ort = pytest.importorskip("onnxruntime", reason='ONNX export is an extra: pip install -e ".[export]"')

QUIET = ["--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
         "--trainer.enable_model_summary", "false", "--trainer.logger", "false", "--trainer.max_steps", "2",
         "--trainer.limit_val_batches", "1", "--trainer.num_sanity_val_steps", "0"]  # fmt: skip
DETECTOR = ["--model.backbone", "resnet18", "--model.norm", "bn", "--model.freeze_at", "0", "--model.min_size", "64",
            "--model.max_size", "64", "--model.fpn_channels", "16", "--model.box_score_thresh", "0.0",
            "--model.detector_args", '{"rpn_post_nms_top_n_test": 50, "box_batch_size_per_image": 32}']  # fmt: skip


def _data(kind: str, tmp: Path) -> list[str]:
    if kind == "classify":
        root = write_imagefolder(tmp / "cls", per_class=2, val_per_class=1, size=32)
        return ["--data", "datamodules.ImageFolderDataModule", "--data.root", str(root), "--data.image_size", "32",
                "--data.batch_size", "4", "--data.num_workers", "0", "--model.backbone", "cifar_resnet20"]  # fmt: skip
    if kind in ("detect", "segment", "instance_segment"):
        root = write_coco(tmp / "coco", train_images=4, val_images=2, size=(64, 64), object_size=(16, 30))
        if kind != "segment":
            data = "datamodules.COCODetectionDataModule" if kind == "detect" else "datamodules.COCOInstanceDataModule"
            return ["--data", data, "--data.root", str(root), "--data.batch_size", "2", "--data.num_workers", "0",
                    *DETECTOR]  # fmt: skip
        return ["--data", "datamodules.COCOSegmentationDataModule", "--data.root", str(root), "--data.categories",
                "all", "--data.min_area", "0", "--data.base_size", "64", "--data.crop_size", "48",
                "--data.batch_size", "2", "--data.num_workers", "0", "--data.cache_dir", str(tmp / "masks"),
                "--model.backbone", "resnet18", "--model.head", "skip"]  # fmt: skip
    root = generate_localization(tmp / "loc", train_per_class=2, val_per_class=1, size=48)
    return ["--data", "datamodules.ILSVRCLocalizationDataModule", "--data.root", str(root), "--data.image_size", "32",
            "--data.batch_size", "4", "--data.num_workers", "0", "--model.backbone", "resnet18"]  # fmt: skip


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=600)


@pytest.fixture(scope="session")
def fitted(tmp_path_factory) -> dict[str, tuple[Path, list[str]]]:
    """Each task fitted by its command (two steps) as ``python -m`` runs it, all five in one new interpreter
    (``commands.run_commands``), once for the session whatever the number of workers: its last checkpoint and
    its data flags."""

    def fit_each(folder: Path) -> dict[str, list]:
        data, commands = {}, []
        for kind in registry.TASKS:
            (folder / kind).mkdir()
            data[kind] = _data(kind, folder / kind)
            runs = str(folder / kind / "runs")
            commands.append([f"tasks.{kind}", "fit", *data[kind], *QUIET, "--trainer.default_root_dir", runs])
        for result in run_commands(commands, folder):
            assert result.returncode == 0, (result.args[0], result.stderr[-3000:])
        return {kind: [str(next((folder / kind / "runs").rglob("last.ckpt"))), data[kind]] for kind in data}

    shared = once_per_session(tmp_path_factory, "fitted", fit_each)
    return {kind: (Path(ckpt), data) for kind, (ckpt, data) in shared.items()}


@pytest.mark.parametrize("kind", list(registry.TASKS))
def test_a_command_written_checkpoint_records_its_task_by_registry_path(kind, fitted):
    record = read_task_checkpoint(fitted[kind][0])
    assert record.task == registry.TASKS[kind]  # not __main__.<Task>: the command ran as __main__
    assert record.datamodule["_class_path"].startswith("datamodules.")


@pytest.mark.parametrize("kind", list(registry.TASKS))
def test_export_command_then_onnx_runtime_and_the_predictor_on_what_fit_wrote(kind, fitted, tmp_path):
    ckpt, _ = fitted[kind]
    out = tmp_path / f"{kind}.onnx"
    result = _run(["tasks.export", str(ckpt), str(out)], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"wrote {out}" in result.stdout
    from tasks.export import read_metadata

    meta = read_metadata(out)
    assert meta["zoo.task"] == kind
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    shape = session.get_inputs()[0].shape
    side = 64 if kind in ("detect", "segment", "instance_segment") else 32
    image = torch.rand(3, side, side) if len(shape) == 3 else torch.rand(1, 3, side, side)
    outputs = session.run(None, {"image": image.numpy()})
    assert [o.name for o in session.get_outputs()] == meta["zoo.outputs"] and len(outputs) == len(meta["zoo.outputs"])
    predict = load_predictor(ckpt)
    found = predict(torch.randint(0, 255, (3, 40, 40), dtype=torch.uint8))
    expected = {"classify": "classes", "detect": "boxes", "segment": "mask", "localize": "boxes",
                "instance_segment": "masks"}[kind]  # fmt: skip
    assert expected in found
    if kind == "instance_segment":  # one boolean mask per instance, at the image's size
        assert found["masks"].dtype == torch.bool and found["masks"].shape == (len(found["boxes"]), 40, 40)
    if kind == "segment":
        assert found["mask"].shape == (40, 40)
    if kind == "localize":
        assert found["boxes"].shape == (5, 4) and len(found["classes"]) == 5


@pytest.mark.parametrize("kind", list(registry.TASKS))
def test_load_from_checkpoint_the_lightning_way_gives_the_trained_network(kind, fitted):
    ckpt, _ = fitted[kind]
    cls = registry.task_class(kind)
    task = cls.load_from_checkpoint(ckpt)
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    ours = task.state_dict()
    assert set(ours) == set(state) and all(torch.equal(ours[k], state[k]) for k in state)
    assert task.class_names == read_task_checkpoint(ckpt).class_names
    other = next(k for k in registry.TASKS if k != kind)
    with pytest.raises(ValueError, match=f"is a checkpoint of {registry.TASKS[kind]}.*load it with that task"):
        registry.task_class(other).load_from_checkpoint(ckpt)


def test_a_checkpoint_recorded_as_main_still_loads_and_nothing_it_names_is_imported(fitted, tmp_path):
    """Checkpoints written before this version recorded ``__main__.<Task>`` (a classifier here: any task's
    record is read the same way, and its export is the quickest): they still load, in the predictor and in a
    command. A class outside the registry is refused before anything is imported."""
    ckpt, _ = fitted["classify"]
    raw = torch.load(ckpt, weights_only=True)
    raw["task"] = "__main__.ClassificationTask"
    old = tmp_path / "old.ckpt"
    torch.save(raw, old)
    assert len(load_predictor(old)(torch.zeros(3, 32, 32, dtype=torch.uint8))["classes"]) == 5
    result = _run(["tasks.export", str(old), str(tmp_path / "old.onnx")], tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    planted = tmp_path / "planted_module.py"
    planted.write_text(f"open({str(tmp_path / 'RAN')!r}, 'w').write('imported')\nclass Task: pass\n")
    raw["task"] = "planted_module.Task"
    foreign = tmp_path / "foreign.ckpt"
    torch.save(raw, foreign)
    result = _run(["tasks.export", str(foreign), str(tmp_path / "foreign.onnx")], tmp_path)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert lines[0].startswith("error: the checkpoint was written by planted_module.Task, which is not one of")
    assert "Traceback" not in result.stderr and len(lines) == 2
    assert not (tmp_path / "RAN").exists()


def test_a_checkpoint_naming_a_foreign_datamodule_is_refused_before_import(fitted, tmp_path):
    ckpt, _ = fitted["classify"]
    raw = torch.load(ckpt, weights_only=True)
    (tmp_path / "evil_data.py").write_text(f"open({str(tmp_path / 'RAN')!r}, 'w').write('imported')\n")
    raw["datamodule_hyper_parameters"]["_class_path"] = "evil_data.DataModule"
    foreign = tmp_path / "foreign.ckpt"
    torch.save(raw, foreign)
    sys.path.insert(0, str(tmp_path))
    try:
        with pytest.raises(ValueError, match=r"datamodule is evil_data.DataModule, which is not one of this project"):
            load_predictor(foreign)
    finally:
        sys.path.remove(str(tmp_path))
    assert not (tmp_path / "RAN").exists() and "evil_data" not in sys.modules


def test_a_class_spec_planted_in_a_checkpoints_hyperparameters_builds_nothing(fitted, tmp_path):
    """jsonargparse builds ``{"class_path": ...}`` found in an ``Any``-typed field when Lightning passes a
    checkpoint's hyperparameters through it: a weights-only checkpoint could create or truncate any file the
    user can write. It is refused, naming the field, on the command line and in ``load_from_checkpoint``."""
    ckpt, data = fitted["classify"]
    raw = torch.load(ckpt, weights_only=True)
    target = tmp_path / "PWNED"
    raw["hyper_parameters"]["backbone_args"] = {"class_path": "logging.FileHandler",
                                                "init_args": {"filename": str(target)}}  # fmt: skip
    planted = tmp_path / "planted.ckpt"
    torch.save(raw, planted)
    result = _run(["tasks.classify", "validate", *data, *QUIET, "--ckpt_path", str(planted)], tmp_path)
    assert result.returncode == 1, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert lines[-2].startswith(f"error: {planted}: hyper_parameters.backbone_args asks to build logging.FileHandler")
    assert "Traceback" not in result.stderr
    with pytest.raises(ValueError, match="hyper_parameters.backbone_args asks to build logging.FileHandler"):
        registry.task_class("classify").load_from_checkpoint(planted)
    with pytest.raises(ValueError, match="asks to build"):
        load_predictor(planted)
    assert not target.exists()


def test_validate_with_another_tasks_checkpoint_names_the_task_that_wrote_it(fitted, tmp_path):
    ckpt, _ = fitted["detect"]
    _, data = fitted["classify"]
    result = _run(["tasks.classify", "validate", *data, *QUIET, "--ckpt_path", str(ckpt)], tmp_path)
    assert result.returncode == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    error = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1, result.stderr[-2000:]
    assert f"is a checkpoint of {registry.TASKS['detect']}: run python -m tasks.detect" in error[0]


@pytest.mark.slow  # subprocesses: the long tier
@pytest.mark.parametrize("kind", ["detect", "instance_segment"])
def test_box_refinement_and_multiscale_testing_from_the_command_line_and_the_predictor(kind, fitted, tmp_path):
    ckpt, data = fitted[kind]
    entries = ["--model.box_refinement", "true", "--model.multiscale_testing", "[32, 64, 96]"]
    result = _run([f"tasks.{kind}", "validate", *data, *QUIET, "--ckpt_path", str(ckpt), *entries], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "val/AP50" in result.stdout and (kind == "detect" or "val/mask_AP50" in result.stdout)
    image = torch.randint(0, 255, (3, 48, 56), dtype=torch.uint8)
    found = load_predictor(ckpt, box_refinement=True, multiscale_testing=[48, 64])(image)
    assert found["boxes"].shape[1] == 4 and len(found["scores"]) == len(found["boxes"])
    if kind == "instance_segment":
        assert found["masks"].shape == (len(found["boxes"]), 48, 56)
    with pytest.raises(ValueError, match="box_refinment: not an inference option"):
        load_predictor(ckpt, box_refinment=True)


def _member(ckpt: Path, out: Path, seed: int = 1, class_names: list[str] | None = None) -> Path:
    """Another member: ``ckpt`` with its weights moved by noise (and, given, other class names)."""
    from zoo_common import checkpoints

    raw = torch.load(ckpt, weights_only=True)
    generator = torch.Generator().manual_seed(seed)
    for value in raw["state_dict"].values():
        if value.is_floating_point():
            value.add_(0.05 * torch.randn(value.shape, generator=generator) * (value.std() if value.numel() > 1 else 1))
    if class_names is not None:
        raw[checkpoints.CLASS_NAMES] = class_names
    torch.save(raw, out)
    return out


def _metrics(stdout: str) -> dict[str, float]:
    """The metrics table Lightning prints after validate: ``name value`` rows."""
    import re

    return {m[1]: float(m[2]) for m in re.finditer(r"[│|]\s*((?:val|test)/[\w/.]+)\s*[│|]\s*([-\d.e]+)\s*[│|]", stdout)}


@pytest.mark.slow  # subprocesses: the long tier
@pytest.mark.parametrize("kind", ["classify", "detect"])
def test_an_ensemble_of_one_checkpoint_validates_as_that_checkpoint_and_two_validate(kind, fitted, tmp_path):
    ckpt, data = fitted[kind]
    plain = _run([f"tasks.{kind}", "validate", *data, *QUIET, "--ckpt_path", str(ckpt)], tmp_path)
    one = _run([f"tasks.{kind}", "validate", *data, *QUIET, "--model.ensemble", f"[{ckpt}]"], tmp_path)
    assert plain.returncode == 0 and one.returncode == 0, one.stderr[-3000:]
    ours, theirs = _metrics(one.stdout), _metrics(plain.stdout)
    assert len(theirs) >= 2 and ours == theirs
    other = _member(ckpt, tmp_path / "b.ckpt")
    two = _run([f"tasks.{kind}", "validate", *data, *QUIET, "--model.ensemble", f"[{ckpt},{other}]"], tmp_path)
    assert two.returncode == 0, two.stderr[-3000:]
    assert set(_metrics(two.stdout)) == set(theirs)


def test_a_classifier_ensemble_predicts_the_members_averaged_softmax(fitted, tmp_path):
    ckpt, _ = fitted["classify"]
    other = _member(ckpt, tmp_path / "b.ckpt")
    images = [torch.randint(0, 255, (3, 40, 40), dtype=torch.uint8) for _ in range(3)]
    each = [load_predictor(c)(images) for c in (ckpt, other)]
    both = load_predictor([ckpt, other])(images)
    assert load_predictor([ckpt])(images) == each[0]  # an ensemble of one is that checkpoint
    for a, b, e in zip(*each, both):
        expected = {c: (s + dict(zip(b["classes"], b["scores"]))[c]) / 2 for c, s in zip(a["classes"], a["scores"])}
        assert {c: pytest.approx(s, abs=2e-6) for c, s in expected.items()} == dict(zip(e["classes"], e["scores"]))
    assert each[0] != each[1]  # the members differ


@pytest.mark.slow  # subprocesses: the long tier
def test_an_ensemble_refuses_another_label_set_naming_the_checkpoint_and_refuses_fit(fitted, tmp_path):
    ckpt, data = fitted["classify"]
    names = load_predictor(ckpt).class_names
    other = _member(ckpt, tmp_path / "relabelled.ckpt", class_names=[*names[:-1], "hexagon"])
    result = _run(["tasks.classify", "validate", *data, *QUIET, "--model.ensemble", f"[{ckpt},{other}]"], tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert f"model.ensemble: {other} has 5 classes" in result.stderr and "must share the label set" in result.stderr
    with pytest.raises(ValueError, match=f"{other} has 5 classes.*but {ckpt} has"):
        load_predictor([ckpt, other])
    fit = _run(["tasks.classify", "fit", *data, *QUIET, "--model.ensemble", f"[{ckpt}]"], tmp_path)
    assert fit.returncode == 1 and "model.ensemble is for validate, test and predict" in fit.stderr
    ensemble = ["--model.ensemble", f"[{ckpt}]"]
    both = _run(["tasks.classify", "validate", *data, *QUIET, "--ckpt_path", str(ckpt), *ensemble], tmp_path)
    assert both.returncode == 1 and "the ensemble is the checkpoints listed in model.ensemble only" in both.stderr


@pytest.mark.slow  # subprocesses: the long tier
@pytest.mark.parametrize("kind", ["detect", "instance_segment"])
def test_a_detector_ensemble_in_the_predictor(kind, fitted, tmp_path):
    ckpt, _ = fitted[kind]
    image = torch.randint(0, 255, (3, 48, 56), dtype=torch.uint8)
    alone, one = load_predictor(ckpt)(image), load_predictor([ckpt])(image)
    assert (
        all(torch.equal(alone[k], one[k]) for k in ("boxes", "labels", "scores")) and alone["classes"] == one["classes"]
    )
    found = load_predictor([ckpt, _member(ckpt, tmp_path / "b.ckpt")])(image)
    assert found["boxes"].shape[1] == 4 and len(found["scores"]) == len(found["boxes"]) > 0
    if kind == "instance_segment":
        assert found["masks"].shape == (len(found["boxes"]), 48, 56)
    with pytest.raises(ValueError, match="drop tta, box_refinement and multiscale_testing"):
        load_predictor([ckpt, ckpt], box_refinement=True)(image)


def test_a_localizer_ensemble_averages_the_members_softmax_and_each_classs_box(fitted, tmp_path):
    ckpt, _ = fitted["localize"]
    other = _member(ckpt, tmp_path / "b.ckpt")
    image = torch.randint(0, 255, (3, 48, 40), dtype=torch.uint8)
    each = [load_predictor(c)(image) for c in (ckpt, other)]
    one, both = load_predictor([ckpt])(image), load_predictor([ckpt, other])(image)
    assert one["classes"] == each[0]["classes"] and torch.equal(one["boxes"], each[0]["boxes"])
    assert len(both["classes"]) == 5  # the shapes' five classes: every class is among each member's guesses
    for name, score, box in zip(both["classes"], both["scores"], both["boxes"]):
        rows = [found["classes"].index(name) for found in each]
        expected = sum(found["scores"][r] for found, r in zip(each, rows)) / 2
        assert score == pytest.approx(expected, abs=2e-6)
        torch.testing.assert_close(box, sum(found["boxes"][r] for found, r in zip(each, rows)) / 2, atol=1e-3, rtol=0)


@pytest.mark.slow  # three fits, an export and the predictor: 26 s of the default tier's 10 minutes
def test_the_rcnn_stage_fits_from_the_rpn_localizers_checkpoint_then_exports_and_predicts(fitted, tmp_path):
    """Appendix C's second stage as a user runs it: ``tasks.localize fit --model.head rpn_rcnn`` from the RPN
    localizer the first command wrote (its weights exactly, frozen), then ``tasks.export`` and the predictor
    on what it wrote; without an RPN checkpoint, or with another task's, the command says which and how."""
    from commands import run_commands

    ckpt, data = fitted["localize"]
    stage = [*data, *QUIET, "--model.head", "rpn_rcnn", "--model.rcnn_crop", "16", "--model.rcnn_proposals", "4",
             "--model.rcnn_regions", "8", "--trainer.default_root_dir", str(tmp_path / "runs")]  # fmt: skip
    missing, other, fit = run_commands([
        ["tasks.localize", "fit", *stage],
        ["tasks.localize", "fit", *stage, "--model.rpn_weights", str(fitted["detect"][0])],
        ["tasks.localize", "fit", *stage, "--model.rpn_weights", str(ckpt)],
    ], tmp_path)  # fmt: skip
    assert missing.returncode != 0 and "--model.rpn_weights <a tasks.localize checkpoint" in missing.stderr
    assert other.returncode != 0 and f"model.rpn_weights: {fitted['detect'][0]} is not a localizer" in other.stderr
    assert "tasks.detect.DetectionTask" in other.stderr and "Traceback" not in other.stderr
    assert fit.returncode == 0, fit.stderr[-3000:]
    written = next((tmp_path / "runs").rglob("last.ckpt"))
    rpn, trained = (torch.load(p, weights_only=True)["state_dict"] for p in (ckpt, written))
    assert all(torch.equal(v, trained[k.replace("model.", "model.rpn.", 1)]) for k, v in rpn.items())
    assert any(k.startswith("model.rcnn.") for k in trained)
    out = tmp_path / "two_stage.onnx"
    result = _run(["tasks.export", str(written), str(out)], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    image = torch.rand(1, 3, 32, 32)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    logits, classes, scores, boxes = session.run(None, {"image": image.numpy()})
    task = registry.task_class("localize").load_from_checkpoint(written).eval()
    with torch.no_grad():
        out = task.model(image)
        want = task.model.boxes_for(out, torch.as_tensor(classes), (32, 32))
    torch.testing.assert_close(torch.as_tensor(boxes), want, atol=1e-3, rtol=0)
    found = load_predictor(written)(torch.randint(0, 255, (3, 40, 40), dtype=torch.uint8))
    assert found["boxes"].shape == (5, 4) and len(found["classes"]) == 5
