"""A run's directory: ``<trainer.default_root_dir or runs>/<run_name>/<run_version>``, ``version_<n>`` by
default, agreed on by every rank of a launch.
"""

from __future__ import annotations

import os
import re
from pathlib import Path


def process_age() -> float:
    """Seconds since this process started."""
    import time

    try:
        with open(f"/proc/{os.getpid()}/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return uptime - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return time.process_time()


def next_version(run_root: Path) -> str:
    """``version_<n>`` with ``n`` one past the largest existing one under ``run_root``."""
    taken = [int(m[1]) for p in run_root.glob("version_*") if (m := re.fullmatch(r"version_(\d+)", p.name))]
    return f"version_{max(taken, default=-1) + 1}"


def agree_on_run_dir(root: Path, timeout: float = 300.0) -> Path:
    """Rank 0 picks ``version_<n>``; the other ranks of this launch read its choice from a marker file.

    The marker is keyed by the rendezvous address and port, and only a marker written after this
    process started counts, so an earlier launch's marker is never reused.
    """
    import time

    key = f"{os.environ.get('MASTER_ADDR', 'local')}-{os.environ.get('MASTER_PORT', '0')}"
    marker = root / f".launch-{key}"
    started = time.time() - process_age()
    if int(os.environ["RANK"]) == 0:
        run_dir = root / next_version(root)
        run_dir.mkdir(parents=True, exist_ok=True)
        marker.write_text(str(run_dir))
        return run_dir
    deadline = time.time() + timeout
    while time.time() < deadline:
        if marker.is_file() and marker.stat().st_mtime >= started - 5:
            return Path(marker.read_text())
        time.sleep(0.2)
    raise TimeoutError(f"rank {os.environ['RANK']}: rank 0 did not announce the run directory in {marker}")


def writes_run_directory() -> bool:
    """Whether this process is the one that claims the run directory: rank 0 of an external launch (torchrun's
    ``RANK``, SLURM's ``SLURM_PROCID``), not a process Lightning's DDP launcher started (``LOCAL_RANK``)."""
    ranks = [os.environ.get(k, "0") for k in ("RANK", "LOCAL_RANK")]
    if int(os.environ.get("SLURM_NTASKS", "1") or 1) > 1:
        ranks.append(os.environ.get("SLURM_PROCID", "0"))
    return all(r == "0" for r in ranks)


class RunDirectoryBusy(RuntimeError):
    """Another run is writing into the run directory."""


class RunDirectory:
    """A run directory claimed for one run: created (remembering the top folder this run made, so that a run
    that fails before writing anything can leave none behind), locked (``fcntl.flock`` on ``<run>/.lock``,
    released when the run ends or its process dies, so a requeued job claims it again at once) and cleaned of
    the staging files a killed checkpoint save left (``checkpoints/.<name>.ckpt.partial-<pid>``: nothing else
    writes there while the lock is held)."""

    LOCK = ".lock"
    #: the open lock files, by run directory (not on the object: a run's objects are deep-copied -- the EMA
    #: copies the task, which reaches the CLI through the Trainer -- and a file cannot be)
    _held: dict[Path, object] = {}

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.created: Path | None = None

    def claim(self) -> None:
        import fcntl
        import socket
        import time

        made = [d for d in (self.path, *self.path.parents) if not d.exists()]
        self.created = made[-1] if made else None
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            handle = open(self.path / self.LOCK, "a+")
        except OSError as err:
            raise OSError(disk_problem(err, self.path)) from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise RunDirectoryBusy(
                f"{self.path} is in use by another run ({holder}): two runs would overwrite each other's config, "
                f"metrics and checkpoints. Pass another --run_version (or --run_name), or wait for that run to end"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"process {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}")
        handle.flush()
        RunDirectory._held[self.path] = handle
        for partial in (self.path / "checkpoints").glob(".*.partial-*"):
            partial.unlink(missing_ok=True)  # a save killed half-way (AtomicCheckpointIO's staging file)

    def release(self) -> None:
        handle = RunDirectory._held.pop(self.path, None)
        if handle is not None:
            handle.close()  # (closing the file releases the lock)

    def remove_if_unused(self, steps_done: int = 0) -> None:
        """Remove the folders this run created when it failed before anything worth keeping: before its first
        training step ended, with no checkpoint written (a download or a refused weight file, a Trainer that
        cannot start, a non-finite first loss). Its config, W&B offline run and logs go with them, so the next
        try gets the same ``version_<n>``; a folder that existed before this run is never removed."""
        import shutil

        top = self.created
        if top is None or not top.is_dir() or steps_done > 0 or any(top.rglob("*.ckpt")):
            return
        shutil.rmtree(top, ignore_errors=True)


def disk_problem(err: OSError, folder: Path) -> str:
    """What an ``OSError`` writing into ``folder`` means for the user: no space, read-only, no permission."""
    import errno

    reason = {
        errno.ENOSPC: "no space left on the device",
        errno.EROFS: "the file system is read-only",
        errno.EACCES: "permission denied",
        errno.EDQUOT: "the disk quota is exceeded",
    }.get(err.errno, err.strerror or str(err))
    return (
        f"cannot write into the run directory {folder}: {reason}. Free space, or point --trainer.default_root_dir "
        f"elsewhere"
    )
