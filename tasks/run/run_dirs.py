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
