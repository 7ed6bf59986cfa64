"""Cluster jobs on a real SLURM controller (marker ``slurm``): ``scripts/slurm/train.sbatch`` submitted with
``sbatch`` to a one-node cluster (``scripts/slurm/local_cluster.sh start``, which CI runs), 2 CPU tasks per
job talking over gloo. SLURM itself sends the time-limit warning, requeues, restarts and cancels.

All jobs are submitted together when the module starts and run side by side; each test waits for its own.
A requeued job waits SLURM's two minutes before it starts again, so the module takes about ten minutes.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slurm

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
SBATCH = ROOT / "scripts" / "slurm" / "train.sbatch"
CONF = Path(os.environ.get("SLURM_CONF") or "/tmp/residual-zoo-slurm/slurm.conf")
CLASSIFY = ["tasks.classify", str(ROOT / "configs" / "demo_classify.yaml"), "--trainer.max_epochs", "3",
            "--trainer.enable_progress_bar", "false"]  # fmt: skip
DETECT = ["tasks.detect", str(ROOT / "configs" / "demo_detect.yaml"), "--trainer.max_epochs", "1",
          "--data.num_train_images", "24", "--data.num_val_images", "10",
          "--trainer.enable_progress_bar", "false"]  # fmt: skip
PACE = ["--trainer.callbacks+=datasets.Pace", "--trainer.callbacks.seconds", "3"]  # restart 0 sleeps 3 s a step


def _env() -> dict[str, str]:
    return {**os.environ, "SLURM_CONF": str(CONF), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
            "PYTHONPATH": f"{ROOT}:{TESTS}", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}  # fmt: skip


def _unavailable() -> str | None:
    if shutil.which("sbatch") is None or not CONF.is_file():
        return (f"no SLURM cluster ({CONF} missing): `sudo scripts/slurm/local_cluster.sh start` installs and starts "
                "a one-node cluster (CI does)")  # fmt: skip
    state = subprocess.run(["sinfo", "-h", "-o", "%t"], env=_env(), capture_output=True, text=True)
    if state.returncode != 0 or not re.search(r"^(idle|mix|alloc)", state.stdout, re.M):
        return f"the SLURM cluster of {CONF} is not up (sinfo: {(state.stdout + state.stderr).strip()!r})"
    return None


class Cluster:
    """Submits ``train.sbatch`` jobs from one folder and watches them with ``scontrol``."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir

    def submit(self, *args: str, sbatch: tuple[str, ...] = ()) -> str:
        out = subprocess.run(["sbatch", "--parsable", "--ntasks-per-node", "2", *sbatch, str(SBATCH), *args],
                             cwd=self.workdir, env=_env(), capture_output=True, text=True, check=True)  # fmt: skip
        return out.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        out = subprocess.run(["scontrol", "show", "job", "-o", job_id], env=_env(), capture_output=True, text=True)
        return dict(re.findall(r"(\w+)=(\S*)", out.stdout))

    def output(self, job_id: str) -> str:
        path = self.workdir / f"slurm-{job_id}.out"
        return path.read_text(errors="replace") if path.is_file() else ""

    def wait(self, job_id: str, state: str = "COMPLETED", timeout: float = 900) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info.get("JobState") == state:
                return info
            if info.get("JobState") in {"FAILED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "CANCELLED", "COMPLETED"}:
                break
            time.sleep(2)
        pytest.fail(f"job {job_id} is {info.get('JobState')}, not {state}:\n{self.output(job_id)[-6000:]}")

    def act_at_step(self, name: str, command: list[str], step: int = 3, timeout: float = 600,
                    then: tuple[str, list[str]] | None = None):  # fmt: skip
        """In the background: once the job has trained ``step`` steps (its Pace callback writes them to
        ``<name>.step``), run ``command``; the thread's ``done`` dict says at which step. ``then`` (a job id and
        a command): once that job has left the running states, record its state as ``done["state"]`` and run
        the command -- at once, so a restart trains beside the other jobs instead of after the tests reach it."""
        path, done = self.workdir / f"{name}.step", {}

        def watch() -> None:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and "step" not in done:
                text = path.read_text().strip() if path.is_file() else ""
                if text and int(text) >= step:
                    subprocess.run(command, env=_env(), check=True)
                    done["step"] = int(text)
                time.sleep(0.2)
            while then and time.monotonic() < deadline:
                state = self.job(then[0]).get("JobState")
                if state not in {"RUNNING", "PENDING", "COMPLETING", "CONFIGURING", None}:
                    done["state"] = state
                    subprocess.run(then[1], env=_env(), check=True)
                    return
                time.sleep(1)

        thread = threading.Thread(target=watch, daemon=True)
        thread.done = done
        thread.start()
        return thread

    def release_requeued(self, job_ids: list[str]) -> threading.Event:
        """In the background until the returned event is set: SLURM holds a requeued job for two minutes
        (``EligibleTime`` = the requeue + 120 s, ``Reason=BeginTime``); release each one at once
        (``scontrol update StartTime=now``), so the restarts -- the same path a cluster takes, two minutes
        later -- do not make the module wait. ``self.released`` lists the jobs released."""
        stop, self.released = threading.Event(), []

        def watch() -> None:
            while not stop.wait(1):
                for job_id in job_ids:
                    info = self.job(job_id)
                    if info.get("JobState") == "PENDING" and info.get("Reason") == "BeginTime":
                        update = ["scontrol", "update", f"JobId={job_id}", "StartTime=now"]
                        subprocess.run(update, env=_env(), capture_output=True)
                        self.released.append(job_id)

        threading.Thread(target=watch, daemon=True).start()
        return stop

    def run_dir(self, job_id: str, name: str = "demo_classify") -> Path:
        return self.workdir / "runs" / name / f"job_{job_id}"


def _step_file(cluster: Cluster, name: str) -> list[str]:
    return ["--trainer.callbacks.path", str(cluster.workdir / f"{name}.step")]


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    reason = _unavailable()
    if reason:
        pytest.skip(reason)
    cluster = Cluster(tmp_path_factory.mktemp("slurm"))
    (cluster.workdir / "data").mkdir()
    submitted = {
        "plain": cluster.submit(*CLASSIFY),
        "twin": cluster.submit(*CLASSIFY),  # the same config again: its own run directory
        # SLURM warns 60 s before a 4-minute limit, that is 150 to 180 s in (it checks every 30 s and warns
        # when the limit is within the lead plus 30 s): at about step 15 of 21 at 10 s a step; the restart,
        # at full speed, ends long before its own warning
        "limit": cluster.submit(
            *CLASSIFY, *PACE, "--trainer.callbacks.seconds", "10", sbatch=("--time", "4", "--signal", "USR1@60")
        ),  # fmt: skip
        "requeue": cluster.submit(*CLASSIFY, *PACE, *_step_file(cluster, "requeue")),
        "cancel": cluster.submit(*CLASSIFY, *PACE, *_step_file(cluster, "cancel"), "--run_name", "cancelled"),
        # (without W&B: its service process, not named like the job, would outlive the kill and hold the run id)
        "crash": cluster.submit(
            *CLASSIFY, *PACE, *_step_file(cluster, "crash"), "--run_name", "crashed", "--trainer.logger", "false"
        ),
        "detect": cluster.submit(*DETECT),
    }
    # while they train: SIGTERM from SLURM after 3 steps; SIGKILL of every process of the job (what a node
    # failure leaves: nothing saved) after 9 steps, past the first validation's last.ckpt at step 7
    cluster.acted = {
        "requeue": cluster.act_at_step("requeue", ["scontrol", "requeue", submitted["requeue"]]),
        "cancel": cluster.act_at_step("cancel", ["scancel", submitted["cancel"]]),
        "crash": cluster.act_at_step(
            "crash",
            ["pkill", "-KILL", "-f", "run_name crashed"],
            step=9,
            then=(submitted["crash"], ["scontrol", "requeue", submitted["crash"]]),
        ),  # fmt: skip
    }
    releasing = cluster.release_requeued(list(submitted.values()))
    yield cluster, submitted
    releasing.set()
    subprocess.run(["scancel", *submitted.values()], env=_env(), capture_output=True)


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]


def _assert_same_weights(a: Path, b: Path) -> None:
    first, second = _weights(a), _weights(b)
    assert first.keys() == second.keys()
    different = [k for k in first if not torch.equal(first[k], second[k])]
    assert not different, f"{len(different)} tensors differ from the uninterrupted job's, e.g. {different[:3]}"


def _metrics(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv", newline="") as file:
        return list(csv.DictReader(file))


def _acted_at(cluster: Cluster, name: str) -> int:
    """The step at which the fixture's watcher acted on job ``name`` (waiting for it to act)."""
    watcher = cluster.acted[name]
    watcher.join(600)
    assert "step" in watcher.done, f"the watcher of {name} never saw its job train"
    return watcher.done["step"]


def _resumed_from(out: str) -> tuple[str, int]:
    """The checkpoint and step a restarted job's log says it resumed from."""
    resumed = re.search(r"restarted: resuming from (\S+) at step (\d+)", out)
    assert resumed, "the restarted job did not say what it resumed from"
    return resumed.group(1), int(resumed.group(2))


def _assert_one_wandb_run(run_dir: Path) -> None:
    run_id = (run_dir / "wandb_id").read_text().strip()
    offline = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert offline and all(p.name.endswith(f"-{run_id}") for p in offline), (run_id, [p.name for p in offline])


def test_submitted_job_trains_to_the_end_where_the_readme_says(jobs):
    cluster, ids = jobs
    info = cluster.wait(ids["plain"])
    assert info["ExitCode"] == "0:0" and info["Restarts"] == "0"
    run_dir = cluster.run_dir(ids["plain"])
    assert {"config.yaml", "metrics.csv", "wandb_id"} <= {p.name for p in run_dir.iterdir()}
    assert (run_dir / "checkpoints" / "best.ckpt").is_file() and (run_dir / "checkpoints" / "last.ckpt").is_file()
    _assert_one_wandb_run(run_dir)
    out = cluster.output(ids["plain"])
    assert "1 node(s) x 2 cpu task(s)" in out and "distributed_backend=gloo" in out
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 21  # 3 x 7 steps
    epochs = {int(r["epoch"]) for r in _metrics(run_dir) if r.get("val/acc1")}
    assert epochs == {0, 1, 2}


def test_second_job_of_the_same_config_gets_its_own_run_directory(jobs):
    cluster, ids = jobs
    cluster.wait(ids["plain"])
    cluster.wait(ids["twin"])
    first, second = cluster.run_dir(ids["plain"]), cluster.run_dir(ids["twin"])
    assert first != second and (second / "checkpoints" / "last.ckpt").is_file()
    assert (first / "wandb_id").read_text() != (second / "wandb_id").read_text()
    _assert_same_weights(first, second)  # same seed, same config: the same run, twice


def test_time_limit_warning_checkpoints_requeues_and_resumes_to_the_same_weights(jobs):
    cluster, ids = jobs
    info = cluster.wait(ids["limit"], timeout=1200)
    assert int(info["Restarts"]) >= 1 and info["ExitCode"] == "0:0"
    out = cluster.output(ids["limit"])
    assert "SLURM's time-limit warning: saved" in out and f"requeued SLURM job {ids['limit']}" in out
    checkpoint, step = _resumed_from(out)
    assert "restart 1" in out and checkpoint.endswith("hpc_ckpt_1.ckpt")
    assert 0 < step < 21
    run_dir = cluster.run_dir(ids["limit"])
    assert (run_dir / "hpc_ckpt_1.ckpt").is_file()
    _assert_one_wandb_run(run_dir)  # the restarted job logs into the same W&B run
    rows = _metrics(run_dir)  # metrics.csv keeps the rows logged before the requeue
    assert {int(r["epoch"]) for r in rows if r.get("val/acc1")} == {0, 1, 2}
    cluster.wait(ids["plain"])
    _assert_same_weights(cluster.run_dir(ids["plain"]), run_dir)


def test_scontrol_requeue_of_a_running_job_resumes_to_the_same_weights(jobs):
    cluster, ids = jobs
    acted = _acted_at(cluster, "requeue")
    assert 3 <= acted < 21  # requeued while it trained
    info = cluster.wait(ids["requeue"], timeout=1200)
    assert info["Restarts"] == "1" and info["ExitCode"] == "0:0"
    # SIGTERM saved last.ckpt at the step it stopped, a few steps after the requeue
    checkpoint, step = _resumed_from(cluster.output(ids["requeue"]))
    assert checkpoint.endswith("checkpoints/last.ckpt")
    assert acted <= step < 21
    run_dir = cluster.run_dir(ids["requeue"])
    _assert_one_wandb_run(run_dir)
    cluster.wait(ids["plain"])
    _assert_same_weights(cluster.run_dir(ids["plain"]), run_dir)


def test_scancel_leaves_last_ckpt_and_a_later_job_resumes_it(jobs):
    cluster, ids = jobs
    assert 3 <= _acted_at(cluster, "cancel") < 21  # cancelled while it trained
    cluster.wait(ids["cancel"], state="CANCELLED")
    run_dir = cluster.run_dir(ids["cancel"], "cancelled")
    deadline = time.monotonic() + 60  # the tasks save while SLURM waits KillWait for them to end
    while not (run_dir / "checkpoints" / "last.ckpt").is_file() and time.monotonic() < deadline:
        time.sleep(1)
    stopped_at = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    assert 3 <= stopped_at < 21
    later = cluster.submit(*CLASSIFY, "--run_name", "cancelled", "--ckpt_path", "last")
    info = cluster.wait(later)
    assert info["ExitCode"] == "0:0"
    assert not cluster.run_dir(later, "cancelled").exists()  # it resumed in the cancelled job's directory
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 21
    cluster.wait(ids["plain"])
    _assert_same_weights(cluster.run_dir(ids["plain"]), run_dir)


def test_detection_job_evaluates_exactly_as_one_process(jobs, tmp_path):
    cluster, ids = jobs
    info = cluster.wait(ids["detect"])
    assert info["ExitCode"] == "0:0"
    run_dir = cluster.run_dir(ids["detect"], "demo_detect")
    logged = [r for r in _metrics(run_dir) if r.get("val/mAP")][-1]
    dump = tmp_path / "validate.json"
    result = subprocess.run(
        [sys.executable, "-m", "tasks.detect", "validate", "--config", str(ROOT / "configs" / "demo_detect.yaml"),
         "--data.num_train_images", "24", "--data.num_val_images", "10", "--trainer.devices", "1",
         "--trainer.accelerator", "cpu", "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
         "--trainer.default_root_dir", str(tmp_path / "runs"),
         "--ckpt_path", str(run_dir / "checkpoints" / "last.ckpt"),
         "--trainer.callbacks+=datasets.MetricsDump", "--trainer.callbacks.path", str(dump)],
        cwd=cluster.workdir, env=_env(), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    one = json.loads(dump.read_text())
    for name in ("val/mAP", "val/AP50", "val/AP75"):
        assert float(logged[name]) == pytest.approx(one[name], abs=1e-6), name


def test_a_job_killed_without_saving_resumes_from_its_last_validation(jobs):
    """What a node failure leaves: every process of the job killed (SIGKILL, nothing saved). Requeued (as
    SLURM does for a ``--requeue`` job on a failed node), it resumes from the first validation's ``last.ckpt``
    and trains the lost steps again, to the same weights."""
    cluster, ids = jobs
    assert 9 <= _acted_at(cluster, "crash") < 14  # killed in the second epoch
    watcher = cluster.acted["crash"]
    watcher.join(600)
    assert watcher.done.get("state") == "FAILED", watcher.done  # SLURM saw the job fail; the watcher requeued it
    info = cluster.wait(ids["crash"], timeout=1200)
    assert info["Restarts"] == "1" and info["ExitCode"] == "0:0"
    checkpoint, step = _resumed_from(cluster.output(ids["crash"]))
    assert checkpoint.endswith("checkpoints/last.ckpt") and step == 7
    cluster.wait(ids["plain"])
    _assert_same_weights(cluster.run_dir(ids["plain"]), cluster.run_dir(ids["crash"], "crashed"))
