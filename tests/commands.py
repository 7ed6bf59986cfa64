"""Several commands run as ``python -m <module> <args>`` runs them, in one new interpreter.

Each command is a fresh ``runpy.run_module(module, run_name="__main__", alter_sys=True)`` -- what ``python -m``
does -- with its own ``sys.argv``, its own exit status (``SystemExit`` or an uncaught exception, as the
interpreter reports it) and its own stdout and stderr (file descriptors 1 and 2 redirected to files, so that
logging handlers and C-level writes are captured too). Importing torch and Lightning once instead of once per
command is what makes a test of many error messages take seconds instead of most of a minute; a test of a
command that runs to the end (a fit, an export) still starts its own process.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import once_per_session

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent

_DRIVER = r"""
import json, os, runpy, sys, traceback, warnings
commands, folder = json.loads(sys.argv[1]), sys.argv[2]
argv0 = list(sys.argv)
for index, (module, args) in enumerate(commands):
    out, err = (os.open(f"{folder}/{index}.{name}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC) for name in ("out", "err"))
    saved = os.dup(1), os.dup(2)
    sys.stdout.flush(); sys.stderr.flush()
    os.dup2(out, 1); os.dup2(err, 2)
    warnings._filters_mutated()  # "once" and "default" warnings shown again, as in a new process
    sys.argv = [module, *args]
    code = 0
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
        if stop.code is not None and not isinstance(stop.code, int):
            print(stop.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush(); sys.stderr.flush()
    os.dup2(saved[0], 1); os.dup2(saved[1], 2)
    for fd in (out, err, *saved):
        os.close(fd)
    with open(f"{folder}/{index}.code", "w") as f:
        f.write(str(code))
"""


@dataclass
class Result:
    """What ``subprocess.run(..., capture_output=True, text=True)`` would have given for one command."""

    args: list[str]
    returncode: int
    stdout: str
    stderr: str


def run_commands(commands: list[list[str]], cwd: Path, env: dict | None = None, timeout: float = 600) -> list[Result]:
    """Run each ``[module, *args]`` of ``commands`` in turn in one new interpreter started in ``cwd``."""
    with tempfile.TemporaryDirectory(prefix="commands-") as name:  # not in cwd: tests look at what commands left
        folder = Path(name)
        environment = {**os.environ, "PYTHONPATH": f"{ROOT}:{TESTS}", "WANDB_MODE": "offline",
                       "OMP_NUM_THREADS": "1", **(env or {})}  # fmt: skip
        spec = json.dumps([[command[0], command[1:]] for command in commands])
        driver = subprocess.run([sys.executable, "-c", _DRIVER, spec, str(folder)], cwd=cwd, env=environment,
                                capture_output=True, text=True, timeout=timeout)  # fmt: skip
        results = []
        for index, command in enumerate(commands):
            code = folder / f"{index}.code"
            if not code.is_file():
                raise AssertionError(f"command {index} ({command}) did not finish:\n{driver.stderr[-3000:]}")
            out, err = ((folder / f"{index}.{part}").read_text(errors="replace") for part in ("out", "err"))
            results.append(Result(command, int(code.read_text()), out, err))
    return results


def run_commands_once(
    tmp_path_factory: pytest.TempPathFactory, name: str, commands_in: Callable[[Path], list[list[str]]]
) -> tuple[Path, list[Result]]:
    """``run_commands(commands_in(folder), folder)`` once for the whole session (``conftest.once_per_session``),
    however many pytest-xdist workers ask: the folder they ran in and their results."""

    def run(cwd: Path) -> dict:
        return {"cwd": str(cwd), "results": [dataclasses.asdict(r) for r in run_commands(commands_in(cwd), cwd)]}

    shared = once_per_session(tmp_path_factory, name, run)
    return Path(shared["cwd"]), [Result(**r) for r in shared["results"]]
